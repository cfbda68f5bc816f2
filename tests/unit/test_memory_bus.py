"""What is particular to the in-process bus: its partitioner, its assignment and rebalances, its
file. The Kafka contract it shares is in tests/integration/test_bus_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.memory import (
    BusFileInUse,
    MemoryBus,
    MemorySubscription,
    UnknownTopic,
    assign_round_robin,
    murmur2,
    partition_for,
)
from shared.messaging.pipeline import BatchResult, DeadLetter, Incoming, Pipeline
from shared.messaging.transport import OutgoingRecord, Record, RevokeHook, TopicPartition
from tests.support.services import eventually

T = "orders"


async def no_hook(_: set[TopicPartition]) -> None:
    return None


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    memory = MemoryBus(clock=FrozenClock())
    await memory.ensure_topics([T], 3)
    yield memory
    memory.close()


async def publish(bus: MemoryBus, records: Sequence[OutgoingRecord]) -> None:
    publisher = bus.publisher()
    await publisher.start()
    await publisher.publish(records)
    await publisher.stop()


def keyed(n: int, topic: str = T) -> list[OutgoingRecord]:
    return [OutgoingRecord(topic, f"key-{i % 6}".encode(), str(i).encode()) for i in range(n)]


async def member(
    bus: MemoryBus, group: str = "g", topics: Sequence[str] = (T,), hook: Any = no_hook
) -> MemorySubscription:
    sub = bus.subscription(group, topics)
    await sub.start(hook)
    return sub


async def drain(sub: MemorySubscription) -> list[Record]:
    out: list[Record] = []
    while batch := await sub.poll(1000, 0):
        out.extend(batch)
    return out


# -- partitioner ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # the reference values of Kafka's own tests (UtilsTest.testMurmur2)
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_gives_kafkas_reference_values(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(key=st.binary(max_size=64), partitions=st.integers(min_value=1, max_value=64))
def test_a_key_always_maps_to_the_same_partition_in_range(key: bytes, partitions: int) -> None:
    chosen = partition_for(key, partitions)
    assert 0 <= chosen < partitions
    assert partition_for(bytes(key), partitions) == chosen


async def test_records_of_one_key_share_a_partition_and_keyless_records_go_round_robin(
    bus: MemoryBus,
) -> None:
    await publish(bus, keyed(12) + [OutgoingRecord(T, None, b"free") for _ in range(6)])
    sub = await member(bus)
    got = await drain(sub)
    await sub.stop()

    for r in got:
        if r.key is not None:
            assert r.partition == partition_for(r.key, 3)
    assert sorted(r.partition for r in got if r.key is None) == [0, 0, 1, 1, 2, 2]


async def test_offsets_count_from_zero_per_partition_and_records_carry_the_clock_time() -> None:
    clock = FrozenClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    bus = MemoryBus(clock=clock)
    await bus.ensure_topics([T], 3)
    await publish(bus, keyed(30))
    sub = await member(bus)
    got = await drain(sub)
    await sub.stop()
    bus.close()

    by_partition: dict[int, list[int]] = {}
    for r in got:
        by_partition.setdefault(r.partition, []).append(r.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    assert {r.timestamp_ms for r in got} == {int(clock.now().timestamp() * 1000)}


# -- assignment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([["a"]], [{("a", 0), ("a", 1), ("a", 2)}]),
        ([["a"], ["a"]], [{("a", 0), ("a", 2)}, {("a", 1)}]),
        ([["a"], ["a"], ["a"], ["a"]], [{("a", 0)}, {("a", 1)}, {("a", 2)}, set()]),
        (
            [["a"], ["a", "b"]],
            [{("a", 0), ("a", 2)}, {("a", 1), ("b", 0), ("b", 1)}],
        ),
        ([["missing"], ["a"]], [set(), {("a", 0), ("a", 1), ("a", 2)}]),
        ([], []),
    ],
)
def test_partitions_are_dealt_round_robin_in_member_order(
    members: list[list[str]], expected: list[set[TopicPartition]]
) -> None:
    assert assign_round_robin(members, {"a": 3, "b": 2}) == expected


@given(
    members=st.lists(st.sets(st.sampled_from(["a", "b", "c"]), min_size=1), min_size=1, max_size=6),
    counts=st.fixed_dictionaries(
        {"a": st.integers(1, 8), "b": st.integers(1, 8), "c": st.integers(1, 8)}
    ),
)
def test_every_subscribed_partition_goes_to_exactly_one_subscriber(
    members: list[set[str]], counts: dict[str, int]
) -> None:
    shares = assign_round_robin(members, counts)

    dealt = [tp for share in shares for tp in share]
    subscribed = {t for topics in members for t in topics}
    assert sorted(dealt) == sorted((t, p) for t in subscribed for p in range(counts[t]))
    for topics, share in zip(members, shares, strict=True):
        assert {t for t, _ in share} <= topics
    if all(topics == members[0] for topics in members):
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1


# -- rebalances ----------------------------------------------------------------------------------


async def test_a_joining_member_takes_partitions_only_after_the_losers_hook_ran(
    bus: MemoryBus,
) -> None:
    seen: list[tuple[set[TopicPartition], set[TopicPartition]]] = []
    newcomer = bus.subscription("g", [T])

    async def hook(revoked: set[TopicPartition]) -> None:
        seen.append((revoked, newcomer.assignment()))

    first = await member(bus, hook=hook)
    assert first.assignment() == {(T, 0), (T, 1), (T, 2)}
    await newcomer.start(no_hook)

    assert first.assignment() == {(T, 0), (T, 2)}
    assert newcomer.assignment() == {(T, 1)}
    assert seen == [({(T, 1)}, set())]
    await newcomer.stop()
    await first.stop()


async def test_a_join_waits_for_the_batch_in_flight_and_resumes_from_its_commit(
    bus: MemoryBus,
) -> None:
    await publish(bus, keyed(30))
    gate = asyncio.Event()
    revoking = asyncio.Event()
    holder: list[MemorySubscription] = []
    read: dict[TopicPartition, int] = {}

    async def finish_batch(revoked: set[TopicPartition]) -> None:
        revoking.set()
        await gate.wait()
        await holder[0].commit({tp: read[tp] for tp in revoked})

    first = await member(bus, hook=finish_batch)
    holder.append(first)
    for r in await drain(first):
        read[r.tp] = r.offset + 1
    newcomer = bus.subscription("g", [T])
    joining = asyncio.create_task(newcomer.start(no_hook))
    await asyncio.wait_for(revoking.wait(), 2)  # the join reached the first member's hook

    assert not joining.done(), "the join did not wait for the on_revoke hook"
    assert newcomer.assignment() == set()
    assert (T, 1) in first.assignment()
    gate.set()
    await asyncio.wait_for(joining, 2)

    assert newcomer.assignment() == {(T, 1)}
    assert bus.committed("g") == {(T, 1): read[(T, 1)]}
    assert await newcomer.poll(100, 0) == []
    await newcomer.stop()
    await first.stop()


async def test_a_leaving_member_hands_its_partitions_over_without_its_own_hook(
    bus: MemoryBus,
) -> None:
    calls: list[str] = []

    def recording(name: str) -> Any:
        async def hook(_: set[TopicPartition]) -> None:
            calls.append(name)

        return hook

    first = await member(bus, hook=recording("first"))
    second = await member(bus, hook=recording("second"))
    calls.clear()
    await second.stop()

    assert first.assignment() == {(T, 0), (T, 1), (T, 2)}
    assert second.assignment() == set()
    assert calls == []
    await first.stop()


async def test_a_member_that_stops_while_its_hook_waits_does_not_block_the_rebalance(
    bus: MemoryBus,
) -> None:
    # ConsumerRunner's shape: the hook waits for a lock the member holds while it stops.
    lock = asyncio.Lock()
    revoking = asyncio.Event()

    async def wait_for_batch(_: set[TopicPartition]) -> None:
        revoking.set()
        async with lock:
            pass

    first = await member(bus, hook=wait_for_batch)
    async with lock:
        joining = asyncio.create_task(member(bus))
        await asyncio.wait_for(revoking.wait(), 2)  # the join waits on the hook, the hook on us
        assert not joining.done()
        await asyncio.wait_for(first.stop(), 2)
    second = await asyncio.wait_for(joining, 2)

    assert second.assignment() == {(T, 0), (T, 1), (T, 2)}
    await second.stop()


async def test_a_failing_hook_is_logged_and_the_partitions_still_move(
    bus: MemoryBus, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(_: set[TopicPartition]) -> None:
        raise RuntimeError("boom")

    first = await member(bus, hook=broken)
    second = await member(bus)

    assert second.assignment() == {(T, 1)}
    assert first.assignment() == {(T, 0), (T, 2)}
    assert "on_revoke hook failed" in caplog.text
    await second.stop()
    await first.stop()


async def test_a_topic_created_after_subscribing_is_assigned(bus: MemoryBus) -> None:
    sub = await member(bus, topics=[T, "later"])
    assert sub.assignment() == {(T, 0), (T, 1), (T, 2)}

    await bus.ensure_topics(["later"], 2)
    await publish(bus, [OutgoingRecord("later", b"k", b"v")])

    assert {("later", 0), ("later", 1)} <= sub.assignment()
    assert [r.value for r in await sub.poll(10, 0) if r.topic == "later"] == [b"v"]
    await sub.stop()


async def test_a_stopped_subscription_can_start_again_and_resumes_from_its_commit(
    bus: MemoryBus,
) -> None:
    await publish(bus, keyed(12))
    sub = await member(bus)
    first = await drain(sub)
    await sub.commit({r.tp: r.offset + 1 for r in first[:4]})
    await sub.stop()
    await sub.start(no_hook)
    again = await drain(sub)
    await sub.stop()

    committed = bus.committed("g")
    assert sorted((r.tp, r.offset) for r in again) == sorted(
        (r.tp, r.offset) for r in first if r.offset >= committed.get(r.tp, 0)
    )
    assert len(again) == 12 - sum(committed.values())


# -- poll, publish ---------------------------------------------------------------------------


async def test_poll_returns_at_most_max_records_and_waits_out_its_timeout(bus: MemoryBus) -> None:
    await publish(bus, keyed(10))
    sub = await member(bus)

    assert len(await sub.poll(4, 0)) == 4
    assert len(await sub.poll(100, 0)) == 6
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sub.poll(10, 150) == []
    assert loop.time() - started >= 0.14
    with pytest.raises(ValueError, match="max_records"):
        await sub.poll(0, 0)
    await sub.stop()
    with pytest.raises(RuntimeError, match="not started"):
        await sub.poll(1, 0)


async def test_a_poll_in_progress_returns_empty_when_its_member_stops(bus: MemoryBus) -> None:
    sub = await member(bus)
    waiting = asyncio.create_task(sub.poll(10, 10_000))

    async def poll_waits() -> bool:  # the poll found nothing and waits for a wake-up
        return not sub._wake.is_set()

    assert await eventually(poll_waits, bool, timeout=2, interval=0.001)
    assert not waiting.done()
    await sub.stop()
    assert await asyncio.wait_for(waiting, 1) == []


async def test_publishing_to_an_unknown_topic_fails_and_appends_nothing(bus: MemoryBus) -> None:
    publisher = bus.publisher()
    with pytest.raises(RuntimeError, match="not started"):
        await publisher.publish(keyed(1))
    await publisher.start()
    with pytest.raises(UnknownTopic, match="nowhere"):
        await publisher.publish([*keyed(3), OutgoingRecord("nowhere", b"k", b"v")])
    await publisher.stop()

    sub = await member(bus)
    assert await sub.poll(10, 0) == []
    await sub.stop()


# -- the real ConsumerRunner ---------------------------------------------------------------------


class RecordingPipeline(Pipeline):
    """Stands in for the database transaction: records what each batch handled; the first
    batch waits for ``gate``."""

    def __init__(self, name: str, gate: asyncio.Event) -> None:
        self.consumer = name
        self.gate = gate
        self.entered = asyncio.Event()
        self.handled: list[bytes] = []

    async def transact_reliably(
        self,
        items: Sequence[Incoming[Any]],
        dead: Sequence[DeadLetter] = (),
        stopping: asyncio.Event | None = None,
    ) -> BatchResult:
        self.entered.set()
        await self.gate.wait()
        self.handled.extend(i.payload for i in items)
        return BatchResult(len(items), 0, len(dead))


class RevokeWatched(MemorySubscription):
    """A member that tells when the group asks it to give partitions up."""

    def __init__(self, bus: MemoryBus, group: str, topics: Sequence[str]) -> None:
        super().__init__(bus, group, topics)
        self.revoking = asyncio.Event()

    async def start(self, on_revoke: RevokeHook) -> None:
        async def hook(partitions: set[TopicPartition]) -> None:
            self.revoking.set()
            await on_revoke(partitions)

        await super().start(hook)


def decode(record: Record) -> Incoming[Any]:
    event = CloudEvent(id=f"{record.tp}-{record.offset}", source="/test", type="test")
    return Incoming(event=event, payload=record.value, key=record.key, record=record)


async def test_consumer_runners_hand_over_a_batch_in_flight_without_loss_or_repeat(
    bus: MemoryBus,
) -> None:
    sent = keyed(60)
    await publish(bus, sent[:30])
    gate = asyncio.Event()
    pipelines = [RecordingPipeline("first", gate), RecordingPipeline("second", gate)]
    watched = RevokeWatched(bus, "g", [T])
    runners = [
        ConsumerRunner(sub, p, poll_timeout_ms=20, decode=decode)
        for sub, p in zip([watched, bus.subscription("g", [T])], pipelines, strict=True)
    ]
    first = asyncio.create_task(runners[0].run())
    await asyncio.wait_for(pipelines[0].entered.wait(), 2)  # a batch waits in "the transaction"
    second = asyncio.create_task(runners[1].run())
    await asyncio.wait_for(watched.revoking.wait(), 2)  # the join asks the first to let go
    assert not runners[1].started.is_set(), "the join did not wait for the batch in flight"

    gate.set()
    await asyncio.wait_for(runners[1].started.wait(), 2)
    await publish(bus, sent[30:])

    async def handled_so_far() -> int:
        return sum(len(p.handled) for p in pipelines)

    await eventually(handled_so_far, lambda n: n >= 60, timeout=5, interval=0.01)
    for r in runners:
        r.stop()
    await asyncio.wait_for(asyncio.gather(first, second), 5)

    handled = pipelines[0].handled + pipelines[1].handled
    assert sorted(handled) == sorted(r.value or b"" for r in sent)
    assert pipelines[1].handled, "the second runner handled nothing"
    ends = {(T, p): len([r for r in sent if partition_for(r.key or b"", 3) == p]) for p in range(3)}
    assert bus.committed("g") == {tp: n for tp, n in ends.items() if n}


# -- the bus file --------------------------------------------------------------------------------


async def test_records_and_commits_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite"
    clock = FrozenClock()
    bus = MemoryBus(path, clock=clock)
    await bus.ensure_topics([T, "empty"], 3)
    await publish(
        bus,
        [
            *keyed(12),
            OutgoingRecord(T, None, b"keyless", (("h", b"\x00\xff"), ("ce_id", b"1"))),
            OutgoingRecord(T, b"k", None),
        ],
    )
    sub = await member(bus)
    before = await drain(sub)
    await sub.commit({r.tp: r.offset + 1 for r in before if r.offset < 2})
    await sub.stop()
    bus.close()

    reopened = MemoryBus(path, clock=clock)
    assert reopened.topics() == {T: 3, "empty": 3}
    assert reopened.committed("g") == {r.tp: 2 for r in before if r.offset == 1}
    everything = await member(reopened, group="fresh")
    assert sorted(await drain(everything), key=_place) == sorted(before, key=_place)
    resumed = await member(reopened)
    rest = await drain(resumed)
    assert sorted(rest, key=_place) == sorted((r for r in before if r.offset >= 2), key=_place)
    await publish(reopened, [OutgoingRecord(T, b"key-0", b"after")])
    [after] = await resumed.poll(10, 0)
    assert after.offset == max(r.offset for r in before if r.tp == after.tp) + 1
    await everything.stop()
    await resumed.stop()
    reopened.close()


def _place(r: Record) -> tuple[str, int, int]:
    return (r.topic, r.partition, r.offset)


async def test_a_second_bus_cannot_open_a_file_in_use(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite"
    first = MemoryBus(path)
    with pytest.raises(BusFileInUse):
        MemoryBus(path)
    first.close()
    MemoryBus(path).close()
