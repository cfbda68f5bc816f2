"""``winback billing backfill paddle``: Paddle's API as a Paddle-shaped loopback server (Paddle
has no official mock server) serving the Paddle SDK's own fixtures, read through the SDK's
session; the real broker. Pages, a 429, a failure mid-way and the resume; the customers'
profiles riding along; the webhook's own event id while Paddle keeps the event; every event
decodes strictly through the inbound contract."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from requests import HTTPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.ingest.billing import backfill
from shared.cloudevents import from_kafka
from shared.contracts import registry
from shared.messaging.kafka import KafkaTransport
from shared.settings import Settings
from tests.integration.test_billing_backfill_cli import winback_backfill
from tests.support.http import serve
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "billing" / "paddle"
SINCE = datetime(2025, 11, 1, tzinfo=UTC)
FAST = dataclasses.replace(backfill.RATE_LIMITED, first_delay=0.01, max_delay=0.05)
KEY = "pdl_sdbx_apikey_test_4242"


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return value


def rfc3339(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def canceled(sub_id: str, customer_id: str, ended: datetime) -> dict[str, Any]:
    sub = fixture("subscription.canceled")
    sub.update({"id": sub_id, "customer_id": customer_id, "canceled_at": rfc3339(ended)})
    sub["custom_data"] = {"cancellation_reason": "too_expensive"}
    return sub


def customer(customer_id: str) -> dict[str, Any]:
    found = fixture("customer.created")
    found.update({"id": customer_id, "email": f"{customer_id}@example.com", "locale": "fi"})
    return found


@dataclass
class FakePaddle:
    """Paddle's list endpoints (``after`` cursor, ``per_page``, ``meta.pagination``) over
    ``subs``; ``live``: customer id → their live subscriptions; ``throttle`` / ``refuse``: the
    ``after`` values of canceled-subscription pages answered once with a 429 / a 400."""

    subs: list[dict[str, Any]]
    customers: list[dict[str, Any]]
    live: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    throttle: set[str | None] = field(default_factory=set)
    refuse: set[str | None] = field(default_factory=set)
    requests: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def subscriptions(request: Request) -> JSONResponse:
            query = dict(request.query_params)
            self.requests.append((request.url.path, query, dict(request.headers)))
            if query.get("customer_id"):
                wanted = query["customer_id"].split(",")
                assert query["status"] == "active,trialing,past_due"
                return page([s for c in wanted for s in self.live.get(c, [])], False)
            after = query.get("after")
            if after in self.throttle:
                self.throttle.discard(after)
                return problem(429, "too_many_requests")
            if after in self.refuse:
                self.refuse.discard(after)
                return problem(400, "bad_request")
            ids = [s["id"] for s in self.subs]
            start = ids.index(after) + 1 if after else 0
            size = int(query["per_page"])
            more = start + size < len(self.subs)
            return page(self.subs[start : start + size], more, total=len(self.subs))

        async def customers(request: Request) -> JSONResponse:
            query = dict(request.query_params)
            self.requests.append((request.url.path, query, dict(request.headers)))
            wanted = set(query["id"].split(","))
            return page([c for c in self.customers if c["id"] in wanted], False)

        async def events(request: Request) -> JSONResponse:
            query = dict(request.query_params)
            self.requests.append((request.url.path, query, dict(request.headers)))
            assert query["event_type"] == "subscription.canceled"
            return page(self.events, False)

        return Starlette(
            routes=[
                Route("/subscriptions", subscriptions),
                Route("/customers", customers),
                Route("/events", events),
            ]
        )

    def pages_asked(self) -> list[str | None]:
        return [
            q.get("after")
            for p, q, _ in self.requests
            if p == "/subscriptions" and "customer_id" not in q and q["per_page"] != "1"
        ]


def page(data: list[dict[str, Any]], more: bool, total: int | None = None) -> JSONResponse:
    pagination = {"per_page": 2, "next": "", "has_more": more, "estimated_total": total or 0}
    return JSONResponse({"data": data, "meta": {"request_id": "req_1", "pagination": pagination}})


def problem(status: int, code: str) -> JSONResponse:
    body = {"type": "request_error", "code": code, "detail": code, "documentation_url": ""}
    return JSONResponse({"error": body, "meta": {"request_id": "r"}}, status_code=status)


async def test_pages_a_429_and_an_interruption_resume_and_every_event_decodes(
    settings: Settings, tmp_path: Path
) -> None:
    ended = SINCE + timedelta(days=30)
    subs = [canceled(f"sub_{i}", f"ctm_{i}", ended - timedelta(hours=i)) for i in range(5)]
    subs[4] = canceled("sub_4", "ctm_4", SINCE - timedelta(days=1))  # ended before --since
    live = {"ctm_2": [{"id": "sub_new", "customer_id": "ctm_2", "status": "active"}]}
    webhook = {
        "event_id": "evt_paddle_3",
        "event_type": "subscription.canceled",
        "occurred_at": rfc3339(ended - timedelta(hours=3) + timedelta(seconds=1)),
        "data": copy.deepcopy(subs[3]),
    }
    fake = FakePaddle(
        subs,
        [customer(f"ctm_{i}") for i in range(5)],
        live=live,
        events=[webhook],
        throttle={"sub_1"},
        refuse={"sub_3"},
    )
    topic = settings.topics.inbound[0]
    transport = KafkaTransport(settings.kafka.bootstrap_servers)
    await transport.ensure_topics([topic], settings.topics.partitions)
    checkpoint = backfill.Checkpoint(tmp_path / "cp.json")
    job = backfill.Run(SINCE, topic, settings.ingest.event_type_prefix, checkpoint)

    async def run() -> backfill.Counts:
        source = backfill.PaddleSource(KEY, base, page_size=2, rate_limited=FAST)
        publisher = transport.publisher()
        await publisher.start()
        try:
            return await backfill.backfill(source, publisher, job)
        finally:
            await publisher.stop()
            await source.close()

    async with serve(fake.app(), lifespan="off") as base:
        with pytest.raises(HTTPError):
            await run()
        assert checkpoint.load().after == "sub_3"  # two pages published; the third refused
        assert fake.pages_asked() == [None, "sub_1", "sub_1", "sub_3"]  # the 429, retried
        counts = await run()
        assert fake.pages_asked()[4:] == ["sub_3"]  # resumed after what was done
    assert (counts.read, counts.published, counts.active_again, counts.before_since) == (5, 3, 1, 1)
    assert counts.total == 5  # Paddle's estimated_total: the progress bar's ETA
    # the SDK's session: our key, Paddle's API version
    for _, _, headers in fake.requests:
        assert headers["authorization"] == f"Bearer {KEY}"
        assert headers["paddle-version"] == "1"

    events = [
        from_kafka(r.value, r.headers)
        for r in await read_all(settings.kafka.bootstrap_servers, topic, 3)
    ]
    by_id = {e.id: e for e in events}
    assert sorted(by_id) == [
        "backfill:paddle:sub_0:cancelled",
        "backfill:paddle:sub_1:cancelled",
        "evt_paddle_3",  # the webhook's own event: the inbox takes the two as one
    ]
    assert by_id["backfill:paddle:sub_1:cancelled"].time == ended - timedelta(hours=1)
    assert by_id["evt_paddle_3"].time == ended - timedelta(hours=3) + timedelta(seconds=1)
    for event in events:
        assert event.source == "/billing/paddle"
        registry.decode(
            event.type, event.data, inbound_prefix=settings.ingest.event_type_prefix, tolerant=False
        )
        assert event.type == f"{settings.ingest.event_type_prefix}.subscription.cancelled"
        assert event.data["reason"] == "too_expensive"
        cid = event.data["customer_id"]
        assert event.data["customer"]["email"] == f"{cid}@example.com"  # the profile rides along
        assert event.data["customer"]["locale"] == "fi"


async def test_a_refused_key_is_named_without_the_key(tmp_path: Path) -> None:
    async def refuse(request: Request) -> JSONResponse:
        return problem(403, "forbidden " + request.headers["authorization"])

    app = Starlette(routes=[Route("/subscriptions", refuse), Route("/events", refuse)])
    async with serve(app, lifespan="off") as base:
        source = backfill.PaddleSource(KEY, base, rate_limited=FAST)
        try:
            with pytest.raises(backfill.BackfillError, match="Paddle refused the API key") as e:
                await source.prepare(SINCE)
        finally:
            await source.close()
    assert KEY not in str(e.value)


async def test_the_command_backfills_paddle(settings: Settings, tmp_path: Path) -> None:
    ended = SINCE + timedelta(days=3)
    fake = FakePaddle([canceled("sub_c", "ctm_c", ended)], [customer("ctm_c")])
    topic = settings.topics.inbound[0]
    await KafkaTransport(settings.kafka.bootstrap_servers).ensure_topics([topic], 1)
    env = {
        "WINBACK_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "WINBACK_TOPICS__INBOUND": topic,
        "WINBACK_BILLING__PADDLE__API_KEY": KEY,
    }
    args = ("paddle", "--since", "2025-11-01")
    async with serve(fake.app(), lifespan="off") as base:
        code, out, err = await winback_backfill(env, *args, "--api-base", base, cache=tmp_path)
    assert code == 0, err
    assert out.startswith(f"paddle: 1 canceled subscriptions read, 1 events published to {topic}")
    [record] = await read_all(settings.kafka.bootstrap_servers, topic, 1)
    assert from_kafka(record.value, record.headers).id == "backfill:paddle:sub_c:cancelled"
    [checkpoint] = (tmp_path / "backfill").iterdir()
    assert checkpoint.name.startswith("paddle-")

    no_key = {**env, "WINBACK_BILLING__PADDLE__API_KEY": ""}
    code, _, err = await winback_backfill(no_key, *args, cache=tmp_path)
    assert code == 2
    assert "WINBACK_BILLING__PADDLE__API_KEY" in err
