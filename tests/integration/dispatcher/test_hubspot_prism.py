"""The HubSpot adapter against HubSpot's published OpenAPI: every request goes through Stoplight
Prism (``prism proxy --errors``), which validates it against the vendored spec
(``tests/fixtures/hubspot/``: CRM Tasks v3 and Contacts v3) and answers 422 naming the
violation, or forwards it to a loopback fake that keeps contacts and tasks. A task without its
contact association is not valid per the spec, so these tests fail if the adapter stops sending
one. Prism comes from ``scripts/ci-tools``; the session's PostgreSQL holds the deliveries that
make ``sent_so_far``."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.dispatcher.compose import Composer, Profile
from services.dispatcher.errors import PermanentSendError
from services.dispatcher.providers.hubspot import ContactCache, HubSpotTaskProvider
from services.dispatcher.queries.sent_steps import SentSteps
from services.dispatcher.rendering import Brand, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.db.tables import deliveries
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import T0, dispatcher_config, seed, service, with_dispatcher
from tests.support.dispatcher import command as dispatch_command
from tests.support.http import free_port, serve
from tests.support.services import eventually

pytestmark = pytest.mark.integration

NOW = datetime(2026, 5, 4, 9, 30, tzinfo=UTC)
SPEC = Path(__file__).parents[2] / "fixtures" / "hubspot" / "crm-v3-tasks-contacts.json"
PRISM_VERSION = "5.14.2"  # scripts/ci-tools installs it


def prism_binary() -> str:
    cache = os.environ.get("WINBACK_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "winback"
    )
    candidate = Path(cache) / f"prism-cli-{PRISM_VERSION}" / "node_modules" / ".bin" / "prism"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise RuntimeError(f"Prism is not installed at {candidate}: run scripts/ci-tools")


@dataclass
class FakeHubSpot:
    """What HubSpot keeps for these tests: contacts by email, the tasks created, every call."""

    contacts: dict[str, str] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/crm/v3/objects/contacts/search", self.search, methods=["POST"]),
                Route("/crm/v3/objects/contacts", self.create_contact, methods=["POST"]),
                Route("/crm/v3/objects/tasks", self.create_task, methods=["POST"]),
            ]
        )

    async def search(self, request: Request) -> JSONResponse:
        self.calls.append("search")
        body = orjson.loads(await request.body())
        (group,) = body["filterGroups"]
        (condition,) = group["filters"]
        found = self.contacts.get(condition["value"])
        results = [_object(found, {"email": condition["value"]})] if found else []
        return JSONResponse({"total": len(results), "results": results})

    async def create_contact(self, request: Request) -> JSONResponse:
        self.calls.append("create_contact")
        properties = orjson.loads(await request.body())["properties"]
        existing = self.contacts.get(properties["email"])
        if existing is not None:
            return JSONResponse(
                {
                    "status": "error",
                    "message": f"Contact already exists. Existing ID: {existing}",
                    "correlationId": "c0ffee00-0000-4000-8000-000000000000",
                    "category": "CONFLICT",
                },
                status_code=409,
            )
        contact = str(5000 + len(self.contacts))
        self.contacts[properties["email"]] = contact
        return JSONResponse(_object(contact, properties), status_code=201)

    async def create_task(self, request: Request) -> JSONResponse:
        self.calls.append("create_task")
        body = orjson.loads(await request.body())
        self.tasks.append(body)
        return JSONResponse(_object(str(900 + len(self.tasks)), body["properties"]), 201)


def _object(object_id: str, properties: dict[str, str]) -> dict[str, Any]:
    """A ``SimplePublicObject`` as the spec describes it."""
    stamp = "2026-05-04T09:30:00.000Z"
    return {
        "id": object_id,
        "properties": properties,
        "createdAt": stamp,
        "updatedAt": stamp,
        "archived": False,
    }


@pytest.fixture(scope="module")
async def hubspot() -> AsyncIterator[tuple[str, FakeHubSpot]]:
    """Prism in front of the fake: the base URL the adapter gets, and the fake."""
    fake = FakeHubSpot()
    async with serve(fake.app(), lifespan="off") as upstream:
        with tempfile.TemporaryDirectory(prefix="winback-prism-") as tmp:
            log_path = Path(tmp) / "prism.log"
            port = free_port()
            with log_path.open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    prism_binary(),
                    *("proxy", "--errors", "-h", "127.0.0.1", "-p", str(port)),
                    *(str(SPEC), upstream),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:

                async def listening() -> str:
                    return log_path.read_text(errors="replace")

                started = await eventually(
                    listening, lambda text: "is listening" in text or proc.returncode is not None
                )
                if "is listening" not in started:
                    raise RuntimeError(f"Prism did not start:\n{started}")
                yield f"http://127.0.0.1:{port}", fake
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 10)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()


@pytest.fixture
def hs(hubspot: tuple[str, FakeHubSpot]) -> FakeHubSpot:
    state = hubspot[1]
    state.contacts.clear()
    state.tasks.clear()
    state.calls.clear()
    return state


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        yield http


@pytest.fixture
def composer() -> Composer:
    return Composer(
        TemplateRenderer(Brand("Acme Oy", "Mannerheimintie 1, Helsinki")),
        UnsubscribeTokens([b"k" * 32], FrozenClock(NOW)),
        public_base_url="https://winback.example.com",
        product="Ledgerly",
        cta_url="https://app.example.com/back",
        crm_default_owner="77",
        status_api_base_url="https://winback.example.com/scheduler/",
    )


def command(**customer: Any) -> dict[str, Any]:
    return {
        "idempotency_key": "case-9:d14",
        "case_id": "case-9",
        "step_id": 3,
        "step_key": "d14",
        "channel": "crm",
        "template": "crm_personal_outreach",
        "variant": None,
        "offer": None,
        "reason": "too_expensive",
        "features": [],
        "customer": {
            "id": "cus_42",
            "email": "aino@example.com",
            "phone": "+358401234567",
            "name": "Aino Virtanen",
            "locale": "en",
            "timezone": "Europe/Helsinki",
            "crm_owner": None,
        }
        | customer,
    }


PROFILE = Profile(
    mrr_minor=24900,
    currency="EUR",
    segment={"lifecycle": "churned_customer", "reason": "too_expensive", "tenure": "long_term"},
)


def adapter(
    base_url: str, client: httpx.AsyncClient, *, engine: AsyncEngine | None = None, **options: Any
) -> HubSpotTaskProvider:
    return HubSpotTaskProvider(
        client,
        access_token="hs-token",
        base_url=base_url,
        clock=FrozenClock(NOW),
        history=SentSteps(engine) if engine is not None else None,
        **options,
    )


async def sent_before(engine: AsyncEngine) -> None:
    """Two steps of case-9 went out, one failed, and another case's step went out."""
    rows = [
        ("case-9:d0", "case-9", "d0", "email", "we_miss_you", "sent", NOW - timedelta(days=14)),
        ("case-9:d7", "case-9", "d7", "sms", "special_offer", "sent", NOW - timedelta(days=7)),
        ("case-9:d9", "case-9", "d9", "email", "last_chance", "failed", None),
        ("case-1:d0", "case-1", "d0", "email", "exit_survey", "sent", NOW - timedelta(days=3)),
    ]
    async with engine.begin() as conn:
        await conn.execute(
            insert(deliveries),
            [
                {
                    "idempotency_key": key,
                    "case_id": case,
                    "step_key": step,
                    "customer_id": "cus_42",
                    "channel": channel,
                    "template": template,
                    "state": state,
                    "command": {},
                    "sent_at": sent_at,
                }
                for key, case, step, channel, template, state, sent_at in rows
            ],
        )


async def test_a_task_is_associated_with_the_contact_found_by_email_and_says_whom_to_call(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
    engine: AsyncEngine,
) -> None:
    await sent_before(engine)
    hs.contacts["aino@example.com"] = "3101"
    message = composer.compose(command(), PROFILE, NOW)

    result = await adapter(hubspot[0], client, engine=engine).send(message)

    assert result.provider_message_id == "901"
    assert hs.calls == ["search", "create_task"]  # both passed Prism's validation
    (task,) = hs.tasks
    assert task["associations"] == [
        {
            "to": {"id": "3101"},
            "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 204}],
        }
    ]
    body = task["properties"]["hs_task_body"]
    assert task["properties"]["hs_task_subject"] == "Call Aino Virtanen: win-back for Ledgerly"
    for line in (
        "Churn reason: too_expensive",
        "MRR before churn: €249.00",
        "Customer id: cus_42",
        "Email: aino@example.com",
        "Phone: +358401234567",
        "Customer for: long term",
        "- email: we_miss_you (2026-04-20)",
        "- sms: special_offer (2026-04-27)",
        "Win-back status: https://winback.example.com/scheduler/v1/customers/cus_42/winback",
    ):
        assert line in body.split("<br>"), (line, body)
    assert "last_chance" not in body  # failed, not sent
    assert "exit_survey" not in body  # another case


async def test_the_profiles_contact_id_is_used_as_is(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
) -> None:
    message = composer.compose(command(crm_contact_id="777"), PROFILE, NOW)

    await adapter(hubspot[0], client).send(message)

    assert hs.calls == ["create_task"]
    assert hs.tasks[0]["associations"][0]["to"] == {"id": "777"}


async def test_no_contact_and_creating_is_off_fails_the_step_without_a_task(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
) -> None:
    message = composer.compose(command(), PROFILE, NOW)

    with pytest.raises(PermanentSendError) as caught:
        await adapter(hubspot[0], client).send(message)

    assert caught.value.error_code == "no_crm_contact"
    assert "create_missing_contacts" in caught.value.reason
    assert hs.calls == ["search"]
    assert hs.tasks == []


async def test_a_missing_contact_is_created_once_then_cached(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
) -> None:
    cache = ContactCache()
    hubspot_tasks = adapter(hubspot[0], client, create_missing_contacts=True, contacts=cache)

    await hubspot_tasks.send(composer.compose(command(), PROFILE, NOW))
    await hubspot_tasks.send(composer.compose(command(), PROFILE, NOW))

    assert hs.calls == ["search", "create_contact", "create_task", "create_task"]
    assert hs.contacts == {"aino@example.com": "5000"}
    assert cache.get("cus_42") == "5000"
    assert [t["associations"][0]["to"]["id"] for t in hs.tasks] == ["5000", "5000"]


async def test_a_contact_created_meanwhile_is_taken_from_the_conflict(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
) -> None:
    """Two tasks for one customer at once: the second create answers 409 with the id."""
    hubspot_tasks = adapter(hubspot[0], client, create_missing_contacts=True)
    hs.contacts["aino@example.com"] = "4242"
    message = composer.compose(command(), PROFILE, NOW)
    task = message.crm_task
    assert task is not None

    contact = await hubspot_tasks._create("aino@example.com", task)

    assert contact == "4242"
    assert hs.calls == ["create_contact"]


async def test_prism_refuses_a_task_without_its_association(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
) -> None:
    """The validator is live: the body the adapter builds, less ``associations``, is a 422
    naming it and never reaches HubSpot."""
    hubspot_tasks = adapter(hubspot[0], client)
    body = hubspot_tasks.build_request(composer.compose(command(), PROFILE, NOW), "3101")
    del body["associations"]

    response = await client.post(
        hubspot[0] + "/crm/v3/objects/tasks",
        json=body,
        headers={"Authorization": "Bearer hs-token"},
    )

    assert response.status_code == 422
    assert re.search(r"required property 'associations'", response.text)
    assert hs.calls == []


async def test_the_task_shows_nothing_sent_when_nothing_was(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    client: httpx.AsyncClient,
    composer: Composer,
    engine: AsyncEngine,
) -> None:
    hs.contacts["aino@example.com"] = "3101"

    await adapter(hubspot[0], client, engine=engine).send(composer.compose(command(), PROFILE, NOW))

    assert "Sent so far" not in hs.tasks[0]["properties"]["hs_task_body"]


async def test_the_dispatcher_sends_a_crm_step_to_a_created_contact_with_the_cases_history(
    hubspot: tuple[str, FakeHubSpot],
    hs: FakeHubSpot,
    fake: FakeProviderServer,
    settings: Settings,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    """The whole dispatcher (bootstrap's wiring, real PostgreSQL): a CRM step of a case whose
    day-0 email went out, for a customer HubSpot does not know, with contact creation on."""
    configured = with_dispatcher(
        settings,
        dispatcher_config(
            fake,
            tmp_path,
            crm={
                "primary": {"kind": "hubspot", "base_url": hubspot[0], "api_key": "hs-token"},
                "create_missing_contacts": True,
            },
            status_api_base_url="https://winback.example.com/scheduler",
        ),
    )
    case = await seed(engine, "cus_e2e", mrr_minor=24900)
    async with engine.begin() as conn:
        await conn.execute(
            insert(deliveries).values(
                idempotency_key=f"{case}:d0_we_miss_you",
                case_id=case,
                step_key="d0_we_miss_you",
                customer_id="cus_e2e",
                channel="email",
                template="we_miss_you",
                state="sent",
                command={},
                sent_at=T0 - timedelta(days=2),
            )
        )
    svc = service(configured, engine, FrozenClock(T0))
    try:
        event = dispatch_command(
            "cus_e2e", case, "d2_call", channel="crm", template="crm_personal_outreach"
        )
        items = [svc.pipeline.decode_payload(from_json_dict(event), None, None)]
        await svc.pipeline.transact_reliably(items)

        assert await svc.sender.drain() == 1
    finally:
        await svc.aclose()

    assert hs.calls == ["search", "create_contact", "create_task"]
    assert hs.contacts == {"cus_e2e@example.com": "5000"}
    (task,) = hs.tasks
    assert task["associations"][0]["to"] == {"id": "5000"}
    lines = task["properties"]["hs_task_body"].split("<br>")
    assert f"- email: we_miss_you ({(T0 - timedelta(days=2)).date().isoformat()})" in lines
    assert (
        "Win-back status: https://winback.example.com/scheduler/v1/customers/cus_e2e/winback"
        in lines
    )
    assert "Email: cus_e2e@example.com" in lines
    async with engine.connect() as conn:
        state = (
            await conn.execute(
                deliveries.select().where(deliveries.c.idempotency_key == f"{case}:d2_call")
            )
        ).one()
    assert (state.state, state.provider_message_id) == ("sent", "901")
