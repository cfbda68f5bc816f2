"""Retention of the inbox and the published outbox rows, on the real PostgreSQL: old rows go in
bounded batches, recent ones stay, and a redelivery within the retention is still a duplicate."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.relay import bootstrap as relay_bootstrap
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from shared.bootstrap import Core
from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.db.tables import inbox, outbox
from shared.messaging.memory import MemoryBus
from shared.messaging.pipeline import Incoming, Pipeline, Tx
from shared.messaging.retention import (
    prune_inbox,
    prune_inbox_batch,
    prune_outbox,
)
from shared.settings import Settings, load_settings
from tests.support.services import eventually

pytestmark = pytest.mark.integration

KEEP = timedelta(days=14)
SOURCE = "/tests/retention"
# inbox rows are stamped by the injected clock (the unit of work's now), and pruned by it
CLOCK = FrozenClock(datetime(2026, 3, 1, tzinfo=UTC))


async def add_inbox(
    engine: AsyncEngine, rows: Sequence[tuple[str, timedelta]], now: datetime | None = None
) -> None:
    """Inbox rows ``(event id, age)``: received that long before ``now`` (``CLOCK``'s)."""
    now = now or CLOCK.now()
    async with engine.begin() as conn:
        for event_id, age in rows:
            await conn.execute(
                text(
                    "INSERT INTO inbox (consumer, source, event_id, received_at) "
                    "VALUES ('tests', :source, :id, :received_at)"
                ),
                {"source": SOURCE, "id": event_id, "received_at": now - age},
            )


async def inbox_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(select(inbox.c.event_id))).scalars())


def pruned_metric(table: str) -> float:
    value = REGISTRY.get_sample_value("winback_retention_pruned_rows_total", {"table": table})
    return value or 0.0


@contextmanager
def deleted_per_statement(engine: AsyncEngine) -> Iterator[list[int]]:
    """The row count of every DELETE the engine runs while inside."""
    counts: list[int] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            counts.append(cursor.rowcount)

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        yield counts
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", after)


async def test_inbox_rows_older_than_the_retention_go_and_recent_ones_stay(
    engine: AsyncEngine,
) -> None:
    await add_inbox(
        engine,
        [
            ("ancient", timedelta(days=90)),
            ("old", timedelta(days=15)),
            ("just-past", KEEP + timedelta(minutes=1)),
            ("just-within", KEEP - timedelta(minutes=1)),
            ("last-week", timedelta(days=7)),
            ("fresh", timedelta(0)),
        ],
    )
    before = pruned_metric("inbox")

    assert await prune_inbox(engine, CLOCK, KEEP, batch_size=100) == 3

    assert await inbox_ids(engine) == {"just-within", "last-week", "fresh"}
    assert pruned_metric("inbox") - before == 3
    assert await prune_inbox(engine, CLOCK, KEEP, batch_size=100) == 0  # nothing old is left


async def test_each_batch_deletes_at_most_batch_size_rows_oldest_first(
    engine: AsyncEngine,
) -> None:
    old = [(f"old-{n:02}", KEEP + timedelta(days=20 - n)) for n in range(10)]  # old-00 oldest
    await add_inbox(engine, [*old, ("recent-a", timedelta(hours=1)), ("recent-b", KEEP / 2)])

    async with engine.begin() as conn:
        assert await prune_inbox_batch(conn, CLOCK, KEEP, batch_size=3) == 3
    assert await inbox_ids(engine) == {f"old-{n:02}" for n in range(3, 10)} | {
        "recent-a",
        "recent-b",
    }

    # a run is capped at max_batches: two batches of three, the rest waits for the next run
    with deleted_per_statement(engine) as counts:
        assert await prune_inbox(engine, CLOCK, KEEP, batch_size=3, max_batches=2) == 6
    assert counts == [3, 3]
    assert await inbox_ids(engine) == {"old-09", "recent-a", "recent-b"}

    # uncapped, it stops at the first short batch
    with deleted_per_statement(engine) as counts:
        assert await prune_inbox(engine, CLOCK, KEEP, batch_size=3) == 1
    assert counts == [1]
    assert await inbox_ids(engine) == {"recent-a", "recent-b"}


async def test_a_large_backlog_goes_in_bounded_batches(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO inbox (consumer, source, event_id, received_at) "
                "SELECT 'tests', :source, 'old-' || n, :received_at "
                "FROM generate_series(1, 2500) AS n"
            ),
            {"source": SOURCE, "received_at": CLOCK.now() - timedelta(days=30)},
        )
    await add_inbox(engine, [("recent", timedelta(days=1))])

    with deleted_per_statement(engine) as counts:
        assert await prune_inbox(engine, CLOCK, KEEP, batch_size=1000) == 2500

    assert counts == [1000, 1000, 500]
    assert await inbox_ids(engine) == {"recent"}


async def test_published_outbox_rows_go_after_keep_published_and_unpublished_never(
    engine: AsyncEngine,
) -> None:
    clock = FrozenClock(datetime(2026, 3, 1, tzinfo=UTC))
    now = clock.now()
    rows = {
        "published-2d": now - timedelta(days=2),
        "published-25h": now - timedelta(hours=25),
        "published-23h": now - timedelta(hours=23),
        "published-now": now,
        "unpublished": None,
    }
    async with engine.begin() as conn:
        for value, published_at in rows.items():
            await conn.execute(
                outbox.insert().values(
                    topic="t",
                    key=b"k",
                    value=value.encode(),
                    created_at=now - timedelta(days=30),
                    published_at=published_at,
                )
            )
    before = pruned_metric("outbox")

    with deleted_per_statement(engine) as counts:
        pruned = await prune_outbox(engine, clock, timedelta(hours=24), batch_size=1)

    assert pruned == 2
    assert counts == [1, 1, 0]
    assert pruned_metric("outbox") - before == 2
    async with engine.connect() as conn:
        left = {bytes(v).decode() for v in (await conn.execute(select(outbox.c.value))).scalars()}
    assert left == {"published-23h", "published-now", "unpublished"}


class Recording:
    """A handler that records which events it was given (after the inbox's dedupe)."""

    def __init__(self) -> None:
        self.handled: list[str] = []

    def decode(self, event: CloudEvent) -> Any:
        return event.data

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        self.handled += [item.event.id for item in items]


def incoming(event_id: str) -> Incoming[Any]:
    event = CloudEvent(id=event_id, source=SOURCE, type="com.example.tests.happened", data={})
    return Incoming(event=event, payload={})


async def test_a_redelivery_within_the_retention_is_still_a_duplicate(
    engine: AsyncEngine,
) -> None:
    clock = FrozenClock(datetime(2026, 3, 1, tzinfo=UTC))  # far from the database's now()
    handler = Recording()
    pipeline = Pipeline(engine, "tests", handler, clock, "dlq", "/tests")
    assert (await pipeline.transact([incoming("beyond")])).handled == 1
    clock.advance(timedelta(hours=2))
    assert (await pipeline.transact([incoming("within")])).handled == 1
    async with engine.connect() as conn:
        received = dict((await conn.execute(select(inbox.c.event_id, inbox.c.received_at))).all())
    # stamped by the injected clock, not the database's
    assert received == {
        "beyond": datetime(2026, 3, 1, tzinfo=UTC),
        "within": datetime(2026, 3, 1, 2, tzinfo=UTC),
    }
    clock.advance(KEEP - timedelta(hours=1))  # "beyond" is KEEP + 1 h old, "within" KEEP - 1 h

    assert await prune_inbox(engine, clock, KEEP, batch_size=100) == 1

    again = await pipeline.transact([incoming("within"), incoming("beyond")])
    # within the retention: still a duplicate, no second effect
    assert again.duplicates == 1
    # past it the inbox has forgotten the event: this is why the retention must outlast any
    # redelivery Kafka can make (RetentionSettings)
    assert again.handled == 1
    assert handler.handled == ["beyond", "within", "beyond"]


def retention_settings(migrated_url: str, **retention: Any) -> Settings:
    return load_settings(
        environment="test",
        database={"url": migrated_url},
        outbox={"relay_enabled": False, "keep_published_hours": 6},
        retention=retention,
    )


def _core(service: str, settings: Settings, engine: AsyncEngine, bus: MemoryBus) -> Core:
    if service == "ingest":
        return ingest_bootstrap(settings, engine=engine, transport=bus).core
    if service == "scheduler":
        return scheduler_bootstrap(settings, engine=engine, transport=bus).core
    if service == "dispatcher":
        return dispatcher_bootstrap(settings, engine=engine, transport=bus).core
    return relay_bootstrap(settings, engine=engine, transport=bus)[0]


@pytest.mark.parametrize("service", ["ingest", "scheduler", "dispatcher", "relay"])
async def test_every_service_prunes_periodically_with_its_settings(
    service: str, migrated_url: str, engine: AsyncEngine
) -> None:
    settings = retention_settings(
        migrated_url, keep_inbox_days=10, batch_size=2, interval_seconds=0.05
    )
    bus = MemoryBus()
    core = _core(service, settings, engine, bus)
    core.runtime.consumers.clear()  # only the housekeeping: no topics, no consumers
    core.runtime.topics = []
    core.runtime.relay_enabled = False
    names = [name for name, _, _ in core.runtime.extra_parts]
    assert names.count("retention") == 1  # wired once, in build_core

    now = core.clock.now()
    with deleted_per_statement(engine) as counts:
        await core.runtime.start()
        try:
            # a few runs with nothing to do (each deletes from the inbox, then the outbox)
            async def statements() -> int:
                return len(counts)

            assert await eventually(statements, lambda n: n >= 4, timeout=10) >= 4
            assert not any(counts)
            # 12 days: past this service's 10 (the default 14 would keep it)
            await add_inbox(engine, [(f"old-{n}", timedelta(days=12)) for n in range(5)], now)
            await add_inbox(engine, [("recent", timedelta(days=8))], now)
            async with engine.begin() as conn:
                for published_at in (now - timedelta(hours=7), now - timedelta(hours=5), None):
                    await conn.execute(outbox.insert().values(topic="t", published_at=published_at))

            async def state() -> tuple[set[str], int]:
                async with engine.connect() as conn:
                    left = await conn.scalar(select(func.count()).select_from(outbox))
                return await inbox_ids(engine), int(left or 0)

            # a later run picks them up: the job keeps running
            seen = await eventually(state, lambda s: s == ({"recent"}, 2), timeout=10)
        finally:
            await core.runtime.stop()
            bus.close()
    assert seen == ({"recent"}, 2)
    assert all(n <= 2 for n in counts)  # batches of batch_size
    assert sum(counts) == 6
