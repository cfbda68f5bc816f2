"""The scheduler's handler a batch at a time, on the real PostgreSQL: a batch with several events
of one customer gives the same rows and the same published events as its events one by one;
a batch costs the same statements whatever its size, each compiled once; and a step written
already due wakes the step timer instead of waiting for its poll — in the same process, and
through ``LISTEN/NOTIFY`` for a timer on other connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import default
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.domain import OFFERS, TEMPLATE_NAMES, load_playbooks
from services.scheduler.handler import SchedulerHandler
from services.scheduler.queries.reports import Filters, count_messages
from services.scheduler.timers import FireResult, StepFirer
from services.scheduler.views import policy
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.contracts import examples
from shared.db.engine import make_engine
from shared.db.tables import case_steps, cases, outbox, scheduler_customers, win_backs
from shared.messaging.pipeline import Incoming, Pipeline
from shared.settings import SchedulerSettings
from tests.support.services import eventually

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday, 10:00 in Helsinki
PLAYBOOKS = load_playbooks(
    SchedulerSettings().playbooks_dir, templates=TEMPLATE_NAMES, offers=OFFERS
)
OUTCOMES = "test.outcomes"
DISPATCH = "test.dispatch"


# -- events as ingest and the dispatcher publish them ----------------------------------------
def _event(kind: str, data: dict[str, Any], at: datetime, key: str, source: str) -> CloudEvent:
    return CloudEvent(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}|{key}|{at.isoformat()}|{data}")),
        source=source,
        type=f"{de.PREFIX}.{kind}",
        time=at,
        subject=key,
        data=data,
    )


def snapshot(cid: str, **changes: Any) -> dict[str, Any]:
    return {**examples.SNAPSHOT, "id": cid, "email": f"{cid}@example.com", **changes}


def churn(cid: str, episode: str, at: datetime, **changes: Any) -> CloudEvent:
    data = orjson.loads(orjson.dumps(examples.PUBLISHED["churn.recorded"]))
    data["customer"] = snapshot(cid, **changes)
    data["episode"].update(id=episode, occurred_at=at.isoformat())
    return _event("churn.recorded", data, at, cid, "/winback/ingest")


def returned(cid: str, at: datetime) -> CloudEvent:
    data = {
        **examples.PUBLISHED["customer.returned"],
        "customer": snapshot(cid, status="active"),
        "returned_at": at.isoformat(),
        "ended_episodes": [],
    }
    return _event("customer.returned", data, at, cid, "/winback/ingest")


def updated(cid: str, at: datetime, **changes: Any) -> CloudEvent:
    return _event(
        "customer.updated", {"customer": snapshot(cid, **changes)}, at, cid, "/winback/ingest"
    )


def consent(cid: str, channel: str, at: datetime, **changes: Any) -> CloudEvent:
    data = {
        "customer_id": cid,
        "channel": channel,
        "granted": False,
        "at": at.isoformat(),
        "customer": snapshot(cid, **changes),
    }
    return _event("consent.changed", data, at, cid, "/winback/ingest")


def activity(cid: str, at: datetime) -> CloudEvent:
    data = {"customer_id": cid, "at": at.isoformat(), "status": "churned"}
    return _event("customer.activity", data, at, cid, "/winback/ingest")


def outcome(kind: str, cid: str, step: Any, at: datetime) -> CloudEvent:
    data = {
        **examples.PUBLISHED[f"message.{kind}"],
        "idempotency_key": f"{step.case_id}:{step.step_key}",
        "case_id": step.case_id,
        "step_key": step.step_key,
        "step_id": step.id,
        "customer_id": cid,
    }
    return _event(f"message.{kind}", data, at, cid, "/winback/dispatcher")


# -- the handler on the real database ----------------------------------------------------------
def pipeline(engine: AsyncEngine, clock: FrozenClock) -> Pipeline:
    handler = SchedulerHandler(PLAYBOOKS, OUTCOMES)
    return Pipeline(engine, "scheduler", handler, clock, "test.dlq", "/winback/scheduler")


def incoming(pipe: Pipeline, events: Sequence[CloudEvent]) -> list[Incoming[Any]]:
    return [pipe.decode_payload(e, (e.subject or "").encode(), None) for e in events]


def firer(engine: AsyncEngine, clock: FrozenClock, **options: Any) -> StepFirer:
    return StepFirer(
        engine, clock, policy(SchedulerSettings()), DISPATCH, "/winback/scheduler", **options
    )


async def empty(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        tables = (
            await conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version'"
                )
            )
        ).scalars()
        names = ", ".join(f'"{t}"' for t in tables)
        await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


async def dispatched_step(engine: AsyncEngine, cid: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                case_steps.select().where(
                    case_steps.c.customer_id == cid, case_steps.c.state == "dispatched"
                )
            )
        ).first()


def _stable(topic: str, value: dict[str, Any]) -> dict[str, Any]:
    """An event without what is random in it: the timer's dispatch commands have no cause,
    so a fresh id (the handler's events are derived from the event that caused them)."""
    if topic == DISPATCH:
        return {k: v for k, v in value.items() if k not in ("id", "correlationid")}
    return value


async def state(engine: AsyncEngine) -> dict[str, Any]:
    """Every row the handler writes, without ids and database-clock times, in a stable order;
    the published events in the order they were written."""

    def rows(result: Any, drop: Sequence[str]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r._mapping.items() if k not in drop} for r in result]

    async with engine.connect() as conn:
        return {
            "cases": rows(await conn.execute(cases.select().order_by(cases.c.id)), ["updated_at"]),
            "steps": rows(
                await conn.execute(
                    case_steps.select().order_by(case_steps.c.case_id, case_steps.c.step_key)
                ),
                ["id", "created_at", "updated_at"],
            ),
            "customers": rows(
                await conn.execute(scheduler_customers.select().order_by(scheduler_customers.c.id)),
                [],
            ),
            "win_backs": rows(
                await conn.execute(win_backs.select().order_by(win_backs.c.case_id)), []
            ),
            "published": [
                (r.topic, r.key, _stable(r.topic, orjson.loads(r.value)))
                for r in await conn.execute(
                    select(outbox.c.topic, outbox.c.key, outbox.c.value).order_by(outbox.c.id)
                )
            ],
        }


async def test_a_batch_of_one_customers_events_is_the_same_as_one_by_one(
    engine: AsyncEngine,
) -> None:
    """Churn then reactivation (win-back credited, re-onboarding opened) then a new churn; two
    churns; a churn with the old case's outcomes after it; a profile, a consent and activity
    around a churn; consent withdrawn on every channel after a churn — one batch, and the same
    events one per transaction, from the same start."""
    at = T0 + timedelta(hours=2)
    no_email = {"email": False}

    async def world(one_by_one: bool) -> tuple[dict[str, Any], Any, Any]:
        await empty(engine)
        clock = FrozenClock(T0)
        pipe = pipeline(engine, clock)
        # the start: c1 and c3 have an open case whose day-0 message went out
        for e in (churn("c1", "c1-e1", T0 - timedelta(hours=1)), churn("c3", "c3-e1", T0)):
            await pipe.transact(incoming(pipe, [e]))
        assert (await firer(engine, clock).fire_once()).dispatched == 2
        sent1, sent3 = await dispatched_step(engine, "c1"), await dispatched_step(engine, "c3")
        clock.set(at)
        batch = [
            outcome("sent", "c1", sent1, at - timedelta(minutes=50)),
            churn("c2", "c2-e1", at - timedelta(minutes=40)),
            returned("c1", at - timedelta(minutes=30)),
            churn("c3", "c3-e2", at - timedelta(minutes=30)),
            outcome("failed", "c3", sent3, at - timedelta(minutes=29)),
            updated("c4", at - timedelta(minutes=25), name="Four"),
            churn("c2", "c2-e2", at - timedelta(minutes=20), mrr_minor=250_000),
            outcome("delivered", "c3", sent3, at - timedelta(minutes=19)),
            consent("c4", "email", at - timedelta(minutes=15), name="Four", consent=no_email),
            churn("c1", "c1-e2", at - timedelta(minutes=10)),
            churn("c4", "c4-e1", at - timedelta(minutes=9), name="Four", consent=no_email),
            churn("c5", "c5-e1", at - timedelta(minutes=8)),
            activity("c4", at - timedelta(minutes=5)),
            consent("c5", "all", at - timedelta(minutes=1)),
        ]
        if one_by_one:
            for e in batch:
                assert (await pipe.transact(incoming(pipe, [e]))).handled == 1
        else:
            assert (await pipe.transact(incoming(pipe, batch))).handled == len(batch)
        return await state(engine), sent1, sent3

    together, sent1, sent3 = await world(one_by_one=False)
    alone, *_ = await world(one_by_one=True)

    # the batch did what the story says
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for case in together["cases"]:
        by_customer.setdefault(case["customer_id"], []).append(case)
    closes = {c["episode_id"]: c["close_reason"] for c in together["cases"]}
    assert closes["c1-e1"] == "returned"
    assert closes["c1-e2"] is None
    assert [c["purpose"] for c in by_customer["c1"]].count("reonboarding") == 1
    assert [c["close_reason"] for c in by_customer["c1"] if c["purpose"] == "reonboarding"] == [
        "superseded"
    ]
    assert [w["step_key"] for w in together["win_backs"]] == [sent1.step_key]
    assert (closes["c2-e1"], closes["c2-e2"]) == ("superseded", None)
    assert (closes["c3-e1"], closes["c3-e2"]) == ("superseded", None)
    assert closes["c5-e1"] == "unsubscribed"
    old3 = next(s for s in together["steps"] if s["case_id"] == sent3.case_id and s["fired_at"])
    assert old3["state"] == "failed"
    assert {"failed", "delivered"} <= set(old3["outcome"])
    customers = {c["id"]: c for c in together["customers"]}
    assert customers["c4"]["name"] == "Four"
    assert customers["c4"]["consent"] == {"email": False}
    assert customers["c4"]["last_active_at"] == at - timedelta(minutes=5)
    assert customers["c1"]["last_won_back_at"] == at - timedelta(minutes=30)
    types = [v["type"].removeprefix(f"{de.PREFIX}.") for _, _, v in together["published"]]
    assert types.count("case.won_back") == 1
    assert types.count("case.closed") >= 5

    # and exactly what the same events did one by one
    for part in ("cases", "steps", "customers", "win_backs", "published"):
        assert together[part] == alone[part], part


async def test_a_batch_costs_the_same_statements_whatever_its_size(engine: AsyncEngine) -> None:
    """Churns of new customers: the same statements for 5 as for 60, and in a second batch
    every one of them comes out of SQLAlchemy's compiled cache (nothing is compiled again)."""
    clock = FrozenClock(T0)
    pipe = pipeline(engine, clock)
    seen: list[tuple[str, Any]] = []

    def executed(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        seen.append((statement, context.cache_hit))

    def batch(prefix: str, n: int) -> list[Incoming[Any]]:
        return incoming(
            pipe,
            [churn(f"{prefix}{i}", f"{prefix}-e{i}", T0 - timedelta(hours=1)) for i in range(n)],
        )

    counts: list[int] = []
    hits: list[list[Any]] = []
    event.listen(engine.sync_engine, "before_cursor_execute", executed)
    try:
        for prefix, n in (("warm", 3), ("small", 5), ("large", 60)):
            seen.clear()
            assert (await pipe.transact(batch(prefix, n))).handled == n
            counts.append(len(seen))
            hits.append([hit for _, hit in seen])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", executed)
    assert counts[1] == counts[2], seen
    assert all(hit == default.CACHE_HIT for hit in hits[2]), hits[2]
    async with engine.connect() as conn:
        opened = await conn.scalar(select(func.count()).select_from(cases))
    assert opened == 3 + 5 + 60


@asynccontextmanager
async def idle(timer: StepFirer, passes: int) -> AsyncIterator[list[FireResult]]:
    """Run the timer (a long poll) until it has made its first ``passes`` passes, found
    nothing and gone to sleep; yield the list of its passes (it grows as the timer works)."""
    done: list[FireResult] = []
    fire_once = timer.fire_once

    async def counted() -> FireResult:
        result = await fire_once()
        done.append(result)
        return result

    timer.fire_once = counted  # type: ignore[method-assign]
    running = asyncio.create_task(timer.run())
    try:
        await eventually(lambda: asyncio.sleep(0, len(done)), lambda n: n >= passes, timeout=30)
        assert [p.claimed for p in done] == [0] * passes
        yield done
    finally:
        timer.stop()
        await running


async def churn_fired(engine: AsyncEngine, clock: FrozenClock, cid: str) -> Any:
    """Commit a churn whose day-0 step is due at once; that step as soon as it is dispatched
    (or, after a while, as it is)."""
    pipe = pipeline(engine, clock)
    await pipe.transact(incoming(pipe, [churn(cid, f"{cid}-e1", T0)]))
    return await eventually(
        lambda: dispatched_step(engine, cid), lambda s: s is not None, timeout=15
    )


async def test_a_step_due_now_wakes_the_timer_in_the_same_process(engine: AsyncEngine) -> None:
    """The handler and the timer share the engine (as in ``winback scheduler``); the timer
    does not LISTEN and polls every 10 minutes: the commit itself wakes it."""
    clock = FrozenClock(T0)
    async with idle(firer(engine, clock, poll_seconds=600, listen=False), passes=1):
        step = await churn_fired(engine, clock, "woken-in-process")
    assert step is not None
    assert step.fired_at == T0


async def test_a_step_due_now_wakes_a_listening_timer_elsewhere(
    engine: AsyncEngine, migrated_url: str
) -> None:
    """The timer has an engine (pool, connections) of its own, as another process would, and
    polls every 10 minutes: PostgreSQL's notification on commit wakes it — the first pass
    after it starts listening is the one the listener asks for."""
    clock = FrozenClock(T0)
    elsewhere = make_engine(migrated_url, pool_size=2)
    try:
        async with idle(firer(elsewhere, clock, poll_seconds=600), passes=2):
            step = await churn_fired(engine, clock, "woken-by-notify")
    finally:
        await elsewhere.dispose()
    assert step is not None
    assert step.fired_at == T0


async def test_a_timer_that_lost_its_listening_connection_listens_again(
    engine: AsyncEngine, migrated_url: str
) -> None:
    """The listening connection is killed (as by a database restart): the timer notices,
    listens on a new one, and the next due step still wakes it at once."""
    clock = FrozenClock(T0)
    elsewhere = make_engine(migrated_url, pool_size=2)

    async def listening() -> list[int]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query = :listen"
                ),
                {"listen": 'LISTEN "winback_steps_due"'},
            )
            return list(rows.scalars())

    try:
        async with idle(firer(elsewhere, clock, poll_seconds=600), passes=2) as passes:
            [first] = await listening()
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            again = await eventually(listening, lambda pids: bool(pids) and first not in pids)
            assert len(again) == 1
            await eventually(lambda: asyncio.sleep(0, len(passes)), lambda n: n >= 4)
            step = await churn_fired(engine, clock, "woken-after-reconnect")
    finally:
        await elsewhere.dispose()
    assert step is not None
    assert step.fired_at == T0


async def test_reconciled_and_unconfirmed_sends_are_counted_in_the_messages_report(
    engine: AsyncEngine,
) -> None:
    """A ``message.sent`` confirming a send a crash left unknown (``confirmed_by``) and a
    ``message.failed`` with reason ``unconfirmed``, through the real handler: the messages
    report counts them, and a step still dispatched as awaiting its outcome."""
    await empty(engine)
    clock = FrozenClock(T0)
    pipe = pipeline(engine, clock)
    cids = [f"reconciled-{i}" for i in range(8)]
    await pipe.transact(incoming(pipe, [churn(c, f"{c}-e1", T0) for c in cids]))
    while (await firer(engine, clock).fire_once()).claimed:
        pass
    steps = [(c, s) for c in cids if (s := await dispatched_step(engine, c)) is not None]
    assert len(steps) >= 3  # the rest are the holdout's
    (webhook_cid, webhook_step), (lost_cid, lost_step) = steps[0], steps[1]

    def message(kind: str, cid: str, step: Any, **extra: Any) -> CloudEvent:
        event = outcome(kind, cid, step, T0)
        return _event(f"message.{kind}", {**event.data, **extra}, T0, cid, "/winback/dispatcher")

    await pipe.transact(
        incoming(
            pipe,
            [
                message("sent", webhook_cid, webhook_step, confirmed_by="webhook"),
                message("failed", lost_cid, lost_step, reason="unconfirmed"),
            ],
        )
    )
    async with engine.connect() as conn:
        found = await count_messages(conn, Filters())
    total = {
        name: sum(getattr(counts, name) for _, counts in found)
        for name in (
            "dispatched",
            "sent",
            "failed",
            "awaiting_outcome",
            "reconciled",
            "unconfirmed",
        )
    }
    assert total["dispatched"] == len(steps)
    assert (total["reconciled"], total["unconfirmed"]) == (1, 1)
    assert total["sent"] >= 1
    assert total["failed"] >= 1
    assert total["awaiting_outcome"] == len(steps) - 2


async def test_the_comparison_step_of_a_competitor_churn_names_the_competitor(
    engine: AsyncEngine,
) -> None:
    """The day-90 comparison command of a customer who left for a named competitor carries
    the name (the dispatcher puts it in the template: "Has Rivalio delivered?")."""
    await empty(engine)
    clock = FrozenClock(T0)
    pipe = pipeline(engine, clock)
    events = []
    for i in range(6):  # a few customers: the playbook holds 5% out
        event = churn(f"switched-{i}", f"switched-{i}-e1", T0)
        data = {**event.data, "episode": {**event.data["episode"], "reason": "competitor"}}
        data["episode"]["competitor"] = "Rivalio"
        events.append(_event("churn.recorded", data, T0, f"switched-{i}", "/winback/ingest"))
    await pipe.transact(incoming(pipe, events))
    clock.advance(timedelta(days=91))
    while (await firer(engine, clock).fire_once()).claimed:
        pass
    async with engine.connect() as conn:
        values = (
            await conn.execute(select(outbox.c.value).where(outbox.c.topic == DISPATCH))
        ).scalars()
        commands = [orjson.loads(v)["data"] for v in values]
    comparisons = [c for c in commands if c["step_key"] == "d90_comparison"]
    assert comparisons, [c["step_key"] for c in commands]
    assert {c["competitor"] for c in comparisons} == {"Rivalio"}
    assert all(c["template"] == "comparison" for c in comparisons)
