"""One contract for every transport: the real Kafka broker and the in-process ``MemoryBus`` pass
the same tests. Kafka's group joins happen in the background, so every wait is a loop with a
deadline; the bus settles at once."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from shared.messaging.kafka import KafkaTransport
from shared.messaging.memory import MemoryBus, partition_for
from shared.messaging.transport import (
    OutgoingRecord,
    Publisher,
    PublishFailed,
    Record,
    RevokeHook,
    Subscription,
    TopicPartition,
    Transport,
)
from tests.support.services import eventually

pytestmark = pytest.mark.integration

PARTITIONS = 3


async def _no_hook(_: set[TopicPartition]) -> None:
    return None


@dataclass
class Bus:
    """A transport plus the timings that suit it; stops everything it opened."""

    kind: str
    transport: Transport
    join_timeout: float
    settle: float
    poll_ms: int
    opened: list[Subscription | Publisher] = field(default_factory=list)

    async def topic(self, partitions: int = PARTITIONS) -> str:
        name = f"contract-{uuid.uuid4().hex[:10]}"
        await self.transport.ensure_topics([name], partitions)
        return name

    @staticmethod
    def group() -> str:
        return f"group-{uuid.uuid4().hex[:10]}"

    async def publish(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        publisher = self.transport.publisher()
        await publisher.start()
        self.opened.append(publisher)
        try:
            await publisher.publish([OutgoingRecord(topic, k, v) for k, v in records])
        finally:
            await publisher.stop()

    async def member(
        self, group: str, topics: Sequence[str], on_revoke: RevokeHook = _no_hook
    ) -> Subscription:
        """A started member; returns once it has partitions."""
        sub = self.transport.subscription(group, topics)
        self.opened.append(sub)
        await sub.start(on_revoke)
        assert await self.until(lambda: bool(sub.assignment())), f"{self.kind}: never assigned"
        return sub

    async def until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.join_timeout)
        while not condition():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def split(self, *members: Subscription, partitions: int = PARTITIONS) -> bool:
        """Wait until the members own disjoint, non-empty shares covering every partition."""

        def settled() -> bool:
            shares = [m.assignment() for m in members]
            union = set().union(*shares)
            return all(shares) and len(union) == partitions == sum(len(s) for s in shares)

        return await self.until(settled)

    async def collect(
        self, members: Sequence[Subscription], expect: int, timeout: float = 20.0
    ) -> list[list[Record]]:
        """Poll the members until ``expect`` records arrived in all, then ``settle`` seconds
        more to catch extras. Returns each member's records, in the order received."""
        got: list[list[Record]] = [[] for _ in members]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settle_until: float | None = None
        while loop.time() < deadline:
            if settle_until is not None and loop.time() >= settle_until:
                break
            for i, member in enumerate(members):
                got[i].extend(await member.poll(500, self.poll_ms))
            if settle_until is None and sum(len(g) for g in got) >= expect:
                settle_until = loop.time() + self.settle
        return got

    async def close(self) -> None:
        for thing in reversed(self.opened):
            await thing.stop()


@pytest.fixture(params=["kafka", "memory"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "kafka":
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        harness = Bus(
            "kafka",
            KafkaTransport(bootstrap, "contract", session_timeout_ms=6000),
            join_timeout=30.0,
            settle=1.0,
            poll_ms=100,
        )
        yield harness
        await harness.close()
    else:
        memory = MemoryBus()
        harness = Bus("memory", memory, join_timeout=2.0, settle=0.05, poll_ms=10)
        yield harness
        await harness.close()
        memory.close()


def values(records: Iterable[Record]) -> list[bytes]:
    return [r.value or b"" for r in records]


def numbered(n: int, keys: int = 6) -> list[tuple[bytes | None, bytes]]:
    return [(f"key-{i % keys}".encode(), str(i).encode()) for i in range(n)]


async def test_records_with_one_key_arrive_in_the_order_they_were_published(bus: Bus) -> None:
    topic = await bus.topic()
    sent = numbered(120, keys=7)
    for start in range(0, len(sent), 40):
        await bus.publish(topic, sent[start : start + 40])
    member = await bus.member(bus.group(), [topic])

    [got] = await bus.collect([member], len(sent))

    per_key: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in got:
        per_key[r.key or b""].append(int(r.value or b"-1"))
        partitions[r.key or b""].add(r.partition)
    assert sorted(v for seen in per_key.values() for v in seen) == list(range(120))
    for key, seen in per_key.items():
        assert seen == sorted(seen), f"{key!r} out of order"
        assert len(partitions[key]) == 1, f"{key!r} spread over {partitions[key]}"


async def test_a_key_lands_on_the_partition_kafkas_default_partitioner_picks(bus: Bus) -> None:
    topic = await bus.topic()
    await bus.publish(topic, [(f"cus_{i}".encode(), b"x") for i in range(30)])
    member = await bus.member(bus.group(), [topic])

    [got] = await bus.collect([member], 30)

    assert len(got) == 30
    assert {r.partition for r in got} == set(range(PARTITIONS))
    for r in got:
        assert r.key is not None
        assert r.partition == partition_for(r.key, PARTITIONS), r.key


async def test_every_group_receives_every_record_independently(bus: Bus) -> None:
    topic = await bus.topic()
    sent = numbered(60)
    await bus.publish(topic, sent[:30])
    first = await bus.member(bus.group(), [topic])
    second = await bus.member(bus.group(), [topic])
    await bus.publish(topic, sent[30:])

    got_first, got_second = await bus.collect([first, second], 2 * len(sent))

    expected = sorted(v for _, v in sent)
    assert sorted(values(got_first)) == expected
    assert sorted(values(got_second)) == expected


async def test_a_new_member_resumes_after_the_last_commit_and_gets_uncommitted_records_again(
    bus: Bus,
) -> None:
    topic, group = await bus.topic(), bus.group()
    await bus.publish(topic, numbered(30))
    first = await bus.member(group, [topic])
    [got] = await bus.collect([first], 30)
    assert len(got) == 30
    # commit the first two records of every partition, then leave without committing more
    await first.commit({r.tp: 2 for r in got})
    await first.stop()

    again = await bus.member(group, [topic])
    [redelivered] = await bus.collect([again], sum(1 for r in got if r.offset >= 2))

    assert sorted((r.tp, r.offset) for r in redelivered) == sorted(
        (r.tp, r.offset) for r in got if r.offset >= 2
    )


async def test_two_members_of_a_group_split_the_partitions_and_together_see_every_record(
    bus: Bus,
) -> None:
    topic, group = await bus.topic(), bus.group()
    first = await bus.member(group, [topic])
    second = await bus.member(group, [topic])
    assert await bus.split(first, second), (first.assignment(), second.assignment())

    sent = numbered(60)
    await bus.publish(topic, sent)
    got_first, got_second = await bus.collect([first, second], len(sent))

    assert got_first, "the first member received nothing"
    assert got_second, "the second member received nothing"
    assert {r.tp for r in got_first} <= first.assignment()
    assert {r.tp for r in got_second} <= second.assignment()
    assert sorted(values(got_first + got_second)) == sorted(v for _, v in sent)


async def test_a_member_losing_partitions_runs_its_revoke_hook_before_the_new_owner_reads(
    bus: Bus,
) -> None:
    topic, group = await bus.topic(), bus.group()
    read: dict[TopicPartition, int] = {}
    revoked: set[TopicPartition] = set()
    owned_by_newcomer_during_hook: set[TopicPartition] = set()
    members: list[Subscription] = []

    async def finish_in_flight(partitions: set[TopicPartition]) -> None:
        # what ConsumerRunner's hook guarantees: the batch in flight is committed first
        revoked.update(partitions)
        if len(members) > 1:
            owned_by_newcomer_during_hook.update(members[1].assignment())
        await members[0].commit({tp: read[tp] for tp in partitions if tp in read})

    await bus.publish(topic, numbered(30))
    members.append(await bus.member(group, [topic], finish_in_flight))
    [got] = await bus.collect(members, 30)
    assert len(got) == 30
    for r in got:
        read[r.tp] = max(read.get(r.tp, 0), r.offset + 1)

    newcomer = bus.transport.subscription(group, [topic])
    bus.opened.append(newcomer)
    members.append(newcomer)
    await newcomer.start(_no_hook)
    assert await bus.split(*members), (members[0].assignment(), newcomer.assignment())

    assert newcomer.assignment() <= revoked
    assert not owned_by_newcomer_during_hook & revoked
    # nothing the hook committed comes again; only new records arrive
    fresh = [(k, b"new-" + v) for k, v in numbered(12)]
    await bus.publish(topic, fresh)
    got_old, got_new = await bus.collect(members, len(fresh))
    assert sorted(values(got_old + got_new)) == sorted(v for _, v in fresh)
    assert got_new, "the new owner received nothing"


async def test_a_member_that_stops_hands_its_partitions_to_the_rest(bus: Bus) -> None:
    topic, group = await bus.topic(), bus.group()
    stays = await bus.member(group, [topic])
    leaves = await bus.member(group, [topic])
    assert await bus.split(stays, leaves)
    sent = numbered(60)
    await bus.publish(topic, sent)
    kept, left_behind = await bus.collect([stays, leaves], len(sent))
    await stays.commit({r.tp: r.offset + 1 for r in kept})
    assert left_behind, "the leaving member received nothing"

    await leaves.stop()  # without committing
    assert await bus.until(lambda: len(stays.assignment()) == PARTITIONS)
    [redelivered] = await bus.collect([stays], len(left_behind))

    assert sorted(values(redelivered)) == sorted(values(left_behind))


async def test_a_commit_for_a_partition_the_member_does_not_own_is_ignored(bus: Bus) -> None:
    topic, group = await bus.topic(), bus.group()
    first = await bus.member(group, [topic])
    second = await bus.member(group, [topic])
    assert await bus.split(first, second)
    sent = numbered(60)
    await bus.publish(topic, sent)
    got_first, got_second = await bus.collect([first, second], len(sent))
    assert got_second, "the second member received nothing"
    not_owned = second.assignment()

    ends: dict[TopicPartition, int] = {}
    for r in got_first + got_second:
        ends[r.tp] = max(ends.get(r.tp, 0), r.offset + 1)
    await first.commit(ends)  # only its own partitions may take this
    await second.stop()
    await first.stop()

    later = await bus.member(group, [topic])
    [redelivered] = await bus.collect([later], len(got_second))

    assert {r.tp for r in redelivered} == not_owned
    assert sorted(values(redelivered)) == sorted(values(got_second))


async def test_lag_counts_the_records_not_yet_polled(bus: Bus) -> None:
    topic = await bus.topic()
    await bus.publish(topic, numbered(10))
    member = await bus.member(bus.group(), [topic])

    got: list[Record] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(got) < 4 and loop.time() < deadline:
        got.extend(await member.poll(4 - len(got), bus.poll_ms))
    assert len(got) == 4

    lag = await eventually(member.lag, lambda lag: sum(lag.values()) == 6, timeout=bus.join_timeout)
    assert sum(lag.values()) == 6, lag
    assert set(lag) <= member.assignment()

    await bus.collect([member], 6)
    lag = await eventually(member.lag, lambda lag: sum(lag.values()) == 0, timeout=bus.join_timeout)
    assert lag == dict.fromkeys(member.assignment(), 0)


async def test_poll_returns_a_record_published_while_it_waits(bus: Bus) -> None:
    topic = await bus.topic()
    member = await bus.member(bus.group(), [topic])
    assert await member.poll(10, 200) == []

    polling = asyncio.Event()

    async def poll() -> list[Record]:
        polling.set()
        return await member.poll(10, 10_000)

    waiting = asyncio.create_task(poll())
    await asyncio.wait_for(polling.wait(), 5)
    assert not waiting.done()  # the record comes while this poll is in progress
    await bus.publish(topic, [(b"k", b"v")])
    started = asyncio.get_running_loop().time()
    got = await asyncio.wait_for(waiting, 15)
    assert values(got) == [b"v"]
    assert asyncio.get_running_loop().time() - started < 5


async def test_ensure_topics_leaves_an_existing_topic_as_it_is(bus: Bus) -> None:
    topic = await bus.topic(partitions=2)
    await bus.transport.ensure_topics([topic], 2)
    await bus.transport.ensure_topics([topic, topic], 5)

    member = await bus.member(bus.group(), [topic])
    await bus.publish(topic, numbered(20))
    [got] = await bus.collect([member], 20)

    assert member.assignment() == {(topic, 0), (topic, 1)}
    assert len(got) == 20
    assert {r.partition for r in got} <= {0, 1}


async def test_publish_each_refuses_what_the_broker_never_takes_and_publishes_the_rest(
    bus: Bus,
) -> None:
    topic = await bus.topic(partitions=1)
    publisher = bus.transport.publisher()
    await publisher.start()
    bus.opened.append(publisher)
    records = [
        OutgoingRecord(topic, b"k", b"1"),
        OutgoingRecord(topic, b"k", b"x" * publisher.max_record_bytes),  # too large with framing
        OutgoingRecord("not a topic!", b"k", b"2"),
        OutgoingRecord(topic, b"k", b"3"),
    ]
    outcomes = await publisher.publish_each(records)
    assert [(o.status, o.code) for o in outcomes] == [
        ("published", ""),
        ("refused", "record_too_large"),
        ("refused", "invalid_topic"),
        ("published", ""),
    ]
    with pytest.raises(PublishFailed, match="record_too_large"):
        await publisher.publish([records[1]])

    member = await bus.member(bus.group(), [topic])
    [got] = await bus.collect([member], 2)
    assert values(got) == [b"1", b"3"]
