"""POST /v1/billing/paddle and /v1/billing/chargebee over real HTTP on loopback, real PostgreSQL
and Kafka: Paddle's SDK fixtures signed as Paddle signs them, Chargebee's sample event behind
HTTP Basic; stored once, refused deliveries leave nothing behind."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.clock import FrozenClock
from shared.db.tables import churn_episodes, customers, inbox, outbox
from shared.settings import Settings
from tests.support.http import serve

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "billing"
PADDLE_SECRET = "pdl_ntfset_01test_current_secret"
CB_USER, CB_PASSWORD = "winback", "chargebee-webhook-password"
T0 = datetime(2025, 11, 6, 8, 0, tzinfo=UTC)
PROBLEM = "application/problem+json"


def configured(settings: Settings) -> Settings:
    billing = settings.billing.model_validate(
        {
            # a wider window than the 5 s default: this machine is shared and slow
            "paddle": {"webhook_secrets": PADDLE_SECRET, "tolerance_seconds": 60},
            "chargebee": {"username": CB_USER, "password": CB_PASSWORD},
        }
    )
    return settings.model_copy(update={"billing": billing})


def paddle_body(event_id: str, event_type: str, data: dict[str, Any], at: datetime) -> bytes:
    body = {
        "event_id": event_id,
        "event_type": event_type,
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        "notification_id": "ntf_01hv8x2af8hbyyt8bk1cjbmtkr",
        "data": data,
    }
    return json.dumps(body).encode()


def paddle_signed(
    body: bytes, secret: str = PADDLE_SECRET, ts: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"paddle-signature": f"ts={ts};h1={mac}", "content-type": "application/json"}


def paddle_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "paddle" / f"{name}.json").read_text())
    return data


def chargebee_body(**subscription: Any) -> bytes:
    event: dict[str, Any] = json.loads(
        (FIXTURES / "chargebee" / "subscription_cancelled.json").read_text()
    )
    event["occurred_at"] = int(T0.timestamp())
    event["content"]["subscription"].update(subscription)
    return json.dumps(event).encode()


def basic(user: str = CB_USER, password: str = CB_PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}", "content-type": "application/json"}


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def test_paddle_cancellation_is_stored_once_and_refusals_leave_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    at = T0 - timedelta(minutes=1)
    body = paddle_body(
        "evt_paddle_1", "subscription.canceled", paddle_fixture("subscription.canceled"), at
    )
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        forged = await http.post(
            "/v1/billing/paddle", content=body, headers=paddle_signed(body, "pdl_attacker")
        )
        stale = await http.post(
            "/v1/billing/paddle",
            content=body,
            headers=paddle_signed(body, ts=int(time.time()) - 120),
        )
        unsigned = await http.post("/v1/billing/paddle", content=body)
        assert await count(engine, inbox) == 0
        first = await http.post("/v1/billing/paddle", content=body, headers=paddle_signed(body))
        retry = await http.post("/v1/billing/paddle", content=body, headers=paddle_signed(body))
    for refused in (forged, stale, unsigned):
        assert refused.status_code == 400, refused.text
        assert refused.headers["content-type"] == PROBLEM
    assert stale.json()["type"] == "/problems/signature-stale"
    assert (first.status_code, first.json()["duplicates"]) == (200, 0)
    assert (retry.status_code, retry.json()["duplicates"]) == (200, 1)
    async with engine.connect() as conn:
        (episode,) = (await conn.execute(churn_episodes.select())).all()
    assert episode.customer_id == "ctm_01hv6y1jedq4p1n0yqn5ba3ky4"
    assert (episode.mrr_at_churn_minor, episode.currency) == (95_000, "USD")
    assert episode.occurred_at == at
    assert (episode.source, episode.source_event_id) == ("/billing/paddle", "evt_paddle_1")


async def test_paddle_other_types_are_ignored(settings: Settings, engine: AsyncEngine) -> None:
    service = bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    body = paddle_body("evt_txn", "transaction.completed", {"id": "txn_1"}, T0)
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/billing/paddle", content=body, headers=paddle_signed(body))
    assert (answer.status_code, answer.json()["ignored"]) == (200, 1)
    assert await count(engine, inbox) == 0


async def test_chargebee_non_payment_is_a_payment_failed_churn_stored_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(configured(settings), engine=engine, clock=FrozenClock(T0))
    body = chargebee_body()
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        wrong = await http.post(
            "/v1/billing/chargebee", content=body, headers=basic(password="guess-password")
        )
        anonymous = await http.post("/v1/billing/chargebee", content=body)
        assert await count(engine, inbox) == 0
        first = await http.post("/v1/billing/chargebee", content=body, headers=basic())
        again = await http.post("/v1/billing/chargebee", content=body, headers=basic())
    for refused in (wrong, anonymous):
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"] == PROBLEM
        assert refused.headers["www-authenticate"] == 'Basic realm="winback-chargebee"'
    assert CB_PASSWORD not in wrong.text
    assert (first.status_code, first.json()["duplicates"]) == (200, 0)
    assert again.json()["duplicates"] == 1
    async with engine.connect() as conn:
        (episode,) = (await conn.execute(churn_episodes.select())).all()
        customer = (await conn.execute(customers.select())).one()
    assert episode.customer_id == "__test__XpbTXGTSRp3ELNCY"
    # the event's customer came with the cancellation: whom to write to, and when
    assert (customer.email, customer.timezone) == ("john@acme-test.com", "America/New_York")
    assert (episode.reason, episode.reason_raw) == ("payment_failed", "not_paid")
    assert (episode.mrr_at_churn_minor, episode.currency) == (2500, "USD")
    assert episode.occurred_at == T0


async def test_unconfigured_connectors_are_not_found(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine, clock=FrozenClock(T0))
    body = chargebee_body()
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url) as http:
        chargebee = await http.post("/v1/billing/chargebee", content=body, headers=basic())
        paddle = await http.post("/v1/billing/paddle", content=body, headers=paddle_signed(body))
    for answer in (chargebee, paddle):
        assert answer.status_code == 404
        assert answer.headers["content-type"] == PROBLEM
    for table in (inbox, customers, outbox):
        assert await count(engine, table) == 0
