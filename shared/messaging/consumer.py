"""The Kafka side of the loop: poll a batch, decode, transact, then commit the offsets.

Offsets are committed only after the database transaction commits (at-least-once; the inbox
makes the repeats harmless), batch after batch in order. While one batch's transaction runs,
the next batch is polled and decoded (decoding is pure): the database and the CPU work at the
same time. At most one batch is decoded ahead; its transaction starts only after the one
before it has committed its offsets.

A rebalance waits for the batch in flight to finish and commit; no offset is committed for a
partition that was taken away, and no record of a revoked partition that was polled before the
revocation is handled after it: the batch decoded ahead drops them when its transaction starts
(the partition's next owner reads them again from the committed offset). ``stop()`` finishes
the batch in flight, commits and leaves the group; a batch decoded ahead is dropped, not
committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import metrics
from shared.cloudevents import from_kafka
from shared.errors import InvalidEvent
from shared.messaging.pipeline import DeadLetter, Incoming, Pipeline
from shared.messaging.transport import Record, Subscription, TopicPartition

log = logging.getLogger(__name__)

DECODE_SLICE = 64
"""Records decoded between two yields to the event loop, so the transaction running meanwhile
gets its database replies without waiting for the whole next batch to be decoded."""


@dataclass
class _Batch:
    """Records as polled, with the revocation count when each was handed over (``seen``),
    and, once decoded, what each became."""

    records: list[Record] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    decoded: list[Incoming[Any] | DeadLetter] = field(default_factory=list)

    def add(self, records: list[Record], revocations: int) -> None:
        self.records += records
        self.seen += [revocations] * len(records)


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
        self._revocations = 0
        self._revoked_at: dict[TopicPartition, int] = {}
        """Per partition, the value of ``_revocations`` its last revocation set."""
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
        ahead: asyncio.Task[_Batch] | None = None
        try:
            while not self._stopping.is_set():
                if ahead is None:
                    ahead = asyncio.create_task(self._next_batch())
                batch, ahead = await ahead, None
                if not batch.records:
                    break  # stopping
                if not self._stopping.is_set():
                    # the next batch is polled and decoded while this one's transaction runs
                    ahead = asyncio.create_task(self._next_batch())
                async with self._lock:
                    await self._transact(batch)
        finally:
            if ahead is not None:
                ahead.cancel()  # decoded ahead, not handled: nothing of it is committed
                await asyncio.wait([ahead])
                if not ahead.cancelled() and ahead.exception() is not None:
                    log.debug("the batch polled ahead failed", exc_info=ahead.exception())
            async with self._lock:
                await self.subscription.stop()

    async def _next_batch(self) -> _Batch:
        """Poll until records come (or ``stop()``), then decode them."""
        batch = await self._poll_batch()
        while not batch.records and not self._stopping.is_set():
            batch = await self._poll_batch()
        for start in range(0, len(batch.records), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)
            batch.decoded += map(
                self._decode_or_dead_letter, batch.records[start : start + DECODE_SLICE]
            )
        return batch

    async def _poll_batch(self) -> _Batch:
        """Wait for records, then gather more for up to ``linger_ms`` (or a full batch):
        fewer, larger transactions under load; one short wait when traffic is light."""
        batch = _Batch()
        batch.add(
            await self.subscription.poll(self.max_batch, self.poll_timeout_ms), self._revocations
        )
        if not batch.records or self.linger_ms <= 0:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_ms / 1000
        while len(batch.records) < self.max_batch and not self._stopping.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            more = await self.subscription.poll(
                self.max_batch - len(batch.records), max(1, int(left * 1000))
            )
            batch.add(more, self._revocations)
        return batch

    async def process(self, records: list[Record]) -> None:
        """Decode ``records`` and handle them in one transaction, then commit their offsets."""
        batch = _Batch()
        batch.add(records, self._revocations)
        batch.decoded = [self._decode_or_dead_letter(r) for r in records]
        async with self._lock:
            await self._transact(batch)

    async def _transact(self, batch: _Batch) -> None:
        """Handle the batch's records of partitions still assigned and not revoked since they
        were polled, in one transaction; then commit their offsets. Under ``_lock``."""
        owned = self.subscription.assignment()
        revoked_at = self._revoked_at
        items: list[Incoming[Any]] = []
        dead: list[DeadLetter] = []
        positions: dict[TopicPartition, int] = {}
        for record, seen, decoded in zip(batch.records, batch.seen, batch.decoded, strict=True):
            tp = record.tp
            if tp not in owned or revoked_at.get(tp, -1) > seen:
                continue
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
            else:
                items.append(decoded)
            positions[tp] = max(positions.get(tp, 0), record.offset + 1)
        if not positions:
            return
        await self.pipeline.transact_reliably(items, dead, self._stopping)
        await self.subscription.commit(positions)

    async def _on_revoke(self, partitions: set[TopicPartition]) -> None:
        # Wait for the batch in flight: it finishes and commits before the partitions go.
        async with self._lock:
            # records of these partitions handed over until now are not handled any more
            self._revocations += 1
            for tp in partitions:
                self._revoked_at[tp] = self._revocations
            log.info("partitions revoked", extra={"count": len(partitions)})

    async def report_lag(self) -> None:
        for (topic, partition), lag in (await self.subscription.lag()).items():
            metrics.CONSUMER_LAG.labels(self.name, topic, str(partition)).set(lag)

    def stop(self) -> None:
        self._stopping.set()
