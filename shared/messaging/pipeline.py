"""The one consume → transact → emit unit shared by every service.

For a batch of decoded events, in ONE unit of work (``shared.messaging.uow``: one
transaction, the outbox written and metrics recorded on exit):
  1. record each event's (source, id) in the inbox: a redelivered event has no second effect;
  2. let the handler apply the state change for the events that are new;
  3. write everything the handler emits, and every dead letter, to the outbox.
The caller (a Kafka consumer, or an HTTP route) commits its offsets only after this returns.
Transient failures are retried by a ``shared.retry.RetryPolicy``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import metrics
from shared.clock import Clock
from shared.cloudevents import CloudEvent, format_time
from shared.errors import InvalidEvent
from shared.messaging.transport import (
    DEFAULT_MAX_RECORD_BYTES,
    OutgoingRecord,
    Record,
    header_size,
    record_problem,
)
from shared.messaging.uow import Tx as Tx
from shared.messaging.uow import UnitOfWork
from shared.messaging.uow import header_name as _header_name
from shared.retry import TRANSIENT, RetryPolicy

log = logging.getLogger(__name__)

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)

DLQ_PREFIX = "winback-dlq-"
DLQ_EXCERPT_BYTES = 4096
"""A dead-letter copy too large for the broker keeps this much of the original value (and of
a key that long), beside the SHA-256 and size of the whole."""
DLQ_MAX_HEADER_VALUE_BYTES = 4096
DLQ_MAX_HEADER_NAME_CHARS = 256
DLQ_MAX_ORIGINAL_HEADERS_BYTES = 64 * 1024
"""A cut-down dead-letter copy keeps the original headers up to these sizes: each value cut
to 4 KiB, each name to 256 characters, the rest dropped once they add up to 64 KiB — so the
copy fits ``kafka.max_record_bytes`` (at least 128 KiB) whatever came in."""


@dataclass(frozen=True)
class Incoming(Generic[P]):
    """One decoded event: the envelope, its validated payload, and where it came from."""

    event: CloudEvent
    payload: P
    key: bytes | None = None
    record: Record | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A record that cannot be handled, with the reason; it goes to the dead-letter topic."""

    record: Record
    error: InvalidEvent
    consumer: str = ""


class Handler(Protocol[P_co]):
    """A service's event handling: pure decoding outside the transaction, state inside it."""

    def decode(self, event: CloudEvent) -> P_co:
        """Validate the payload; raise ``InvalidEvent`` naming the field. No I/O."""
        ...

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        """Apply the new (already deduplicated) events inside the transaction."""
        ...


@dataclass(frozen=True)
class BatchResult:
    handled: int
    duplicates: int
    dead_lettered: int


class Pipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        consumer: str,
        handler: Handler[Any],
        clock: Clock,
        dead_letter_topic: str,
        source: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        retry: RetryPolicy = TRANSIENT,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.handler = handler
        self.clock = clock
        self.dead_letter_topic = dead_letter_topic
        self.source = source
        self.max_record_bytes = max_record_bytes
        self.retry = retry

    # -- decoding (pure, outside the transaction) ------------------------------------------
    def decode_payload(
        self, event: CloudEvent, key: bytes | None, record: Record | None
    ) -> Incoming[Any]:
        return Incoming(event=event, payload=self.handler.decode(event), key=key, record=record)

    # -- the transaction -------------------------------------------------------------------
    async def transact(
        self, items: Sequence[Incoming[Any]], dead: Sequence[DeadLetter] = ()
    ) -> BatchResult:
        """One unit of work: claim the new events in the inbox, handle them, queue the dead
        letters; the outbox is written and the transaction committed by the unit."""
        started = time.perf_counter()
        unit = UnitOfWork(
            self.engine, self.clock, self.source, self.max_record_bytes, name=self.consumer
        )
        async with unit as tx:
            fresh = await self._claim(tx.conn, items, tx.now)
            if fresh:
                await self.handler.handle(tx, fresh)
            for letter in dead:
                tx.outgoing.append(
                    dead_letter_record(
                        self.dead_letter_topic, letter, tx.now, self.max_record_bytes
                    )
                )
        elapsed = time.perf_counter() - started
        metrics.BATCH_SECONDS.labels(self.consumer).observe(elapsed)
        for event_type, n in Counter(_short_type(i.event.type) for i in fresh).items():
            metrics.EVENTS.labels(self.consumer, event_type, "handled").inc(n)
        duplicates = len(items) - len(fresh)
        if duplicates:
            metrics.EVENTS.labels(self.consumer, "any", "duplicate").inc(duplicates)
        for letter in dead:
            metrics.DEAD_LETTERS.labels(self.consumer, letter.error.code).inc()
        return BatchResult(len(fresh), duplicates, len(dead))

    async def transact_reliably(
        self,
        items: Sequence[Incoming[Any]],
        dead: Sequence[DeadLetter] = (),
        stopping: asyncio.Event | None = None,
    ) -> BatchResult:
        """``transact`` that retries transient failures and isolates a poison event.

        A transient failure (database down, deadlock) retries the whole batch by the
        pipeline's ``RetryPolicy`` until it succeeds or ``stopping`` is set (then it is
        raised). Any other failure is re-tried event by event; the one that still fails goes
        to the dead-letter topic with the error, so it never stalls the partition.
        """
        try:
            return await self._reliably(functools.partial(self.transact, items, dead), stopping)
        except Exception as exc:
            if self.retry.retry_on(exc):
                raise  # stopping: the batch is not committed, its offsets neither
            if len(items) <= 1 and not dead and not any(i.record for i in items):
                raise
            log.exception(
                "batch failed; isolating the failing event", extra={"consumer": self.consumer}
            )
            return await self._one_by_one(items, dead, stopping)

    async def _reliably(
        self, transact: Callable[[], Awaitable[BatchResult]], stopping: asyncio.Event | None
    ) -> BatchResult:
        return await self.retry.call(
            transact, f"consumer {self.consumer} transaction", log, stopping
        )

    async def _one_by_one(
        self,
        items: Sequence[Incoming[Any]],
        dead: Sequence[DeadLetter],
        stopping: asyncio.Event | None,
    ) -> BatchResult:
        handled = duplicates = 0
        letters = list(dead)
        for item in items:
            try:
                result = await self._reliably(functools.partial(self.transact, [item]), stopping)
                handled += result.handled
                duplicates += result.duplicates
            except Exception as exc:
                if item.record is None:
                    raise
                letters.append(
                    DeadLetter(
                        item.record,
                        InvalidEvent("handler_error", f"{type(exc).__name__}: {exc}"[:500]),
                        self.consumer,
                    )
                )
        result = await self._reliably(functools.partial(self.transact, [], letters), stopping)
        return BatchResult(handled, duplicates, result.dead_lettered)

    async def _claim(
        self, conn: AsyncConnection, items: Sequence[Incoming[Any]], now: datetime
    ) -> list[Incoming[Any]]:
        """Record (source, id) in the inbox, received ``now`` (the unit's time, from the
        injected clock); return the items seen for the first time."""
        unique: dict[tuple[str, str], Incoming[Any]] = {}
        for item in items:
            unique.setdefault((item.event.source, item.event.id), item)
        if not unique:
            return []
        rows = await conn.execute(
            text(
                "INSERT INTO inbox (consumer, source, event_id, received_at) "
                "SELECT :consumer, s, i, CAST(:now AS timestamptz) "
                "FROM unnest(CAST(:sources AS text[]), "
                "CAST(:ids AS text[])) AS t(s, i) "
                "ON CONFLICT DO NOTHING RETURNING source, event_id"
            ),
            {
                "consumer": self.consumer,
                "now": now,
                "sources": [k[0] for k in unique],
                "ids": [k[1] for k in unique],
            },
        )
        claimed = {(r.source, r.event_id) for r in rows}
        return [item for k, item in unique.items() if k in claimed]


def _short_type(event_type: str) -> str:
    parts = event_type.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else event_type


def dead_letter_record(
    topic: str,
    letter: DeadLetter,
    now: datetime,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> OutgoingRecord:
    """The original bytes and headers, plus headers naming the error and where it came from.

    A copy that would be over ``max_record_bytes`` (an original near the broker's limit plus
    these headers) is cut down so the broker takes it: the original headers are kept (cut to
    ``DLQ_MAX_HEADER_*``), the value — and a key over ``DLQ_EXCERPT_BYTES`` — is replaced by
    its first ``DLQ_EXCERPT_BYTES`` bytes, and ``winback-dlq-value-truncated: true``,
    ``-value-sha256`` (hex, of the whole original) and ``-value-size`` (bytes) say so (the
    same ``-key-*`` for a cut key)."""
    r = letter.record
    extra = [
        ("error-code", letter.error.code),
        ("error-reason", letter.error.reason),
        ("error-field", letter.error.field or ""),
        ("source-topic", r.topic),
        ("source-partition", str(r.partition)),
        ("source-offset", str(r.offset)),
        ("consumer", letter.consumer),
        ("dead-lettered-at", format_time(now)),
    ]
    reasons = tuple((DLQ_PREFIX + name, _utf8(value)) for name, value in extra)
    original = tuple((_header_name(name), value) for name, value in r.headers)
    whole = OutgoingRecord(topic=topic, key=r.key, value=r.value, headers=original + reasons)
    if record_problem(whole, max_record_bytes) is None:
        return whole
    headers, cut_headers = _cut_headers(r.headers)
    notes: list[tuple[str, bytes]] = []
    key = r.key
    if key is not None and len(key) > DLQ_EXCERPT_BYTES:
        key = key[:DLQ_EXCERPT_BYTES]
        notes += _summary("key", r.key or b"")
    value = r.value
    if value is not None:
        value = value[:DLQ_EXCERPT_BYTES]
        notes += _summary("value", r.value or b"")
    if cut_headers:
        notes.append((DLQ_PREFIX + "headers-truncated", str(cut_headers).encode()))
    reasons = tuple((name, v[:DLQ_MAX_HEADER_VALUE_BYTES]) for name, v in reasons)
    return OutgoingRecord(
        topic=topic, key=key, value=value, headers=headers + reasons + tuple(notes)
    )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")


def _summary(part: str, data: bytes) -> list[tuple[str, bytes]]:
    return [
        (f"{DLQ_PREFIX}{part}-truncated", b"true"),
        (f"{DLQ_PREFIX}{part}-sha256", hashlib.sha256(data).hexdigest().encode()),
        (f"{DLQ_PREFIX}{part}-size", str(len(data)).encode()),
    ]


def _cut_headers(
    headers: Sequence[tuple[str, bytes]],
) -> tuple[tuple[tuple[str, bytes], ...], int]:
    """The original headers cut to the ``DLQ_MAX_*`` sizes (a name that is not UTF-8
    escaped), and how many were cut or dropped."""
    kept: list[tuple[str, bytes]] = []
    cut = 0
    budget = DLQ_MAX_ORIGINAL_HEADERS_BYTES
    for name, value in headers:
        safe = _header_name(name)[:DLQ_MAX_HEADER_NAME_CHARS]
        short = value[:DLQ_MAX_HEADER_VALUE_BYTES]
        size = header_size(safe, short)
        if size > budget:
            cut += 1
            continue
        budget -= size
        cut += safe != name or len(short) != len(value)
        kept.append((safe, short))
    return tuple(kept), cut
