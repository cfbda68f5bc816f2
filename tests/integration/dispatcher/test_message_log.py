"""The message log over real HTTP and PostgreSQL: deliveries sent through the fake provider
(a retry round after 503s from both email providers, an SMS refused for good), SendGrid's
signed webhooks posted back, then ``GET /v1/customers/{id}/messages`` shows each delivery
with its attempts (provider, provider message id, outcome, response class) and the events
that followed, newest first, paged by cursor, behind the API key."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import store
from services.dispatcher.bootstrap import DispatcherService
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.settings import DEV_SECRET, Settings
from tests.fakes.provider_server import FakeProviderServer, Fault, twilio_error
from tests.support.dispatcher import (
    T0,
    command,
    delivery_rows,
    dispatcher_config,
    seed,
    service,
    with_dispatcher,
)
from tests.support.http import serve

pytestmark = pytest.mark.integration

KEY = {"Authorization": f"Bearer {DEV_SECRET}"}
PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY = base64.b64encode(
    PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
ROUND_DELAY = 60


@dataclass
class Harness:
    svc: DispatcherService
    http: httpx.AsyncClient
    engine: AsyncEngine
    fake: FakeProviderServer
    clock: FrozenClock

    async def command(self, event: dict[str, Any]) -> None:
        items = [self.svc.pipeline.decode_payload(from_json_dict(event), None, None)]
        await self.svc.pipeline.transact_reliably(items)

    async def sendgrid(self, events: list[dict[str, Any]]) -> httpx.Response:
        body = json.dumps(events).encode()
        ts = str(int(self.clock.now().timestamp()))
        signature = PRIVATE_KEY.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
        return await self.http.post(
            "/v1/webhooks/sendgrid",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": ts,
            },
        )

    async def log(self, customer: str, **params: Any) -> httpx.Response:
        return await self.http.get(f"/v1/customers/{customer}/messages", params=params, headers=KEY)


@pytest.fixture
async def harness(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> AsyncIterator[Harness]:
    clock = FrozenClock(T0)
    async with FakeProviderServer() as fake:
        config = dispatcher_config(
            fake,
            tmp_path,
            webhooks={"sendgrid_public_key": PUBLIC_KEY},
            retry={"rounds": 2, "round_delay_seconds": ROUND_DELAY},
        )
        svc = service(with_dispatcher(settings, config), engine, clock)
        try:
            async with (
                serve(svc.app, lifespan="off") as url,
                httpx.AsyncClient(base_url=url) as http,
            ):
                yield Harness(svc, http, engine, fake, clock)
        finally:
            await svc.aclose()


async def test_the_message_log_shows_attempts_and_the_events_that_followed(
    harness: Harness,
) -> None:
    customer = "cus_log"
    case = await seed(harness.engine, customer, phone="+358401234567", consent={"sms": True})
    # the email: both providers answer 503 (twice each, every try of the round): requeued;
    # the next round is accepted by SendGrid
    harness.fake.fail_next("sendgrid", Fault.http(503), times=2)
    harness.fake.fail_next("postmark", Fault.http(503), times=2)
    await harness.command(command(customer, case, "d0_we_miss_you"))
    await harness.svc.sender.drain()
    harness.clock.advance(timedelta(seconds=ROUND_DELAY + 1))
    await harness.svc.sender.drain()
    # the SMS: Twilio refuses the number for good
    harness.fake.fail_next("twilio", twilio_error(21211, 400, "invalid 'To' number"))
    await harness.command(command(customer, case, "d1_sms", channel="sms", phone="+358401234567"))
    await harness.svc.sender.drain()
    email, sms = sorted(
        (r for r in await delivery_rows(harness.engine) if r.customer_id == customer),
        key=lambda r: r.id,
    )
    assert (email.state, sms.state) == ("sent", "failed")

    # SendGrid tells us it was delivered, then opened; the opened event is posted twice
    def sendgrid_event(event: str, event_id: str, timestamp: int) -> dict[str, Any]:
        return {
            "email": f"{customer}@example.com",
            "timestamp": timestamp,
            "event": event,
            "sg_event_id": event_id,
            "sg_message_id": f"{email.provider_message_id}.filterdrecv-1",
            "idempotency_key": email.idempotency_key,
        }

    t = int(harness.clock.now().timestamp())
    delivered = sendgrid_event("delivered", "ev-delivered", t + 5)
    opened = sendgrid_event("open", "ev-opened", t + 60)
    assert (await harness.sendgrid([opened, delivered])).status_code == 200
    assert (await harness.sendgrid([opened])).json()["duplicates"] == 1
    # an event for no delivery of ours is not in anybody's log
    stray = {**sendgrid_event("delivered", "ev-stray", t), "idempotency_key": "nope:nope"}
    stray["sg_message_id"] = "unknown-message.filterdrecv-1"
    assert (await harness.sendgrid([stray])).status_code == 200

    response = await harness.log(customer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["customer_id"] == customer
    assert body["next_cursor"] is None
    assert [m["id"] for m in body["messages"]] == [sms.id, email.id]  # newest first
    got_sms, got_email = body["messages"]

    assert got_email["state"] == "sent"
    assert got_email["provider"] == "sendgrid"
    assert got_email["provider_message_id"] == email.provider_message_id
    assert got_email["attempt_count"] == 2
    attempts = got_email["attempts"]
    assert [(a["attempt"], a["outcome"], a["response_class"]) for a in attempts] == [
        (1, "requeued", "5xx"),
        (2, "sent", "2xx"),
    ]
    assert attempts[0]["provider_message_id"] is None
    assert "503" in attempts[0]["error"]
    assert attempts[1]["provider"] == "sendgrid"
    assert attempts[1]["provider_message_id"] == email.provider_message_id
    assert attempts[1]["error"] is None
    events = got_email["events"]
    assert [(e["provider"], e["event_id"], e["kind"]) for e in events] == [
        ("sendgrid", "ev-delivered", "delivered"),
        ("sendgrid", "ev-opened", "opened"),
    ]  # in the order they happened, the repeat not twice

    assert got_sms["state"] == "failed"
    assert got_sms["channel"] == "sms"
    assert [(a["outcome"], a["response_class"]) for a in got_sms["attempts"]] == [("failed", "4xx")]
    assert "21211" in got_sms["attempts"][0]["error"]
    assert got_sms["events"] == []

    # paged by cursor, one at a time: the same messages, in the same order
    first = (await harness.log(customer, limit=1)).json()
    assert [m["id"] for m in first["messages"]] == [sms.id]
    second = (await harness.log(customer, limit=1, cursor=first["next_cursor"])).json()
    assert [m["id"] for m in second["messages"]] == [email.id]
    assert second["next_cursor"] is None
    assert second["messages"][0] == got_email

    # a customer never messaged has an empty log
    assert (await harness.log("cus_nobody")).json() == {
        "customer_id": "cus_nobody",
        "messages": [],
        "next_cursor": None,
    }


async def test_the_message_log_needs_the_api_key_and_names_a_bad_parameter(
    harness: Harness,
) -> None:
    path = "/v1/customers/cus_log/messages"
    unauthenticated = await harness.http.get(path)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["content-type"] == "application/problem+json"
    wrong = await harness.http.get(path, headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code in (401, 403)  # an unknown key: 401 with scoped keys, 403 before
    assert wrong.headers["content-type"] == "application/problem+json"

    bad_cursor = await harness.log("cus_log", cursor="not-a-cursor")
    assert bad_cursor.status_code == 422
    assert bad_cursor.headers["content-type"] == "application/problem+json"
    assert bad_cursor.json()["errors"][0]["field"] == "cursor"
    bad_limit = await harness.log("cus_log", limit=0)
    assert bad_limit.status_code == 422
    assert bad_limit.json()["errors"][0]["field"] == "query.limit"

    operation = harness.svc.app.openapi()["paths"]["/v1/customers/{customer_id}/messages"]["get"]
    assert operation["operationId"] == "listCustomerMessages"
    assert operation["security"] == [{"HTTPBearer": ["read"]}]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MessageLog"
    }
    for status in ("401", "403", "422"):
        assert "application/problem+json" in operation["responses"][status]["content"]


async def test_a_send_lost_in_a_crash_is_logged_unknown_and_erasure_clears_provider_texts(
    harness: Harness,
) -> None:
    customer = "cus_crash"
    case = await seed(harness.engine, customer)
    await harness.command(command(customer, case, "d0_we_miss_you"))
    # the dispatcher claims the delivery (``sending``) and dies before it records an answer
    claimed = await harness.svc.sender.claim()
    assert len(claimed) == 1
    harness.clock.advance(timedelta(seconds=61))  # stale_sending_seconds: 60
    assert await harness.svc.sender.recover_stale() == 1
    (message,) = (await harness.log(customer)).json()["messages"]
    ((attempt, outcome, response, error),) = [
        (a["attempt"], a["outcome"], a["response_class"], a["error"]) for a in message["attempts"]
    ]
    assert (attempt, response) == (1, "unknown")
    # unknown until reconciled (services/dispatcher/reconcile.py), not failed
    assert (outcome, message["state"]) == ("unknown", "unknown")
    assert message["unknown_since"] is not None
    assert error

    async with harness.engine.begin() as conn:
        await store.erase(conn, [customer], harness.clock.now())
    (erased,) = (await harness.log(customer)).json()["messages"]
    assert [a["error"] for a in erased["attempts"]] == [None]
    assert [(a["attempt"], a["response_class"]) for a in erased["attempts"]] == [(1, "unknown")]
