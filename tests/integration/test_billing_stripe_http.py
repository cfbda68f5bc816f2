"""POST /v1/billing/stripe over real HTTP on loopback, real PostgreSQL and Kafka, with Stripe's
own objects (stripe-mock's fixtures) signed by Stripe's own library: verified deliveries are
stored once, everything else is refused or ignored and leaves nothing behind; end to end, a
cancellation opens a case whose day-0 email goes out, and a new subscription closes it."""

from __future__ import annotations

import base64
import copy
import email
import email.policy
import json
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from services.scheduler.domain import in_holdout
from shared.clock import FrozenClock
from shared.db.tables import cases, churn_episodes, customers, deliveries, inbox, outbox
from shared.settings import Settings
from tests.support.dispatcher import with_dispatcher
from tests.support.http import serve
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "billing" / "stripe"
SECRET = "whsec_test_current_for_winback_tests"
OLD_SECRET = "whsec_test_previous_for_winback_tests"
T0 = datetime(2026, 11, 20, 10, 0, 5, tzinfo=UTC)  # 12:00 in Helsinki
PROBLEM = "application/problem+json"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def configured(settings: Settings, **stripe_settings: Any) -> Settings:
    billing = settings.billing.model_validate(
        {"stripe": {"webhook_secrets": f"{SECRET},{OLD_SECRET}", **stripe_settings}}
    )
    return settings.model_copy(update={"billing": billing})


def stripe_event(
    event_id: str, kind: str, obj: dict[str, Any], created: datetime, **extra: Any
) -> bytes:
    """A webhook body as Stripe sends it: the event envelope around ``obj``."""
    body = {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(created.timestamp()),
        "data": {"object": obj, **extra},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }
    return json.dumps(body).encode()


def cancelled(sub: dict[str, Any], customer: str, at: datetime, **details: Any) -> dict[str, Any]:
    sub = copy.deepcopy(sub)
    sub.update(
        {
            "customer": customer,
            "status": "canceled",
            "trial_end": None,
            "canceled_at": int(at.timestamp()),
            "ended_at": int(at.timestamp()),
            "cancellation_details": {
                "comment": None,
                "feedback": "too_expensive",
                "reason": "cancellation_requested",
                **details,
            },
        }
    )
    return sub


def signed(body: bytes, secret: str = SECRET, t: int | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, t)
    return {"stripe-signature": header, "content-type": "application/json"}


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "winback_billing_webhooks_total", {"provider": "stripe", "outcome": outcome}
    )
    return value or 0.0


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


def not_in_holdout(prefix: str, playbook: str, share: float = 0.05) -> str:
    for i in range(1000):
        cid = f"{prefix}{i}"
        if not in_holdout(cid, playbook, share):
            return cid
    raise AssertionError("no customer outside the holdout")


async def test_an_unconfigured_connector_is_not_found(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(settings, engine=engine)
    body = stripe_event("evt_off", "customer.subscription.deleted", fixture("subscription"), T0)
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
    assert answer.status_code == 404
    assert answer.headers["content-type"] == PROBLEM
    assert "not configured" in answer.json()["detail"]
    assert await count(engine, inbox) == 0


async def test_a_signed_cancellation_is_stored_once_and_a_retry_is_a_duplicate(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    churned = T0 - timedelta(minutes=2)
    sub = cancelled(fixture("subscription"), "cus_Stripe1", churned, comment="Too pricey")
    body = stripe_event("evt_cancel_1", "customer.subscription.deleted", sub, churned)
    accepted, duplicates = counted("accepted"), counted("duplicate")
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
        # Stripe retries with a fresh signature (new t), same event id; and with the old secret
        retry = await http.post(
            "/v1/billing/stripe", content=body, headers=signed(body, OLD_SECRET)
        )
    assert (first.status_code, first.json()) == (
        200,
        {"received": 1, "duplicates": 0, "ignored": 0, "dead_lettered": 0},
    )
    assert (retry.status_code, retry.json()["duplicates"]) == (200, 1)
    assert counted("accepted") == accepted + 1
    assert counted("duplicate") == duplicates + 1
    async with engine.connect() as conn:
        (episode,) = (await conn.execute(churn_episodes.select())).all()
        customer = (await conn.execute(customers.select())).one()
    assert episode.customer_id == "cus_Stripe1"
    assert (episode.reason, episode.reason_raw) == ("price", "too_expensive")
    assert episode.comment == "Too pricey"
    assert (episode.mrr_at_churn_minor, episode.currency) == (2000, "USD")
    assert episode.occurred_at == churned  # the event's created, not the arrival
    assert (episode.source, episode.source_event_id) == ("/billing/stripe", "evt_cancel_1")
    assert customer.status == "churned"


async def test_payment_failed_is_its_own_reason(settings: Settings, engine: AsyncEngine) -> None:
    service = ingest_bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    sub = cancelled(
        fixture("subscription"), "cus_Dunned", T0, feedback=None, reason="payment_failed"
    )
    body = stripe_event("evt_dunned", "customer.subscription.deleted", sub, T0)
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
    assert answer.status_code == 200
    async with engine.connect() as conn:
        episode = (await conn.execute(churn_episodes.select())).one()
    assert (episode.reason, episode.reason_raw) == ("payment_failed", "payment_failed")


async def test_forged_stale_tampered_and_unsigned_deliveries_leave_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    sub = cancelled(fixture("subscription"), "cus_Forged", T0)
    body = stripe_event("evt_forged", "customer.subscription.deleted", sub, T0)
    before = {k: counted(f"signature_{k}") for k in ("invalid", "stale", "missing")}
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        forged = await http.post(
            "/v1/billing/stripe", content=body, headers=signed(body, "whsec_attacker")
        )
        # a captured genuine delivery replayed after the 300 s tolerance
        replayed = await http.post(
            "/v1/billing/stripe", content=body, headers=signed(body, t=int(time.time()) - 301)
        )
        tampered = await http.post(
            "/v1/billing/stripe",
            content=body.replace(b"cus_Forged", b"cus_Victim"),
            headers=signed(body),
        )
        unsigned = await http.post(
            "/v1/billing/stripe", content=body, headers={"content-type": "application/json"}
        )
    for answer in (forged, replayed, tampered, unsigned):
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"] == PROBLEM
    assert replayed.json()["type"] == "/problems/signature-stale"
    assert forged.json()["type"] == "/problems/signature-invalid"
    assert unsigned.json()["type"] == "/problems/signature-missing"
    assert SECRET not in forged.text
    assert counted("signature_invalid") == before["invalid"] + 2
    assert counted("signature_stale") == before["stale"] + 1
    assert counted("signature_missing") == before["missing"] + 1
    for table in (inbox, churn_episodes, customers, outbox):
        assert await count(engine, table) == 0, table.name


async def test_other_types_are_answered_200_and_ignored(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_X", "status": "paid"}
    body = stripe_event("evt_invoice", "invoice.paid", invoice, T0)
    ignored = counted("ignored")
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
        not_json = await http.post("/v1/billing/stripe", content=b"{oops", headers=signed(b"{oops"))
    assert (answer.status_code, answer.json()["ignored"]) == (200, 1)
    assert counted("ignored") == ignored + 1
    assert not_json.status_code == 400
    assert not_json.headers["content-type"] == PROBLEM
    for table in (inbox, churn_episodes, outbox):
        assert await count(engine, table) == 0, table.name


async def test_a_verified_event_our_contract_refuses_is_dead_lettered_not_lost(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    ahead = T0 + timedelta(days=1)  # the sender's clock is a day ahead of ours
    sub = cancelled(fixture("subscription"), "cus_Future", ahead)
    body = stripe_event("evt_future", "customer.subscription.deleted", sub, ahead)
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
    assert (answer.status_code, answer.json()["dead_lettered"]) == (200, 1)
    async with engine.connect() as conn:
        (row,) = (await conn.execute(outbox.select())).all()
    assert row.topic == settings.topics.dead_letter
    assert row.value == body
    headers = {name: base64.b64decode(value) for name, value in row.headers}
    assert headers["winback-dlq-error-code"] == b"future_time"
    assert headers["winback-dlq-error-field"] == b"time"
    assert await count(engine, churn_episodes) == 0


async def test_the_vendored_fixtures_are_what_stripe_mock_serves(stripe_mock: str) -> None:
    async with httpx.AsyncClient(
        base_url=stripe_mock, headers={"authorization": "Bearer sk_test_123"}
    ) as http:
        sub = (await http.get("/v1/subscriptions/sub_123")).json()
        customer = (await http.get("/v1/customers/cus_123")).json()
    assert sub == fixture("subscription")
    assert customer == fixture("customer")


async def test_a_stripe_cancellation_opens_a_case_sends_day_0_and_a_new_subscription_closes_it(
    settings: Settings, engine: AsyncEngine, stripe_mock: str, tmp_path: Path
) -> None:
    cid = not_in_holdout("cus_E2e", "price_discount")
    async with httpx.AsyncClient(
        base_url=stripe_mock, headers={"authorization": "Bearer sk_test_123"}
    ) as mock:
        sub = (await mock.get("/v1/subscriptions/sub_123")).json()
        customer = (await mock.get("/v1/customers/cus_123")).json()
    customer.update(
        {
            "id": cid,
            "email": "aino@example.fi",
            "name": "Aino",
            "preferred_locales": ["en"],
            "address": {**customer["address"], "country": "FI"},
        }
    )
    churned = T0 - timedelta(seconds=5)
    back = T0 + timedelta(days=2)
    returned = copy.deepcopy(sub)
    returned.update({"customer": cid, "status": "active", "canceled_at": None, "ended_at": None})
    bodies = [
        stripe_event("evt_e2e_customer", "customer.created", customer, churned - timedelta(1)),
        stripe_event(
            "evt_e2e_cancel",
            "customer.subscription.deleted",
            cancelled(sub, cid, churned),
            churned,
        ),
    ]
    folder = tmp_path / "messages"
    config = with_dispatcher(
        configured(settings),
        {
            "email": {"primary": {"kind": "file", "directory": str(folder)}},
            "public_base_url": "https://winback.example.com",
            "poll_seconds": 0.02,
        },
    )
    clock = FrozenClock(T0)
    ingest = ingest_bootstrap(config, engine=engine, clock=clock)
    scheduler = scheduler_bootstrap(config, engine=engine, clock=clock)
    dispatcher = dispatcher_bootstrap(config, engine=engine, clock=clock)

    async def case() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(cases.select().where(cases.c.customer_id == cid))).first()

    async def day_0() -> list[Any]:
        async with engine.connect() as conn:
            return list(
                await conn.execute(deliveries.select().where(deliveries.c.customer_id == cid))
            )

    async with AsyncExitStack() as stack:
        for service in (ingest, scheduler, dispatcher):
            await stack.enter_async_context(running(service.core.runtime))
        base = await stack.enter_async_context(serve(ingest.app, lifespan="off"))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base))
        answers = [
            await http.post("/v1/billing/stripe", content=body, headers=signed(body))
            for body in bodies
        ]
        opened = await eventually(case, lambda row: row is not None, 60)
        sent = await eventually(
            day_0, lambda rows: bool(rows) and rows[0].state not in ("queued", "sending"), 60
        )
        clock.set(back)
        body = stripe_event("evt_e2e_back", "customer.subscription.created", returned, back)
        back_answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
        closed = await eventually(case, lambda row: row.status == "closed", 60)

    assert [a.status_code for a in answers] == [200, 200]
    assert back_answer.status_code == 200
    assert opened.playbook == "price_discount"
    assert opened.segment["reason"] == "price"
    (delivery,) = sent
    assert (delivery.state, delivery.provider) == ("sent", "file")
    (path,) = (folder / "email").glob("*.eml")
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "aino@example.fi"
    assert closed.close_reason == "returned"
    async with engine.connect() as conn:
        row = (await conn.execute(customers.select().where(customers.c.id == cid))).one()
    assert row.timezone == "Europe/Helsinki"  # from the address country
    assert row.status == "active"


async def test_a_dunning_cancellation_gets_the_payment_failed_track_and_its_email(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    cid = not_in_holdout("cus_Dun", "payment_failed")
    # an expanded customer: the cancellation alone says whom to write to
    customer = {
        **fixture("customer"),
        "id": cid,
        "email": "dunned@example.fi",
        "address": {**fixture("customer")["address"], "country": "FI"},
    }
    sub = cancelled(fixture("subscription"), cid, T0, feedback=None, reason="payment_failed")
    sub["customer"] = customer
    body = stripe_event("evt_dun_track", "customer.subscription.deleted", sub, T0)
    folder = tmp_path / "messages"
    config = with_dispatcher(
        configured(settings),
        {
            "email": {"primary": {"kind": "file", "directory": str(folder)}},
            "public_base_url": "https://winback.example.com",
            "poll_seconds": 0.02,
        },
    )
    clock = FrozenClock(T0)
    ingest = ingest_bootstrap(config, engine=engine, clock=clock)
    scheduler = scheduler_bootstrap(config, engine=engine, clock=clock)
    dispatcher = dispatcher_bootstrap(config, engine=engine, clock=clock)

    async def case() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(cases.select().where(cases.c.customer_id == cid))).first()

    async def sent() -> list[Any]:
        async with engine.connect() as conn:
            return list(
                await conn.execute(deliveries.select().where(deliveries.c.customer_id == cid))
            )

    async with AsyncExitStack() as stack:
        for service in (ingest, scheduler, dispatcher):
            await stack.enter_async_context(running(service.core.runtime))
        base = await stack.enter_async_context(serve(ingest.app, lifespan="off"))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base))
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
        opened = await eventually(case, lambda row: row is not None, 60)
        (delivery,) = await eventually(
            sent, lambda rows: bool(rows) and rows[0].state not in ("queued", "sending"), 60
        )
    assert answer.status_code == 200
    assert opened.playbook == "payment_failed"
    assert opened.segment["reason"] == "payment_failed"
    assert (delivery.state, delivery.step_key) == ("sent", "d0_update_card")
    (path,) = (folder / "email").glob("*.eml")
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "dunned@example.fi"
    assert "failed payment" in message["Subject"]
    text = message.get_body(("plain",))
    assert text is not None
    assert "Update your card" in text.get_content()
    assert "%" not in text.get_content()  # no discount anywhere


async def test_with_a_customer_id_key_the_merchants_own_id_is_the_customer(
    settings: Settings, engine: AsyncEngine
) -> None:
    config = configured(settings, customer_id_key="app_user_id")
    service = ingest_bootstrap(config, engine=engine, clock=FrozenClock(T0))
    sub = cancelled(fixture("subscription"), "cus_Mapped", T0)
    sub["metadata"] = {"app_user_id": "user-7"}
    body = stripe_event("evt_mapped", "customer.subscription.deleted", sub, T0)
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
    assert answer.status_code == 200
    async with engine.connect() as conn:
        episode = (await conn.execute(churn_episodes.select())).one()
    assert episode.customer_id == "user-7"
