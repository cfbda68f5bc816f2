"""POST /v1/events and the ops endpoints, over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.cloudevents import CloudEvent
from shared.db.engine import make_engine
from shared.db.tables import churn_episodes, customers
from shared.messaging.pipeline import Incoming, Tx
from shared.settings import DEV_SECRET, Settings
from tests.support.http import serve
from tests.support.kafka import cloudevent

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}


def cancel(customer: str, **extra: Any) -> dict[str, Any]:
    return cloudevent(
        "subscription.cancelled", {"customer_id": customer, "reason": "budget", **extra}
    )


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def episodes(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(churn_episodes)) or 0)


async def test_one_event_is_stored_and_answered_202_and_a_repeat_is_a_duplicate(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    event = cancel("cus_h1")
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        first = await http.post(
            "/v1/events", json=event, headers={"content-type": "application/cloudevents+json"}
        )
        again = await http.post("/v1/events", json=event)
    assert first.status_code == 202
    assert first.json() == {"accepted": 1, "duplicates": 0}
    assert again.status_code == 202
    assert again.json() == {"accepted": 0, "duplicates": 1}
    assert await episodes(engine) == 1


async def test_a_batch_and_the_binary_mode_are_accepted(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    binary = cancel("cus_bin")
    headers = {f"ce-{k}": str(v) for k, v in binary.items() if k not in ("data", "datacontenttype")}
    async with serve(service.app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        batch = await http.post(
            "/v1/events",
            json=[cancel("cus_b1"), cancel("cus_b2")],
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        one = await http.post(
            "/v1/events",
            json=binary["data"],
            headers={**headers, "content-type": "application/json"},
        )
    assert batch.status_code == 202
    assert batch.json()["accepted"] == 2
    assert one.status_code == 202
    async with engine.connect() as conn:
        ids = set((await conn.execute(select(customers.c.id))).scalars())
    assert ids == {"cus_b1", "cus_b2", "cus_bin"}


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        (b"{not json", "body", "malformed-json"),
        (
            {"specversion": "1.0", "source": "/x", "type": "com.example.user.active"},
            "id",
            "missing-attribute",
        ),
        (cloudevent("invoice.paid", {"customer_id": "c"}), "type", "unknown-type"),
        (
            cloudevent("subscription.cancelled", {"reason": "x"}),
            "data.customer_id",
            "invalid-payload",
        ),
        (
            cloudevent(
                "subscription.cancelled",
                {"customer_id": "c", "customer": {"email": "not-an-email"}},
            ),
            "data.customer.email",
            "invalid-payload",
        ),
        (
            [cancel("ok"), cloudevent("subscription.cancelled", {"customer_id": ""})],
            "[1].data.customer_id",
            "invalid-payload",
        ),
        (
            cloudevent(
                "subscription.cancelled",
                {"customer_id": "c"},
                time=datetime.now(UTC) + timedelta(days=2),
            ),
            "time",
            "future-time",
        ),
        # out of range, limits, NUL: each a 422 naming the field, never a 500
        (
            cloudevent(
                "subscription.cancelled", {"customer_id": "c"}, time="0001-01-01T00:00:00+01:00"
            ),
            "time",
            "invalid-attribute",
        ),
        (
            cloudevent(
                "subscription.cancelled", {"customer_id": "c"}, time="9999-12-31T23:59:59-01:00"
            ),
            "time",
            "invalid-attribute",
        ),
        (
            cloudevent("subscription.cancelled", {"customer_id": "c"}, time="2999-01-01T00:00:00Z"),
            "time",
            "invalid-attribute",
        ),
        (cancel("c") | {"id": "evt\u0000x"}, "id", "invalid-attribute"),
        (
            cloudevent("subscription.cancelled", {"customer_id": "c\u0000"}),
            "data.customer_id",
            "invalid-payload",
        ),
        (
            [
                cancel("ok"),
                cloudevent(
                    "subscription.cancelled",
                    {
                        "customer_id": "c",
                        "customer": {"customer_since": "0001-01-01T00:00:00+01:00"},
                    },
                ),
            ],
            "[1].data.customer.customer_since",
            "invalid-payload",
        ),
        (cancel("c") | {"source": "/" + "s" * 100_000}, "source", "invalid-attribute"),
        (cancel("c", mrr_minor=2**63), "data.mrr_minor", "invalid-payload"),
        (
            cloudevent(
                "subscription.cancelled", {"customer_id": "c", "customer": {"mrr_minor": 10**30}}
            ),
            "data.customer.mrr_minor",
            "invalid-payload",
        ),
        (cancel("c", comment="fine\u0000"), "data.comment", "invalid-payload"),
        (cancel("c", extra=nested(40)), "body", "too-deep"),
    ],
)
async def test_bad_input_is_a_422_problem_naming_the_field_and_stores_nothing(
    settings: Settings, engine: AsyncEngine, body: Any, field: str, code: str
) -> None:
    service = bootstrap(settings, engine=engine)
    async with (
        serve(service.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
    ):
        if isinstance(body, bytes):
            response = await http.post("/v1/events", content=body)
        else:
            response = await http.post("/v1/events", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert problem["type"] == f"/problems/{code}"
    assert problem["errors"][0]["field"] == field
    assert field in problem["detail"]
    assert await episodes(engine) == 0


class DecoderWithABug:
    """Ingest's handler, except that decoding customer "bug" raises what no validator
    expected — the stand-in for a bug meeting input nobody foresaw."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, event: CloudEvent) -> Any:
        if isinstance(event.data, dict) and event.data.get("customer_id") == "bug":
            raise KeyError("not foreseen")
        return self.inner.decode(event)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        await self.inner.handle(tx, items)


async def test_an_unexpected_exception_while_decoding_is_a_4xx_naming_the_event_not_a_500(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    service.pipeline.handler = DecoderWithABug(service.pipeline.handler)
    async with (
        serve(service.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
    ):
        response = await http.post("/v1/events", json=[cancel("fine"), cancel("bug")])
        still_fine = await http.post("/v1/events", json=cancel("fine"))
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/decode-error"
    assert problem["errors"][0]["field"] == "[1]"
    assert problem["errors"][0]["reason"].startswith("KeyError")
    assert still_fine.status_code == 202
    assert await episodes(engine) == 1


async def test_the_api_needs_a_valid_bearer_token(settings: Settings, engine: AsyncEngine) -> None:
    service = bootstrap(settings, engine=engine)
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        none = await http.post("/v1/events", json=cancel("c"))
        wrong = await http.post(
            "/v1/events", json=cancel("c"), headers={"authorization": "Bearer nope"}
        )
        health = await http.get("/health")
        metrics = await http.get("/metrics")
        openapi = await http.get("/openapi.json")
    assert none.status_code == 401
    assert none.headers["content-type"] == "application/problem+json"
    assert wrong.status_code == 401  # a key it does not know; 403 is a known key's scope
    assert health.status_code == 200
    assert metrics.status_code == 200
    assert "winback_events_consumed_total" in metrics.text
    assert "/v1/events" in openapi.json()["paths"]


async def test_ready_is_503_naming_the_unreachable_database(settings: Settings) -> None:
    dead = make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none", pool_size=1)
    service = bootstrap(settings, engine=dead)
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/ready")
    await dead.dispose()
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    assert ready.json()["errors"][0]["field"] == "database"
    # a fixed reason: the driver's error (host, port, user) goes to the log only
    assert ready.json()["errors"][0]["reason"] == "unreachable"
    assert "database: unreachable" in ready.json()["detail"]


async def test_ready_is_200_when_database_and_kafka_answer(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == ["database", "kafka"]
