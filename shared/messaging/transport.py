"""What the consume → transact → emit loop needs from a message transport.

Handlers never see these: they get decoded events. Kafka is one implementation
(``shared.messaging.kafka``); an in-process bus can be another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


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
    async def start(self) -> None: ...

    async def publish(self, records: Sequence[OutgoingRecord]) -> None:
        """Publish all records and return when every one is acknowledged."""

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
