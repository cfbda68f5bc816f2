"""``winback billing backfill stripe``: over real HTTP (Stripe's official mock server, and a
Stripe-shaped loopback server where stripe-mock cannot show it — pages, a 429, a failure mid-way),
the real broker and, downstream, ingest and the scheduler on the real database.

stripe-mock answers every list with its one fixture whatever the filters, so against it we test
what it can tell: every request the command makes passes its OpenAPI validation (a parameter
it does not know is a 400, which fails the run), and what comes back is published as an event
that decodes strictly through the inbound contract."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.ingest.billing import backfill
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from shared.cloudevents import from_kafka
from shared.contracts import registry
from shared.db.tables import churn_episodes, customers
from shared.messaging.kafka import KafkaPublisher, KafkaTransport
from shared.settings import Settings
from tests.integration.test_billing_stripe_http import configured, signed, stripe_event
from tests.integration.test_scheduler_flow import not_in_holdout, system
from tests.support.http import serve
from tests.support.kafka import cloudevent, produce, read_all, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "billing" / "stripe"
SINCE = datetime(2025, 11, 1, tzinfo=UTC)
FAST = dataclasses.replace(backfill.RATE_LIMITED, first_delay=0.01, max_delay=0.05)


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return value


def canceled(sub_id: str, customer_id: str, ended: datetime, **changes: Any) -> dict[str, Any]:
    """Stripe's Subscription fixture (stripe-mock's), canceled at ``ended`` over price, with
    its customer (in Finland) expanded as the backfill asks."""
    sub = fixture("subscription")
    customer = fixture("customer")
    customer.update(
        {
            "id": customer_id,
            "email": f"{customer_id.lower()}@example.fi",
            "preferred_locales": ["en"],
            "address": {**customer["address"], "country": "FI"},
            "subscriptions": {"object": "list", "data": [], "has_more": False, "url": "/v1/x"},
        }
    )
    at = int(ended.timestamp())
    sub.update(
        {
            "id": sub_id,
            "status": "canceled",
            "trial_end": None,
            "trial_start": None,
            "created": at - 200 * 86_400,
            "canceled_at": at,
            "ended_at": at,
            "customer": customer,
            "cancellation_details": {
                "comment": None,
                "feedback": "too_expensive",
                "feedback_option": None,
                "reason": "cancellation_requested",
            },
        }
    )
    sub.update(changes)
    return sub


@dataclass
class FakeStripe:
    """Stripe's list, search and events endpoints over ``subs`` (newest first, as Stripe
    lists them), paged by ``limit`` and ``starting_after``. ``throttle`` / ``refuse``: the
    ``starting_after`` values answered once with a 429 / a 400."""

    subs: list[dict[str, Any]]
    deletions: list[dict[str, Any]] = field(default_factory=list)
    throttle: set[str | None] = field(default_factory=set)
    refuse: set[str | None] = field(default_factory=set)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def subscriptions(request: Request) -> JSONResponse:
            query = dict(request.query_params)
            self.requests.append((request.url.path, query))
            after = query.get("starting_after")
            if after in self.throttle:
                self.throttle.discard(after)
                return error(429, "rate_limit_error", "Too many requests")
            if after in self.refuse:
                self.refuse.discard(after)
                return error(400, "invalid_request_error", "refused once")
            ids = [s["id"] for s in self.subs]
            start = ids.index(after) + 1 if after else 0
            limit = int(query["limit"])
            page = self.subs[start : start + limit]
            more = start + limit < len(self.subs)
            return listed(page, more, "/v1/subscriptions")

        async def search(request: Request) -> JSONResponse:
            self.requests.append((request.url.path, dict(request.query_params)))
            body = {"object": "search_result", "data": [], "has_more": False}
            return JSONResponse({**body, "url": request.url.path, "total_count": len(self.subs)})

        async def events(request: Request) -> JSONResponse:
            self.requests.append((request.url.path, dict(request.query_params)))
            return listed(self.deletions, False, "/v1/events")

        return Starlette(
            routes=[
                Route("/v1/subscriptions", subscriptions),
                Route("/v1/subscriptions/search", search),
                Route("/v1/events", events),
            ]
        )

    def pages_asked(self) -> list[str | None]:
        return [q.get("starting_after") for p, q in self.requests if p == "/v1/subscriptions"]


def listed(data: list[dict[str, Any]], more: bool, url: str) -> JSONResponse:
    return JSONResponse({"object": "list", "data": data, "has_more": more, "url": url})


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


@asynccontextmanager
async def publishing(settings: Settings, topic: str) -> AsyncIterator[KafkaPublisher]:
    transport = KafkaTransport(settings.kafka.bootstrap_servers)
    await transport.ensure_topics([topic], settings.topics.partitions)
    publisher = transport.publisher()
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


async def run_backfill(
    settings: Settings,
    api_base: str,
    checkpoint: Path,
    *,
    since: datetime = SINCE,
    restart: bool = False,
    page_size: int = 100,
) -> backfill.Counts:
    topic = settings.topics.inbound[0]
    source = backfill.StripeSource(
        "sk_test_123", api_base, page_size=page_size, max_network_retries=0, rate_limited=FAST
    )
    job = backfill.Run(
        since=since,
        topic=topic,
        type_prefix=settings.ingest.event_type_prefix,
        checkpoint=backfill.Checkpoint(checkpoint),
        restart=restart,
    )
    try:
        async with publishing(settings, topic) as publisher:
            return await backfill.backfill(source, publisher, job)
    finally:
        await source.close()


async def published(settings: Settings, expect: int) -> list[Any]:
    records = await read_all(settings.kafka.bootstrap_servers, settings.topics.inbound[0], expect)
    return [from_kafka(r.value, r.headers) for r in records]


async def test_stripe_mock_accepts_every_request_and_the_event_decodes_through_the_contract(
    settings: Settings, stripe_mock: str, tmp_path: Path
) -> None:
    # stripe-mock's fixture subscription ended in 2009 (1234567890)
    counts = await run_backfill(
        settings, stripe_mock, tmp_path / "cp.json", since=datetime(2009, 1, 1, tzinfo=UTC)
    )
    assert (counts.read, counts.published, counts.skipped) == (1, 1, 0)
    assert counts.total == 1  # the Search API's total_count: the progress bar's ETA
    [event] = await published(settings, 1)
    assert event.id.startswith("backfill:stripe:sub_")
    assert event.id.endswith(":cancelled")
    assert event.source == "/billing/stripe"
    assert event.time == datetime.fromtimestamp(1234567890, UTC)
    # the fixture's trial ended when it ended: a trial that never converted
    model = registry.decode(
        event.type, event.data, inbound_prefix=settings.ingest.event_type_prefix, tolerant=False
    )
    assert event.type == f"{settings.ingest.event_type_prefix}.trial.expired"
    assert type(model).__name__ == "TrialExpired"
    assert event.data["customer_id"] == "cus_QXg1o8vcGmoR32"
    assert event.subject == "cus_QXg1o8vcGmoR32"


async def test_stripe_mock_rejects_what_stripe_would(stripe_mock: str) -> None:
    """The check above can fail: a parameter Stripe does not take is refused by stripe-mock."""
    source = backfill.StripeSource("sk_test_123", stripe_mock, max_network_retries=0)
    unknown: Any = {"status": "canceled", "canceled_at": 5}
    try:
        with pytest.raises(stripe.InvalidRequestError):
            await source.client.v1.subscriptions.list_async(unknown)
    finally:
        await source.close()


async def test_pages_a_429_and_an_interruption_resume_where_it_stopped(
    settings: Settings, tmp_path: Path
) -> None:
    ended = SINCE + timedelta(days=30)
    subs = [canceled(f"sub_{i}", f"cus_{i}", ended - timedelta(hours=i)) for i in range(7)]
    subs[5] = canceled("sub_5", "cus_5", SINCE - timedelta(days=1))  # ended before --since
    subs[2]["customer"]["subscriptions"]["data"] = [{"id": "sub_new", "status": "active"}]
    deleted: dict[str, Any] = {
        "id": "evt_deleted_3",
        "object": "event",
        "type": "customer.subscription.deleted",
        "created": int(ended.timestamp()) - 3 * 3600 + 1,
        "data": {"object": subs[3]},
    }
    fake = FakeStripe(subs, deletions=[deleted], throttle={"sub_1"}, refuse={"sub_3"})
    checkpoint = tmp_path / "cp.json"
    async with serve(fake.app(), lifespan="off") as base:
        with pytest.raises(stripe.InvalidRequestError):
            await run_backfill(settings, base, checkpoint, page_size=2)
        stopped = backfill.Checkpoint(checkpoint).load()
        assert stopped.after == "sub_3"  # two pages published; the third refused
        assert stopped.finished_at is None
        assert fake.pages_asked() == [None, "sub_1", "sub_1", "sub_3"]  # the 429, retried

        counts = await run_backfill(settings, base, checkpoint, page_size=2)
        assert fake.pages_asked()[4:] == ["sub_3", "sub_5"]  # resumed after what was done
    # counted over both runs: 7 read, sub_2 active again, sub_5 before --since
    assert (counts.read, counts.published, counts.active_again, counts.before_since) == (7, 5, 1, 1)
    assert counts.earlier_run == 0
    assert backfill.Checkpoint(checkpoint).load().finished_at is not None

    events = await published(settings, 5)
    ids = sorted(e.id for e in events)
    assert ids == [
        "backfill:stripe:sub_0:cancelled",
        "backfill:stripe:sub_1:cancelled",
        "backfill:stripe:sub_4:cancelled",
        "backfill:stripe:sub_6:cancelled",
        "evt_deleted_3",  # the webhook's own event: the inbox takes the two as one
    ]
    by_id = {e.id: e for e in events}
    assert by_id["backfill:stripe:sub_4:cancelled"].time == ended - timedelta(hours=4)
    assert by_id["evt_deleted_3"].time == datetime.fromtimestamp(deleted["created"], UTC)
    for event in events:
        registry.decode(
            event.type, event.data, inbound_prefix=settings.ingest.event_type_prefix, tolerant=False
        )
        assert event.data["reason"] == "too_expensive"
        assert event.data["customer"]["timezone"] == "Europe/Helsinki"
    # every request asked for canceled subscriptions with their customers expanded
    for path, query in fake.requests:
        if path == "/v1/subscriptions":
            assert query["status"] == "canceled"
            assert query["expand[0]"] == "data.customer"


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def test_a_second_run_adds_nothing_downstream(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    ended = datetime.now(UTC) - timedelta(days=40)
    subs = [canceled(f"sub_d{i}", f"cus_d{i}", ended - timedelta(hours=i)) for i in range(3)]
    fake = FakeStripe(subs)
    checkpoint = tmp_path / "cp.json"
    service = ingest_bootstrap(settings, engine=engine)
    async with running(service.core.runtime), serve(fake.app(), lifespan="off") as base:
        first = await run_backfill(settings, base, checkpoint)
        assert first.published == 3
        await eventually(lambda: count(engine, churn_episodes), lambda n: n >= 3)
        again = await run_backfill(settings, base, checkpoint, restart=True)
        assert again.published == 3  # the same ids once more
        # finished runs are remembered: the next one publishes only what they did not —
        # whatever its --since (the inbox forgets after retention.keep_inbox_days)
        later = await run_backfill(settings, base, checkpoint)
        assert (later.published, later.earlier_run) == (0, 3)
        earlier = await run_backfill(settings, base, checkpoint, since=SINCE - timedelta(days=90))
        assert (earlier.published, earlier.earlier_run) == (0, 3)
        # a later event of one customer: once its effect shows, the copies before it are done
        marker = cloudevent(
            "customer.updated",
            {"customer_id": "cus_d0", "customer": {"plan": "marker"}},
        )
        marker["type"] = f"{settings.ingest.event_type_prefix}.customer.updated"
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [(b"cus_d0", *structured(marker))],
        )

        async def plan() -> Any:
            async with engine.connect() as conn:
                return await conn.scalar(select(customers.c.plan).where(customers.c.id == "cus_d0"))

        assert await eventually(plan, lambda p: p == "marker") == "marker"
    assert len(await published(settings, 7)) == 7
    assert await count(engine, churn_episodes) == 3
    async with engine.connect() as conn:
        rows = (await conn.execute(churn_episodes.select())).all()
    assert {r.customer_id: r.occurred_at for r in rows} == {
        f"cus_d{i}": (ended - timedelta(hours=i)).replace(microsecond=0) for i in range(3)
    }
    assert {r.source_event_id for r in rows} == {
        f"backfill:stripe:sub_d{i}:cancelled" for i in range(3)
    }
    assert all(r.end_reason is None for r in rows)  # none superseded by a copy


async def test_backfilled_churn_40_days_old_opens_cases_in_their_current_window(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Churned 40 days ago: past the price track's first two weeks (day 0 to day 14), so the
    late-churn rule drops those steps — nothing goes now — and the case waits for its
    3-month step, which goes when it falls due."""
    start = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    ended = start - timedelta(days=40)  # 2026-01-21 08:00
    cids = [not_in_holdout(f"cus_Bf{i}_", "price_discount") for i in range(2)]
    subs = [canceled(f"sub_bf{i}", c, ended + timedelta(minutes=i)) for i, c in enumerate(cids)]
    fake = FakeStripe(copy.deepcopy(subs))
    async with (
        system(settings, engine, start=start) as s,
        serve(fake.app(), lifespan="off") as base,
    ):
        counts = await run_backfill(settings, base, tmp_path / "cp.json")
        assert counts.published == 2
        cases = [await s.case(cid) for cid in cids]
        steps = {cid: await s.steps(cid) for cid in cids}
        await s.fire_until(start + timedelta(hours=2))
        now_sent = await s.dispatched()
        await s.fire_until(datetime(2026, 4, 22, tzinfo=UTC), step=timedelta(hours=6))
        later_sent = await s.dispatched()
    for case in cases:
        assert case is not None
        assert case.playbook == "price_discount"
    assert now_sent == []  # no burst of old steps
    for i, cid in enumerate(cids):
        planned = [(st.step_key, st.state, st.due_at) for st in steps[cid]]
        # only the steps of the windows still ahead are planned: d0 to d14 are gone
        assert [key for key, _, _ in planned] == ["d90_whats_new", "d270_last_attempt"], planned
        assert all(state == "pending" for _, state, _ in planned)
        assert planned[0][2] == datetime(2026, 4, 21, 8, i, tzinfo=UTC)  # churn + 3 months
        keys = [c["data"]["step_key"] for c in later_sent if c["data"]["customer"]["id"] == cid]
        assert keys == ["d90_whats_new"]


async def test_a_cancellation_the_webhook_delivered_too_is_one_episode(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Stripe still keeps the ``customer.subscription.deleted`` event: the backfill publishes
    it under the webhook's own id, and ingest's inbox takes the two as one."""
    ended = (datetime.now(UTC) - timedelta(days=5)).replace(microsecond=0)
    sub = canceled("sub_w", "cus_w", ended)
    webhook_sub = {**copy.deepcopy(sub), "customer": "cus_w"}  # as the webhook has it
    body = stripe_event("evt_w", "customer.subscription.deleted", webhook_sub, ended)
    deleted: dict[str, Any] = {
        "id": "evt_w",
        "object": "event",
        "type": "customer.subscription.deleted",
        "created": int(ended.timestamp()),
        "data": {"object": webhook_sub},
    }
    fake = FakeStripe([sub], deletions=[deleted])
    service = ingest_bootstrap(configured(settings), engine=engine)
    async with (
        serve(service.app) as url,  # its lifespan runs the consumers too
        httpx.AsyncClient(base_url=url) as http,
        serve(fake.app(), lifespan="off") as base,
    ):
        answer = await http.post("/v1/billing/stripe", content=body, headers=signed(body))
        assert answer.json()["received"] == 1
        counts = await run_backfill(settings, base, tmp_path / "cp.json")
        assert counts.published == 1
        # a later event of the customer: once its effect shows, the backfilled copy is done
        marker = cloudevent("customer.updated", {"customer_id": "cus_w", "customer": {"plan": "m"}})
        marker["type"] = f"{settings.ingest.event_type_prefix}.customer.updated"
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [(b"cus_w", *structured(marker))],
        )

        async def plan() -> Any:
            async with engine.connect() as conn:
                return await conn.scalar(select(customers.c.plan).where(customers.c.id == "cus_w"))

        assert await eventually(plan, lambda p: p == "m") == "m"
    events = await published(settings, 2)
    assert sorted(e.id for e in events) == sorted(["evt_w", marker["id"]])
    async with engine.connect() as conn:
        rows = (await conn.execute(churn_episodes.select())).all()
    assert [(r.source, r.source_event_id) for r in rows] == [("/billing/stripe", "evt_w")]
