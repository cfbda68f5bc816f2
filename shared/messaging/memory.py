"""An in-process event bus with the Kafka transport's contract, for running without a broker.

``MemoryBus`` implements ``Transport``; its subscriptions and publishers implement
``Subscription`` and ``Publisher``, so the consume → transact → emit loop runs on it unchanged.
What it keeps from Kafka:

- **Partitions and order.** A topic has N partitions, each an append-only log with offsets from
  0. A keyed record goes to ``partition_for(key, N)``: Kafka's default partitioner (murmur2 of
  the key, made positive, modulo N), so a key lands on the same partition number as on a
  broker. Keyless records go round-robin. Order holds within a partition.
- **Consumer groups.** Every group sees every record. A group's partitions are divided among
  its live members round-robin over the partitions sorted by (topic, partition), members in
  join order (aiokafka's default ``RoundRobinPartitionAssignor`` does the same over member
  ids). A member joining or leaving, or a subscribed topic being created, rebalances the
  group: each member about to lose partitions first has its ``on_revoke`` hook awaited (the
  hook finishes and commits the batch in flight), then the partitions move.
- **Committed positions** per (group, topic, partition). A member that gains a partition reads
  from the group's committed position (or from 0), so records polled but not committed are
  delivered again after a rebalance or a restart: at least once. ``commit`` ignores partitions
  the member does not own.

Where it differs, on purpose:

- Rebalances are incremental: only partitions that move are revoked, and a member keeps its
  read position on the partitions it keeps (aiokafka revokes everything, then resumes every
  partition from its committed offset). ``start()`` returns once the member is assigned;
  ``stop()`` returns once the rest of the group has been rebalanced.
- ``stop()`` does not call the leaving member's own ``on_revoke`` (neither does aiokafka): the
  caller stops after finishing its batch. A member that stops while its hook is being awaited
  is not waited for; its partitions are simply released.
- There is no retention: every record stays in memory (and in the file) for the bus's life.
- Publishing to a topic that does not exist raises ``UnknownTopic`` at once (a broker with
  ``auto.create.topics.enable=false`` makes the producer wait for metadata, then time out);
  ``publish_each`` reports it per record as ``failed`` (``unknown_topic``).
- Limits as on a broker: a record over ``max_record_bytes`` (counted as Kafka counts it,
  ``serialized_size``; the Kafka publisher's ``max_request_size``) or with a topic name Kafka
  does not allow is refused.
- ``replication`` is ignored: there is one copy.

Durability: ``MemoryBus(path=...)`` keeps topics, records and committed positions in a SQLite
file (stdlib ``sqlite3``, WAL, one transaction per ``publish`` or ``commit``), loaded again when
the bus is made, so a restarted process resumes each group where it committed. It survives a
process crash, not necessarily a power cut (``synchronous=NORMAL``). The file is held
exclusively: a second bus on the same file raises ``BusFileInUse``. Writes are synchronous
inside the event loop; they are small. Without a path the bus lives in memory only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from shared.clock import Clock, SystemClock
from shared.errors import WinbackError
from shared.messaging.transport import (
    DEFAULT_MAX_RECORD_BYTES,
    PUBLISHED,
    Outcome,
    OutgoingRecord,
    PublishFailed,
    Record,
    RevokeHook,
    TopicPartition,
    record_problem,
)

log = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF


class UnknownTopic(WinbackError):
    """The topic does not exist on the bus; create it with ``ensure_topics`` first."""


class BusFileInUse(WinbackError):
    """Another bus (in this or another process) holds the bus file; only one may use it."""


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), signed as in
    Java."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK32
    whole = length & ~3
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & _MASK32
        k ^= k >> 24
        k = (k * m) & _MASK32
        h = ((h * m) & _MASK32) ^ k
    rest = length - whole
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * m) & _MASK32
    h ^= h >> 13
    h = (h * m) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def assign_round_robin(
    members: Sequence[Collection[str]], partitions: Mapping[str, int]
) -> list[set[TopicPartition]]:
    """Deal every partition of the subscribed topics, sorted by (topic, partition), to the
    members in order, skipping members not subscribed to the partition's topic.

    ``members`` holds each member's topics, in member order; ``partitions`` the partition
    count of each existing topic. Returns each member's partitions, in member order."""
    out: list[set[TopicPartition]] = [set() for _ in members]
    if not members:
        return out
    wanted = sorted({t for topics in members for t in topics if t in partitions})
    turn = itertools.cycle(range(len(members)))
    for topic in wanted:
        for partition in range(partitions[topic]):
            index = next(turn)
            while topic not in members[index]:
                index = next(turn)
            out[index].add((topic, partition))
    return out


class _Store:
    """The bus file: topics, records and committed positions in SQLite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction():  # takes the file's lock and keeps it (exclusive mode)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS topics "
                    "(name TEXT PRIMARY KEY, partitions INTEGER NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS records (topic TEXT NOT NULL, "
                    "partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, value BLOB, "
                    "headers TEXT NOT NULL, timestamp_ms INTEGER, "
                    "PRIMARY KEY (topic, partition, offset)) WITHOUT ROWID"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS commits (grp TEXT NOT NULL, topic TEXT NOT NULL, "
                    "partition INTEGER NOT NULL, position INTEGER NOT NULL, "
                    "PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID"
                )
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise BusFileInUse(f"{path} is in use by another bus") from exc
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def topics(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT name, partitions FROM topics"))

    def records(self) -> Iterator[Record]:
        rows = self._db.execute(
            "SELECT topic, partition, offset, key, value, headers, timestamp_ms FROM records "
            "ORDER BY topic, partition, offset"
        )
        for topic, partition, offset, key, value, headers, timestamp_ms in rows:
            yield Record(
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                value=value,
                headers=tuple((n, base64.b64decode(v)) for n, v in json.loads(headers)),
                timestamp_ms=timestamp_ms,
            )

    def commits(self) -> dict[str, dict[TopicPartition, int]]:
        out: dict[str, dict[TopicPartition, int]] = {}
        for group, topic, partition, position in self._db.execute(
            "SELECT grp, topic, partition, position FROM commits"
        ):
            out.setdefault(group, {})[(topic, partition)] = position
        return out

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO topics (name, partitions) VALUES (?, ?)",
                [(name, partitions) for name in names],
            )

    def append(self, records: Sequence[Record]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.topic,
                        r.partition,
                        r.offset,
                        r.key,
                        r.value,
                        json.dumps([[n, base64.b64encode(v).decode()] for n, v in r.headers]),
                        r.timestamp_ms,
                    )
                    for r in records
                ],
            )

    def commit(self, group: str, positions: Mapping[TopicPartition, int]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO commits VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, topic, partition) DO UPDATE SET position = excluded.position",
                [(group, t, p, position) for (t, p), position in positions.items()],
            )

    def close(self) -> None:
        self._db.close()


class _Topic:
    def __init__(self, partitions: int) -> None:
        self.logs: list[list[Record]] = [[] for _ in range(partitions)]
        self.keyless = itertools.count()

    def partition_of(self, key: bytes | None) -> int:
        if key is None:
            return next(self.keyless) % len(self.logs)
        return partition_for(key, len(self.logs))


class _Group:
    """One consumer group: its live members, who owns what, and its committed positions."""

    def __init__(self, name: str, bus: MemoryBus, committed: dict[TopicPartition, int]) -> None:
        self.name = name
        self.bus = bus
        self.committed = committed
        self.members: list[MemorySubscription] = []
        self.unsettled = False
        self._lock = asyncio.Lock()

    @property
    def rebalancing(self) -> bool:
        return self._lock.locked()

    def join(self, member: MemorySubscription) -> None:
        self.members.append(member)
        self.unsettled = True

    def leave(self, member: MemorySubscription) -> None:
        if member in self.members:
            self.members.remove(member)
        member._release()
        self.unsettled = True

    async def rebalance(self) -> None:
        """Move partitions until the assignment matches the round-robin target: members losing
        partitions run their ``on_revoke`` hooks first, then the gains are handed out."""
        self.unsettled = True
        async with self._lock:
            while True:
                members = list(self.members)
                target = assign_round_robin(
                    [m.topics for m in members], self.bus._partition_counts()
                )
                losing = [(m, m._owned - want) for m, want in zip(members, target, strict=True)]
                losing = [(m, lost) for m, lost in losing if lost]
                if not losing:
                    break
                # Membership may change while the hooks run: compute again afterwards.
                await asyncio.gather(*(m._revoke(lost) for m, lost in losing))
            for member, want in zip(members, target, strict=True):
                gained = want - member._owned
                if gained:
                    member._gain(gained, self.committed)
            self.unsettled = False
            log.debug("group rebalanced", extra={"group": self.name, "members": len(members)})


class MemorySubscription:
    """A member of a consumer group on a ``MemoryBus``; restartable after ``stop()``."""

    def __init__(self, bus: MemoryBus, group: str, topics: Sequence[str]) -> None:
        self.bus = bus
        self.group = group
        self.topics: tuple[str, ...] = tuple(dict.fromkeys(topics))
        self._on_revoke: RevokeHook | None = None
        self._joined = False
        self._owned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()
        self._left = asyncio.Event()
        self._turn = 0

    async def start(self, on_revoke: RevokeHook) -> None:
        """Join the group; returns once the group has been rebalanced with this member."""
        if self._joined:
            raise RuntimeError("the subscription is already started")
        self.bus._check_open()
        self._on_revoke = on_revoke
        self._left = asyncio.Event()
        self._joined = True
        group = self.bus._group(self.group)
        group.join(self)
        await group.rebalance()

    async def poll(self, max_records: int, timeout_ms: int) -> list[Record]:
        """Up to ``max_records`` records from the assigned partitions, waiting up to
        ``timeout_ms`` for the first. Empty on timeout or when stopped meanwhile."""
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        if not self._joined:
            raise RuntimeError("the subscription is not started")
        group = self.bus._group(self.group)
        if group.unsettled and not group.rebalancing:
            await group.rebalance()  # an earlier rebalance was cancelled half-way
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0, timeout_ms) / 1000
        await asyncio.sleep(0)  # a poll always lets other tasks run
        while True:
            self._wake.clear()
            records = self._take(max_records)
            left = deadline - loop.time()
            if records or not self._joined or left <= 0:
                return records
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        """Commit next-offset positions; partitions this member does not own are ignored."""
        owned = {tp: p for tp, p in positions.items() if self._joined and tp in self._owned}
        if owned:
            self.bus._commit(self.group, owned)

    def assignment(self) -> set[TopicPartition]:
        return set(self._owned)

    async def lag(self) -> dict[TopicPartition, int]:
        if not self._joined:
            raise RuntimeError("the subscription is not started")
        return {tp: max(0, self.bus._end(tp) - self._positions.get(tp, 0)) for tp in self._owned}

    async def stop(self) -> None:
        """Leave the group (without calling this member's own ``on_revoke``); returns once the
        remaining members are rebalanced."""
        if not self._joined:
            return
        self._joined = False
        self._left.set()
        self._wake.set()
        group = self.bus._group(self.group)
        group.leave(self)
        await group.rebalance()

    # -- called by the group -----------------------------------------------------------------
    def _take(self, max_records: int) -> list[Record]:
        owned = sorted(self._owned)
        if not owned:
            return []
        start = self._turn % len(owned)
        self._turn += 1
        out: list[Record] = []
        for tp in owned[start:] + owned[:start]:
            room = max_records - len(out)
            if room <= 0:
                break
            records = self.bus._log(tp)
            position = self._positions.get(tp, 0)
            if position > len(records):
                position = 0  # out of range: Kafka's auto_offset_reset="earliest"
            chunk = records[position : position + room]
            self._positions[tp] = position + len(chunk)
            out.extend(chunk)
        return out

    async def _revoke(self, lost: set[TopicPartition]) -> None:
        """Run the ``on_revoke`` hook for ``lost`` (unless this member leaves meanwhile), then
        give the partitions up."""
        hook = self._on_revoke
        if hook is not None and self._joined:
            running = asyncio.ensure_future(hook(set(lost)))
            left = asyncio.ensure_future(self._left.wait())
            try:
                await asyncio.wait({running, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
                running.cancel()  # only if it is still waiting: the member left
                await asyncio.gather(running, left, return_exceptions=True)
            if not running.cancelled() and running.exception() is not None:
                log.error(
                    "on_revoke hook failed",
                    exc_info=running.exception(),
                    extra={"group": self.group},
                )
        self._owned -= lost
        for tp in lost:
            self._positions.pop(tp, None)
        self._wake.set()

    def _gain(self, gained: set[TopicPartition], committed: Mapping[TopicPartition, int]) -> None:
        self._owned |= gained
        for tp in gained:
            self._positions[tp] = committed.get(tp, 0)
        self._wake.set()

    def _release(self) -> None:
        self._owned.clear()
        self._positions.clear()


class MemoryPublisher:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.max_record_bytes = bus.max_record_bytes
        self._started = False

    async def start(self) -> None:
        self.bus._check_open()
        self._started = True

    async def publish(self, records: Sequence[OutgoingRecord]) -> None:
        """Append all records (written to the bus file first, if there is one); all or none:
        an unknown topic raises ``UnknownTopic``, a record a broker would refuse
        ``PublishFailed``, and nothing is appended."""
        self._check_started()
        for record in records:
            problem = record_problem(record, self.max_record_bytes)
            if problem is not None:
                raise PublishFailed(record, problem)
        self.bus._append(records)
        await asyncio.sleep(0)

    async def publish_each(self, records: Sequence[OutgoingRecord]) -> list[Outcome]:
        """Append the records a broker would take, in one go; one outcome per record. A record
        over ``max_record_bytes`` or with a topic name Kafka does not allow is ``refused``; one
        for a topic that does not exist ``failed`` (``unknown_topic``), and the later records
        of that topic are held back, as on Kafka."""
        self._check_started()
        outcomes: list[Outcome] = []
        accepted: list[OutgoingRecord] = []
        held: set[str] = set()
        existing = self.bus._partition_counts()
        for record in records:
            outcome = record_problem(record, self.max_record_bytes)
            if outcome is None and record.topic in held:
                outcome = Outcome.failed("held", "an earlier record of this topic failed")
            elif outcome is None and record.topic not in existing:
                outcome = Outcome.failed("unknown_topic", f"no such topic: {record.topic}")
                held.add(record.topic)
            if outcome is None:
                accepted.append(record)
                outcome = PUBLISHED
            outcomes.append(outcome)
        if accepted:
            self.bus._append(accepted)
        await asyncio.sleep(0)
        return outcomes

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("the publisher is not started")

    async def stop(self) -> None:
        self._started = False


class MemoryBus:
    """An in-process ``Transport``; with ``path``, kept in a SQLite file across restarts.
    ``close()`` it when done (it releases the file)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        clock: Clock | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.max_record_bytes = max_record_bytes
        self.path = Path(path) if path is not None else None
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._committed: dict[str, dict[TopicPartition, int]] = {}
        self._closed = False
        self._store: _Store | None = None
        if self.path is not None:
            self._store = _Store(self.path)
            for name, partitions in self._store.topics().items():
                self._topics[name] = _Topic(partitions)
            for record in self._store.records():
                self._topics[record.topic].logs[record.partition].append(record)
            self._committed = self._store.commits()

    # -- Transport ---------------------------------------------------------------------------
    def subscription(self, group: str, topics: Sequence[str]) -> MemorySubscription:
        return MemorySubscription(self, group, topics)

    def publisher(self) -> MemoryPublisher:
        return MemoryPublisher(self)

    async def ensure_topics(
        self, topics: Sequence[str], partitions: int, replication: int = 1
    ) -> None:
        """Create the topics that do not exist yet with ``partitions`` partitions; existing
        topics keep theirs. Groups subscribed to a new topic are rebalanced."""
        self._check_open()
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        created = [t for t in dict.fromkeys(topics) if t not in self._topics]
        if not created:
            return
        if self._store is not None:
            self._store.create_topics(created, partitions)
        for name in created:
            self._topics[name] = _Topic(partitions)
        for group in list(self._groups.values()):
            if any(t in m.topics for m in group.members for t in created):
                await group.rebalance()

    async def ping(self) -> None:
        self._check_open()

    def close(self) -> None:
        """Release the bus file. Stop subscriptions and publishers first."""
        self._closed = True
        if self._store is not None:
            self._store.close()
            self._store = None

    def topics(self) -> dict[str, int]:
        """Each topic's partition count."""
        return self._partition_counts()

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """The group's committed positions."""
        return dict(self._committed.get(group, {}))

    # -- for subscriptions and publishers -----------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the bus is closed")

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            committed = self._committed.setdefault(name, {})
            group = self._groups[name] = _Group(name, self, committed)
        return group

    def _partition_counts(self) -> dict[str, int]:
        return {name: len(topic.logs) for name, topic in self._topics.items()}

    def _log(self, tp: TopicPartition) -> list[Record]:
        return self._topics[tp[0]].logs[tp[1]]

    def _end(self, tp: TopicPartition) -> int:
        return len(self._log(tp))

    def _append(self, records: Sequence[OutgoingRecord]) -> None:
        self._check_open()
        missing = sorted({r.topic for r in records} - self._topics.keys())
        if missing:
            raise UnknownTopic(f"no such topic: {', '.join(missing)}")
        timestamp_ms = int(self.clock.now().timestamp() * 1000)
        next_offset: dict[TopicPartition, int] = {}
        staged: list[Record] = []
        for r in records:
            tp = (r.topic, self._topics[r.topic].partition_of(r.key))
            offset = next_offset.get(tp, self._end(tp))
            next_offset[tp] = offset + 1
            staged.append(
                Record(tp[0], tp[1], offset, r.key, r.value, tuple(r.headers), timestamp_ms)
            )
        if self._store is not None:
            self._store.append(staged)
        for record in staged:
            self._log(record.tp).append(record)
        touched = {r.topic for r in staged}
        for group in self._groups.values():
            for member in group.members:
                if touched.intersection(member.topics):
                    member._wake.set()

    def _commit(self, group: str, positions: Mapping[TopicPartition, int]) -> None:
        self._check_open()
        if self._store is not None:
            self._store.commit(group, positions)
        self._group(group).committed.update(positions)
