"""What the consume → transact → emit loop needs from a message transport.

Handlers never see these: they get decoded events. Kafka is one implementation
(``shared.messaging.kafka``); an in-process bus can be another.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from shared.errors import InvalidEvent, WinbackError

TopicPartition = tuple[str, int]
RevokeHook = Callable[[set[TopicPartition]], Awaitable[None]]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None = None
    unreadable: InvalidEvent | None = None
    """Set by a transport that could read the record only in part (a header name that is not
    UTF-8: its ``headers`` then hold the name escaped); decoding dead-letters it with this."""

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


# -- what a broker accepts -------------------------------------------------------------------
DEFAULT_MAX_RECORD_BYTES = 1024 * 1024
"""The producer's default ``max_request_size`` (``kafka.max_record_bytes``): under a stock
broker's ``message.max.bytes`` (1048588), so a record within it is accepted."""

BATCH_OVERHEAD = 61
"""A record batch's header (v2 format): base offset, length, leader epoch, magic, CRC,
attributes, last offset delta, timestamps, producer id and epoch, base sequence, count."""
RECORD_OVERHEAD = 21
"""The most a record's own framing takes besides key, value and headers: its length (varint,
≤ 5), attributes (1), timestamp delta (varint, ≤ 10) and offset delta (varint, ≤ 5)."""

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _varint_size(n: int) -> int:
    """Bytes of ``n`` as a Kafka (zig-zag) varint."""
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


def _bytes_field(data: bytes | None) -> int:
    return 1 if data is None else _varint_size(len(data)) + len(data)


def serialized_size(record: OutgoingRecord) -> int:
    """The record's size as Kafka counts it against ``max_request_size`` and the broker's
    ``message.max.bytes``: key, value and headers with their varint lengths, plus the most the
    record's framing and its batch header can take (a batch holding this record alone). The
    same upper bound the producer checks (aiokafka's ``estimate_size_in_bytes``)."""
    size = BATCH_OVERHEAD + RECORD_OVERHEAD
    size += _bytes_field(record.key) + _bytes_field(record.value)
    size += _varint_size(len(record.headers))
    return size + sum(header_size(name, value) for name, value in record.headers)


def header_size(name: str, value: bytes | None) -> int:
    """One header's share of ``serialized_size``."""
    return _bytes_field(name.encode("utf-8", "surrogatepass")) + _bytes_field(value)


def record_problem(record: OutgoingRecord, max_record_bytes: int) -> Outcome | None:
    """How a broker would refuse ``record`` for good (a ``refused`` outcome), or None: a
    topic name Kafka does not allow, a header name that is not UTF-8, or a size over
    ``max_record_bytes``."""
    topic = record.topic
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        return Outcome.refused("invalid_topic", f"{topic[:300]!r} is not a valid Kafka topic name")
    for name, _ in record.headers:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return Outcome.refused("invalid_record", f"header name {name[:100]!r} is not UTF-8")
    size = serialized_size(record)
    if size > max_record_bytes:
        return Outcome.refused(
            "record_too_large",
            f"{size} bytes serialized, over the limit of {max_record_bytes} "
            "(kafka.max_record_bytes)",
        )
    return None


# -- what became of a published record -------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What became of one record handed to ``Publisher.publish_each``.

    - ``published``: the broker acknowledged it.
    - ``refused``: the broker will never take it — retrying cannot help. ``code`` says why:
      ``record_too_large``, ``invalid_topic`` (a name Kafka does not allow) or
      ``invalid_record`` (a header name that is not UTF-8, a timestamp the broker refuses).
    - ``failed``: not published this time (broker unreachable, timed out, topic not there
      yet, or held back because an earlier record of its topic failed); publish it again later.
    """

    status: Literal["published", "refused", "failed"]
    code: str = ""
    detail: str = ""

    @classmethod
    def refused(cls, code: str, detail: str = "") -> Outcome:
        return cls("refused", code, detail)

    @classmethod
    def failed(cls, code: str, detail: str = "") -> Outcome:
        return cls("failed", code, detail)

    @property
    def reason(self) -> str:
        """``code: detail``, as stored in ``outbox.park_reason``."""
        return f"{self.code}: {self.detail}" if self.detail else self.code


PUBLISHED = Outcome("published")


class PublishFailed(WinbackError):
    """``Publisher.publish`` could not publish every record; ``outcome`` is the first one that
    did not go out (``refused`` for good, or ``failed`` for now)."""

    def __init__(self, record: OutgoingRecord, outcome: Outcome) -> None:
        super().__init__(f"{outcome.status} on topic {record.topic[:300]!r}: {outcome.reason}")
        self.record = record
        self.outcome = outcome


def raise_for_outcomes(records: Sequence[OutgoingRecord], outcomes: Sequence[Outcome]) -> None:
    """Raise ``PublishFailed`` for the first record that was not published."""
    for record, outcome in zip(records, outcomes, strict=True):
        if outcome.status != "published":
            raise PublishFailed(record, outcome)


class Subscription(Protocol):
    """A consumer-group member on some topics."""

    async def start(self, on_revoke: RevokeHook) -> None:
        """Join the group. ``on_revoke`` runs before partitions are taken away; it must
        finish (and commit) the batch in flight."""

    async def poll(self, max_records: int, timeout_ms: int) -> list[Record]: ...

    async def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        """Commit next-offset positions; only partitions still assigned."""

    def assignment(self) -> set[TopicPartition]: ...

    async def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end of each assigned partition, as far as known."""

    async def stop(self) -> None:
        """Leave the group."""


class Publisher(Protocol):
    """Publishes records keyed to partitions (Kafka's partitioner), in order per partition.
    Refuses, as the broker would, any record over its ``max_record_bytes``."""

    max_record_bytes: int

    async def start(self) -> None: ...

    async def publish(self, records: Sequence[OutgoingRecord]) -> None:
        """Publish all records and return when every one is acknowledged; raise
        ``PublishFailed`` naming the first one that was not."""

    async def publish_each(self, records: Sequence[OutgoingRecord]) -> list[Outcome]:
        """Publish the records and return one ``Outcome`` per record, in their order, once
        each is settled. One record's failure does not stop the others, except that once a
        record cannot be handed to the broker for now (``failed``), the later records of its
        topic are held back (``failed``, code ``held``), so per-key order survives the
        retry. Raises only when the publisher cannot be used at all (not started)."""

    async def stop(self) -> None: ...


class Transport(Protocol):
    """Makes subscriptions and publishers for one cluster or bus."""

    def subscription(self, group: str, topics: Sequence[str]) -> Subscription: ...

    def publisher(self) -> Publisher: ...

    async def ensure_topics(
        self, topics: Sequence[str], partitions: int, replication: int = 1
    ) -> None: ...

    async def ping(self) -> None:
        """Raise if the transport cannot be reached."""
