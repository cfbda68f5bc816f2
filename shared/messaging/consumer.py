"""The Kafka side of the loop: poll a batch, decode, transact, then commit the offsets.

Offsets are committed only after the database transaction commits (at-least-once; the inbox
makes the repeats harmless). A rebalance waits for the batch in flight to finish and commit;
no offset is committed for a partition that was taken away. ``stop()`` finishes the batch,
commits and leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shared import metrics
from shared.cloudevents import from_kafka
from shared.errors import InvalidEvent
from shared.messaging.pipeline import DeadLetter, Incoming, Pipeline
from shared.messaging.transport import Record, Subscription, TopicPartition

log = logging.getLogger(__name__)


class ConsumerRunner:
    def __init__(
        self,
        subscription: Subscription,
        pipeline: Pipeline,
        max_batch: int = 500,
        poll_timeout_ms: int = 500,
        max_event_bytes: int = 256 * 1024,
        decode: Callable[[Record], Incoming[Any]] | None = None,
        linger_ms: int = 20,
    ) -> None:
        self.subscription = subscription
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.poll_timeout_ms = poll_timeout_ms
        self.max_event_bytes = max_event_bytes
        self.linger_ms = linger_ms
        self._decode = decode or self.decode
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._revoked_during_batch: set[TopicPartition] = set()
        self.started = asyncio.Event()

    @property
    def name(self) -> str:
        return self.pipeline.consumer

    def decode(self, record: Record) -> Incoming[Any]:
        if record.unreadable is not None:
            raise record.unreadable
        size = len(record.value or b"") + sum(len(n) + len(v or b"") for n, v in record.headers)
        if size > self.max_event_bytes:
            raise InvalidEvent(
                "oversize",
                f"{size} bytes (value and headers) is over the {self.max_event_bytes} limit",
            )
        event = from_kafka(record.value, record.headers)
        return self.pipeline.decode_payload(event, record.key, record)

    def _decode_or_dead_letter(self, record: Record) -> Incoming[Any] | DeadLetter:
        """Decoding never stops the consumer: ``InvalidEvent`` keeps its code and field; any
        other exception (a bug meeting input it did not expect) is a ``decode_error`` naming
        the exception type. Either way the record goes to the dead-letter topic."""
        try:
            return self._decode(record)
        except InvalidEvent as exc:
            error = exc
        except Exception as exc:
            error = InvalidEvent("decode_error", f"{type(exc).__name__}: {exc}")
        log.warning(
            "dead-lettering a record",
            extra={
                "code": error.code,
                "field": error.field,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )
        return DeadLetter(record, error, self.name)

    async def run(self) -> None:
        await self.subscription.start(on_revoke=self._on_revoke)
        self.started.set()
        try:
            while not self._stopping.is_set():
                records = await self._poll_batch()
                if not records:
                    continue
                async with self._lock:
                    await self.process(records)
        finally:
            async with self._lock:
                await self.subscription.stop()

    async def _poll_batch(self) -> list[Record]:
        """Wait for records, then gather more for up to ``linger_ms`` (or a full batch):
        fewer, larger transactions under load; one short wait when traffic is light."""
        records = await self.subscription.poll(self.max_batch, self.poll_timeout_ms)
        if not records or self.linger_ms <= 0:
            return records
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_ms / 1000
        while len(records) < self.max_batch and not self._stopping.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            more = await self.subscription.poll(
                self.max_batch - len(records), max(1, int(left * 1000))
            )
            records.extend(more)
        return records

    async def process(self, records: list[Record]) -> None:
        owned = self.subscription.assignment()
        records = [r for r in records if r.tp in owned]
        items: list[Incoming[Any]] = []
        dead: list[DeadLetter] = []
        for record in records:
            decoded = self._decode_or_dead_letter(record)
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
            else:
                items.append(decoded)
        await self.pipeline.transact_reliably(items, dead, self._stopping)
        positions: dict[TopicPartition, int] = {}
        for record in records:
            positions[record.tp] = max(positions.get(record.tp, 0), record.offset + 1)
        await self.subscription.commit(positions)

    async def _on_revoke(self, partitions: set[TopicPartition]) -> None:
        # Wait for the batch in flight: it finishes and commits before the partitions go.
        async with self._lock:
            log.info("partitions revoked", extra={"count": len(partitions)})

    async def report_lag(self) -> None:
        for (topic, partition), lag in (await self.subscription.lag()).items():
            metrics.CONSUMER_LAG.labels(self.name, topic, str(partition)).set(lag)

    def stop(self) -> None:
        self._stopping.set()
