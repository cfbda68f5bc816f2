"""The consumer decodes the next batch while the current batch's transaction runs, and still
commits offsets only after each transaction, in order; a rebalance or a stop in between loses
nothing and handles nothing twice. On the in-process bus, which keeps Kafka's contract (the
real broker and PostgreSQL: tests/integration/test_ingest_overlap.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.memory import MemoryBus, MemorySubscription, partition_for
from shared.messaging.pipeline import BatchResult, DeadLetter, Incoming, Pipeline
from shared.messaging.transport import OutgoingRecord, Record, RevokeHook, TopicPartition
from tests.support.services import eventually

T = "orders"
PARTITIONS = 3


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    memory = MemoryBus(clock=FrozenClock())
    await memory.ensure_topics([T], PARTITIONS)
    yield memory
    memory.close()


def keyed(start: int, n: int) -> list[OutgoingRecord]:
    return [OutgoingRecord(T, f"key-{i % 6}".encode(), str(i).encode()) for i in range(start, n)]


def tp_of(record: OutgoingRecord) -> TopicPartition:
    return (T, partition_for(record.key or b"", PARTITIONS))


def ends(records: Sequence[OutgoingRecord]) -> dict[TopicPartition, int]:
    """The committed positions once ``records`` (the first ones published) are all handled."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        out[tp_of(r)] = out.get(tp_of(r), 0) + 1
    return out


async def publish(bus: MemoryBus, records: Sequence[OutgoingRecord]) -> None:
    publisher = bus.publisher()
    await publisher.start()
    await publisher.publish(records)
    await publisher.stop()


class Decoder:
    """The decode step, noting every record it was given."""

    def __init__(self) -> None:
        self.seen: list[Record] = []

    def __call__(self, record: Record) -> Incoming[Any]:
        self.seen.append(record)
        event = CloudEvent(id=f"{record.tp}-{record.offset}", source="/test", type="test")
        return Incoming(event=event, payload=record.value, key=record.key, record=record)

    async def count(self) -> int:
        return len(self.seen)


class Polls:
    """A member of the group on the bus (a real ``MemorySubscription``) that counts the polls
    that came back empty and notes when its ``on_revoke`` hook is called."""

    def __init__(self, inner: MemorySubscription) -> None:
        self.inner = inner
        self.empty = 0
        self.revoking = asyncio.Event()

    async def start(self, on_revoke: RevokeHook) -> None:
        async def hook(partitions: set[TopicPartition]) -> None:
            self.revoking.set()
            await on_revoke(partitions)

        await self.inner.start(hook)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def poll(self, max_records: int, timeout_ms: int) -> list[Record]:
        records = await self.inner.poll(max_records, timeout_ms)
        self.empty += not records
        return records

    async def empty_since(self, count: int) -> int:
        return self.empty - count


class GatedPipeline(Pipeline):
    """Stands in for the database transaction: every transaction waits for ``gate``; each notes
    what it handled and the group's committed positions when it began."""

    def __init__(self, name: str, bus: MemoryBus, gate: asyncio.Event) -> None:
        self.consumer = name
        self.bus = bus
        self.gate = gate
        self.entered = asyncio.Event()
        self.batches: list[list[bytes]] = []
        self.committed_at_start: list[dict[TopicPartition, int]] = []

    async def transact_reliably(
        self,
        items: Sequence[Incoming[Any]],
        dead: Sequence[DeadLetter] = (),
        stopping: asyncio.Event | None = None,
    ) -> BatchResult:
        self.committed_at_start.append(self.bus.committed("g"))
        self.entered.set()
        await self.gate.wait()
        self.batches.append([i.payload for i in items])
        return BatchResult(len(items), 0, len(dead))

    async def handled(self) -> int:
        return sum(len(b) for b in self.batches)


def values(records: Sequence[OutgoingRecord]) -> list[bytes]:
    return sorted(r.value or b"" for r in records)


async def test_the_next_batch_is_decoded_during_the_transaction_and_committed_only_after_it(
    bus: MemoryBus,
) -> None:
    sent = keyed(0, 20)
    await publish(bus, sent[:10])
    gate = asyncio.Event()
    pipeline = GatedPipeline("c", bus, gate)
    decoder = Decoder()
    polls = Polls(bus.subscription("g", [T]))
    runner = ConsumerRunner(polls, pipeline, max_batch=10, poll_timeout_ms=20, decode=decoder)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(pipeline.entered.wait(), 5)  # batch 1 is held in its transaction
    held = polls.empty
    # and the next poll came back empty: the next records arrive while the transaction runs
    assert await eventually(lambda: polls.empty_since(held), lambda n: n >= 1, interval=0.01) >= 1
    await publish(bus, sent[10:])

    decoded = await eventually(decoder.count, lambda n: n == 20, timeout=5, interval=0.01)
    assert decoded == 20, "the next batch was not decoded while the transaction ran"
    assert bus.committed("g") == {}, "an offset was committed before its transaction"
    assert pipeline.batches == []

    gate.set()
    done = await eventually(pipeline.handled, lambda n: n == 20, timeout=5, interval=0.01)
    assert done == 20
    runner.stop()
    await asyncio.wait_for(task, 5)

    assert [sorted(b) for b in pipeline.batches] == [values(sent[:10]), values(sent[10:])]
    # batch 2's transaction began only once batch 1's offsets were committed
    assert pipeline.committed_at_start == [{}, ends(sent[:10])]
    assert bus.committed("g") == ends(sent)


async def test_a_batch_decoded_ahead_leaves_out_the_partitions_revoked_meanwhile(
    bus: MemoryBus,
) -> None:
    sent = keyed(0, 60)
    await publish(bus, sent[:30])
    gate = asyncio.Event()
    first = GatedPipeline("first", bus, gate)
    decoder = Decoder()
    polls = Polls(bus.subscription("g", [T]))
    runner = ConsumerRunner(polls, first, max_batch=30, poll_timeout_ms=20, decode=decoder)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(first.entered.wait(), 5)
    held = polls.empty
    # and the next poll came back empty: the next records arrive while the transaction runs
    assert await eventually(lambda: polls.empty_since(held), lambda n: n >= 1, interval=0.01) >= 1
    await publish(bus, sent[30:])
    decoded = await eventually(decoder.count, lambda n: n == 60, timeout=5, interval=0.01)
    assert decoded == 60, "the next batch was not decoded while the transaction ran"

    # a second member joins: partitions move once the first member's batch in flight commits
    opened = asyncio.Event()
    opened.set()
    second = GatedPipeline("second", bus, opened)
    joiner = ConsumerRunner(
        bus.subscription("g", [T]), second, poll_timeout_ms=20, decode=Decoder()
    )
    other = asyncio.create_task(joiner.run())
    await asyncio.wait_for(polls.revoking.wait(), 5)  # the join reached the first member's hook
    assert not joiner.started.is_set(), "the join did not wait for the batch in flight"
    gate.set()
    await asyncio.wait_for(joiner.started.wait(), 5)
    moved = joiner.subscription.assignment()
    assert moved, "no partition moved to the second member"

    async def handled() -> int:
        return await first.handled() + await second.handled()

    assert await eventually(handled, lambda n: n >= 60, timeout=5, interval=0.01) == 60
    runner.stop()
    joiner.stop()
    await asyncio.wait_for(asyncio.gather(task, other), 5)

    partition = {r.value: tp_of(r) for r in sent}
    after_revocation = [v for batch in first.batches[1:] for v in batch]
    assert not [v for v in after_revocation if partition[v] in moved], (
        "records of a revoked partition were handled after the revocation"
    )
    everything = [v for p in (first, second) for batch in p.batches for v in batch]
    assert sorted(everything) == values(sent), "a record was lost or handled twice"
    assert {partition[v] for b in second.batches for v in b} == moved
    assert bus.committed("g") == ends(sent)


async def test_stop_commits_the_batch_in_flight_and_not_the_batch_decoded_ahead(
    bus: MemoryBus,
) -> None:
    sent = keyed(0, 20)
    await publish(bus, sent[:10])
    gate = asyncio.Event()
    pipeline = GatedPipeline("c", bus, gate)
    decoder = Decoder()
    polls = Polls(bus.subscription("g", [T]))
    runner = ConsumerRunner(polls, pipeline, max_batch=10, poll_timeout_ms=20, decode=decoder)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(pipeline.entered.wait(), 5)
    held = polls.empty
    # and the next poll came back empty: the next records arrive while the transaction runs
    assert await eventually(lambda: polls.empty_since(held), lambda n: n >= 1, interval=0.01) >= 1
    await publish(bus, sent[10:])
    assert await eventually(decoder.count, lambda n: n == 20, timeout=5, interval=0.01) == 20

    runner.stop()
    gate.set()
    await asyncio.wait_for(task, 5)
    assert [sorted(b) for b in pipeline.batches] == [values(sent[:10])]
    assert bus.committed("g") == ends(sent[:10])

    # the group's next member reads the batch that was decoded ahead from the committed offset
    rest = GatedPipeline("next", bus, gate)
    successor = ConsumerRunner(
        bus.subscription("g", [T]), rest, poll_timeout_ms=20, decode=Decoder()
    )
    later = asyncio.create_task(successor.run())
    assert await eventually(rest.handled, lambda n: n >= 10, timeout=5, interval=0.01) == 10
    successor.stop()
    await asyncio.wait_for(later, 5)
    assert sorted(v for b in rest.batches for v in b) == values(sent[10:])
    assert bus.committed("g") == ends(sent)
