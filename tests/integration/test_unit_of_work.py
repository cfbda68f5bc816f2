"""The unit of work on the real PostgreSQL: a commit writes the state, its outbox rows and its
metrics together; an exception rolls both back; a transient failure is retried by the
policy; every stored time comes from the injected clock, so the backlog's age is right."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent, from_kafka
from shared.db.tables import inbox, outbox, scheduler_customers
from shared.messaging.memory import MemoryBus
from shared.messaging.outbox import OutboxRelay
from shared.messaging.pipeline import Incoming, Pipeline
from shared.messaging.uow import Tx, UnitOfWork
from shared.retry import TRANSIENT, is_transient

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)  # far from the database's now(): a wrong clock shows
LIMIT = 64 * 1024
SOURCE = "/tests/uow"


def units(name: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "winback_units_of_work_total", {"unit": name, "outcome": outcome}
    )
    return value or 0.0


def seconds_observed(name: str) -> float:
    value = REGISTRY.get_sample_value("winback_unit_of_work_seconds_count", {"unit": name})
    return value or 0.0


def unit(engine: AsyncEngine, clock: FrozenClock, name: str) -> UnitOfWork:
    return UnitOfWork(engine, clock, SOURCE, LIMIT, name=name)


async def add_customer(tx: Tx, customer_id: str) -> None:
    """A state change: a row of the scheduler's customers, stamped with the unit's time."""
    await tx.conn.execute(
        scheduler_customers.insert().values(id=customer_id, status="churned", updated_at=tx.now)
    )


async def customers(engine: AsyncEngine) -> dict[str, datetime]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(scheduler_customers.c.id, scheduler_customers.c.updated_at)
        )
        return {r.id: r.updated_at for r in rows}


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(outbox.select().order_by(outbox.c.id))).all())


async def raise_sqlstate(conn: AsyncConnection, condition: str) -> None:
    """PostgreSQL raises the error named ``condition`` (its SQLSTATE), as a real one would."""
    await conn.execute(
        text(f"DO $$ BEGIN RAISE EXCEPTION 'as asked' USING ERRCODE = '{condition}'; END $$")
    )


async def test_a_commit_writes_the_state_its_outbox_and_its_metrics(engine: AsyncEngine) -> None:
    clock = FrozenClock(T0)
    name = "tests.uow.commit"
    before = (units(name, "committed"), seconds_observed(name))

    async with unit(engine, clock, name) as tx:
        assert tx.now == T0
        await add_customer(tx, "c1")
        emitted = tx.emit("tests.outcomes", "c1", "com.example.tests.done", {"customer_id": "c1"})
        assert await outbox_rows(engine) == []  # written on exit, in the same transaction

    assert await customers(engine) == {"c1": T0}
    [row] = await outbox_rows(engine)
    assert (row.topic, bytes(row.key)) == ("tests.outcomes", b"c1")
    assert row.created_at == T0  # the injected clock, not the database's now()
    assert (row.published_at, row.parked_at) == (None, None)
    event = from_kafka(bytes(row.value), [])
    assert (event.id, event.source, event.time) == (emitted.id, SOURCE, T0)
    assert units(name, "committed") == before[0] + 1
    assert seconds_observed(name) == before[1] + 1


async def test_an_exception_rolls_back_the_state_and_writes_no_outbox(engine: AsyncEngine) -> None:
    clock = FrozenClock(T0)
    name = "tests.uow.rollback"
    before = (units(name, "rolled_back"), units(name, "committed"), seconds_observed(name))

    async def work() -> None:
        async with unit(engine, clock, name) as tx:
            await add_customer(tx, "c1")
            tx.emit("tests.outcomes", "c1", "com.example.tests.done", {"customer_id": "c1"})
            raise LookupError("the handler changed its mind")

    with pytest.raises(LookupError, match="changed its mind"):
        await work()

    assert await customers(engine) == {}
    assert await outbox_rows(engine) == []
    assert units(name, "rolled_back") == before[0] + 1
    assert units(name, "committed") == before[1]
    assert seconds_observed(name) == before[2] + 1


async def test_a_transient_failure_is_retried_by_the_policy_and_commits_once(
    engine: AsyncEngine,
) -> None:
    clock = FrozenClock(T0)
    name = "tests.uow.transient"
    before = (units(name, "transient"), units(name, "committed"))
    attempts: list[datetime] = []
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(timedelta(seconds=1))  # the second attempt is a new unit, a new now

    async def work() -> str:
        async with unit(engine, clock, name) as tx:
            attempts.append(tx.now)
            await add_customer(tx, "c1")
            tx.emit("tests.outcomes", "c1", "com.example.tests.done", {"customer_id": "c1"})
            if len(attempts) == 1:  # a serialization failure, raised by PostgreSQL itself
                await raise_sqlstate(tx.conn, "serialization_failure")
        return "committed"

    assert await TRANSIENT.call(work, "tests.uow.transient", sleep=record_wait) == "committed"

    assert attempts == [T0, T0 + timedelta(seconds=1)]
    assert len(waits) == 1
    assert TRANSIENT.delay_bounds(1)[0] <= waits[0] <= TRANSIENT.delay_bounds(1)[1]
    # the failed attempt left nothing; the retry wrote the state and its event once
    assert await customers(engine) == {"c1": T0 + timedelta(seconds=1)}
    assert [r.created_at for r in await outbox_rows(engine)] == [T0 + timedelta(seconds=1)]
    assert units(name, "transient") == before[0] + 1
    assert units(name, "committed") == before[1] + 1


@pytest.mark.parametrize(
    ("condition", "transient"),
    [
        ("serialization_failure", True),  # 40001
        ("deadlock_detected", True),  # 40P01
        ("admin_shutdown", True),  # 57P01
        ("too_many_connections", True),  # 53300
        ("unique_violation", False),  # 23505: the same work fails the same way
        ("invalid_text_representation", False),  # 22P02
    ],
)
async def test_which_database_errors_are_transient(
    engine: AsyncEngine, condition: str, transient: bool
) -> None:
    with pytest.raises(DBAPIError) as raised:
        async with engine.begin() as conn:
            await raise_sqlstate(conn, condition)
    assert is_transient(raised.value) is transient


async def test_a_failure_that_is_not_transient_is_not_retried(engine: AsyncEngine) -> None:
    clock = FrozenClock(T0)
    async with unit(engine, clock, "tests.uow.setup") as tx:
        await add_customer(tx, "c1")
    attempts = 0
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)

    async def work() -> None:
        nonlocal attempts
        attempts += 1
        async with unit(engine, clock, "tests.uow.duplicate") as tx:
            tx.emit("tests.outcomes", "c1", "com.example.tests.done", {"customer_id": "c1"})
            await add_customer(tx, "c1")  # a unique violation

    with pytest.raises(IntegrityError):
        await TRANSIENT.call(work, "tests.uow.duplicate", sleep=record_wait)
    assert (attempts, waits) == (1, [])
    assert await outbox_rows(engine) == []


async def test_a_record_the_broker_would_refuse_is_parked_at_the_configured_limit(
    engine: AsyncEngine,
) -> None:
    clock = FrozenClock(T0)
    async with unit(engine, clock, "tests.uow.parked") as tx:
        await add_customer(tx, "c1")
        tx.emit("tests.outcomes", "c1", "com.example.tests.small", {"n": 1})
        tx.emit("tests.outcomes", "c1", "com.example.tests.huge", {"blob": "x" * LIMIT})

    assert await customers(engine) == {"c1": T0}  # the business change stands
    small, huge = await outbox_rows(engine)
    assert (small.parked_at, small.park_reason) == (None, None)
    assert huge.parked_at == T0
    assert huge.park_reason.startswith("record_too_large: ")
    assert f"over the limit of {LIMIT}" in huge.park_reason


async def test_a_unit_is_entered_once(engine: AsyncEngine) -> None:
    once = unit(engine, FrozenClock(T0), "tests.uow.once")
    async with once:
        pass
    with pytest.raises(RuntimeError, match="entered twice"):
        async with once:
            pass


class Emitting:
    """A handler that emits one event per event it handles."""

    def decode(self, event: CloudEvent) -> Any:
        return event.data

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        for item in items:
            tx.emit("tests.outcomes", "c1", "com.example.tests.seen", {"id": item.event.id})


def incoming(event_id: str) -> Incoming[Any]:
    event = CloudEvent(id=event_id, source=SOURCE, type="com.example.tests.happened", data={})
    return Incoming(event=event, payload={})


async def test_stored_times_come_from_one_clock_and_the_backlog_age_is_right(
    engine: AsyncEngine,
) -> None:
    """The pipeline's inbox and outbox rows carry the injected clock's time; the relay's
    backlog gauge subtracts that from the same clock's now."""
    clock = FrozenClock(T0)
    pipeline = Pipeline(engine, "tests-uow", Emitting(), clock, "dlq", SOURCE, LIMIT)
    await pipeline.transact([incoming("e1")])
    clock.advance(timedelta(seconds=30))
    await pipeline.transact([incoming("e2")])
    async with engine.connect() as conn:
        received = dict((await conn.execute(select(inbox.c.event_id, inbox.c.received_at))).all())
    assert received == {"e1": T0, "e2": T0 + timedelta(seconds=30)}
    assert [r.created_at for r in await outbox_rows(engine)] == [
        T0,
        T0 + timedelta(seconds=30),
    ]

    bus = MemoryBus(clock=clock)
    relay = OutboxRelay(engine, bus.publisher(), clock)
    clock.advance(timedelta(seconds=60))
    await relay.report_backlog()
    assert REGISTRY.get_sample_value("winback_outbox_backlog") == 2
    # the oldest row was written at T0; the clock now reads T0 + 90 s
    assert REGISTRY.get_sample_value("winback_outbox_oldest_age_seconds") == 90.0
    bus.close()
