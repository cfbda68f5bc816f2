"""One way for a scenario test to put records on the bus and read them back, whichever bus the
services run on: the real Kafka broker or the in-process ``MemoryBus``.

Scenario tests whose behaviour does not depend on Kafka take the ``service_bus`` fixture
(tests/integration/conftest.py) and run on both; ``-k memory`` runs only the fast ones."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from shared.messaging.memory import MemoryBus
from shared.messaging.transport import OutgoingRecord, Record, Transport
from tests.support.kafka import produce, read_all
from tests.support.services import eventually

Header = tuple[str, bytes]


@dataclass
class ServiceBus:
    kind: Literal["kafka", "memory"]
    bootstrap: str
    memory: MemoryBus | None = None

    @property
    def transport(self) -> Transport | None:
        """What to pass to a service's ``bootstrap(transport=...)``: ``None`` builds the Kafka
        transport from the settings."""
        return self.memory

    async def produce(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes | None, list[Header]]]
    ) -> None:
        """Publish (key, value, headers) records and wait until the bus has them."""
        if self.memory is None:
            await produce(self.bootstrap, topic, records)
            return
        publisher = self.memory.publisher()
        await publisher.start()
        try:
            await publisher.publish([OutgoingRecord(topic, k, v, tuple(h)) for k, v, h in records])
        finally:
            await publisher.stop()

    async def read(self, topic: str, expect: int, timeout: float = 30.0) -> list[Record]:
        """The topic's records from its start, once at least ``expect`` are there (or after
        ``timeout``; the caller's assertion then shows what there was)."""
        if self.memory is None:
            return [
                Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
                for r in await read_all(self.bootstrap, topic, expect, timeout)
            ]
        memory = self.memory

        async def everything() -> list[Record]:
            return await read_memory(memory, [topic])

        return await eventually(everything, lambda rs: len(rs) >= expect, timeout=timeout)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()


async def read_memory(bus: MemoryBus, topics: list[str]) -> list[Record]:
    """Every record on ``topics`` so far, read by a consumer group of its own."""

    async def no_hook(_: object) -> None:
        return None

    reader = bus.subscription(f"test-reader-{uuid.uuid4().hex[:8]}", topics)
    await reader.start(no_hook)
    out: list[Record] = []
    try:
        while batch := await reader.poll(10_000, 0):
            out.extend(batch)
    finally:
        await reader.stop()
    return out


def event_of(record: Record) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(record.value or b"null")
    return value
