"""The one consume → transact → emit unit shared by every service.

For a batch of decoded events, in ONE database transaction:
  1. record each event's (source, id) in the inbox: a redelivered event has no second effect;
  2. let the handler apply the state change for the events that are new;
  3. write everything the handler emits, and every dead letter, to the outbox.
The caller (a Kafka consumer, or an HTTP route) commits its offsets only after this returns.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import orjson
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import metrics
from shared.clock import Clock
from shared.cloudevents import CORRELATION, CloudEvent, format_time
from shared.errors import InvalidEvent, TransientError
from shared.messaging.transport import OutgoingRecord, Record

log = logging.getLogger(__name__)

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)

DLQ_PREFIX = "winback-dlq-"


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


@dataclass
class Tx:
    """What a handler gets: the open connection, the time, and this transaction's outbox."""

    conn: AsyncConnection
    now: datetime
    source: str
    outgoing: list[OutgoingRecord] = field(default_factory=list)

    def emit(
        self,
        topic: str,
        key: str,
        type: str,
        data: Any,
        cause: CloudEvent | None = None,
        subject: str | None = None,
    ) -> CloudEvent:
        """Queue an event for the outbox, keyed so one customer's events stay in order."""
        if cause is not None:
            # Deterministic id: the same cause emits the same event, whichever path it took.
            event_id = str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"{cause.source}|{cause.id}|{type}|{key}")
            )
            extensions = {CORRELATION: cause.correlation_id}
        else:
            event_id = str(uuid.uuid4())
            extensions = {CORRELATION: event_id}
        event = CloudEvent(
            id=event_id,
            source=self.source,
            type=type,
            time=self.now,
            subject=subject,
            data=data,
            extensions=extensions,
        )
        value, headers = event.to_structured()
        self.outgoing.append(
            OutgoingRecord(topic=topic, key=key.encode(), value=value, headers=tuple(headers))
        )
        return event


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


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError | ConnectionError | TimeoutError | OSError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code is None and exc.orig is not None and exc.orig.__cause__ is not None:
            code = getattr(exc.orig.__cause__, "sqlstate", None)
        # serialization failure, deadlock, connection exceptions, admin shutdown, too many conns
        return bool(code) and (str(code).startswith(("40", "08", "57P", "53")))
    return False


class Pipeline:
    def __init__(
        self,
        engine: AsyncEngine,
        consumer: str,
        handler: Handler[Any],
        clock: Clock,
        dead_letter_topic: str,
        source: str,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.handler = handler
        self.clock = clock
        self.dead_letter_topic = dead_letter_topic
        self.source = source

    # -- decoding (pure, outside the transaction) ------------------------------------------
    def decode_payload(
        self, event: CloudEvent, key: bytes | None, record: Record | None
    ) -> Incoming[Any]:
        return Incoming(event=event, payload=self.handler.decode(event), key=key, record=record)

    # -- the transaction -------------------------------------------------------------------
    async def transact(
        self, items: Sequence[Incoming[Any]], dead: Sequence[DeadLetter] = ()
    ) -> BatchResult:
        started = time.perf_counter()
        async with self.engine.begin() as conn:
            tx = Tx(conn=conn, now=self.clock.now(), source=self.source)
            fresh = await self._claim(conn, items)
            if fresh:
                await self.handler.handle(tx, fresh)
            for letter in dead:
                tx.outgoing.append(dead_letter_record(self.dead_letter_topic, letter, tx.now))
            await write_outbox(conn, tx.outgoing)
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

        A transient failure (database down, deadlock) retries the whole batch with backoff.
        Any other failure is re-tried event by event; the one that still fails goes to the
        dead-letter topic with the error, so it never stalls the partition.
        """
        delay = 0.1
        while True:
            try:
                return await self.transact(items, dead)
            except Exception as exc:
                if is_transient(exc):
                    if stopping is not None and stopping.is_set():
                        raise
                    log.warning(
                        "transient failure; retrying batch",
                        extra={"error": repr(exc), "consumer": self.consumer},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if len(items) <= 1 and not dead and not any(i.record for i in items):
                    raise
                log.exception(
                    "batch failed; isolating the failing event", extra={"consumer": self.consumer}
                )
                return await self._one_by_one(items, dead, stopping)

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
                result = await self._retry_transient(lambda i=item: self.transact([i]), stopping)
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
        result = await self._retry_transient(lambda: self.transact([], letters), stopping)
        return BatchResult(handled, duplicates, result.dead_lettered)

    async def _retry_transient(self, fn: Any, stopping: asyncio.Event | None) -> BatchResult:
        delay = 0.1
        while True:
            try:
                result: BatchResult = await fn()
                return result
            except Exception as exc:
                if not is_transient(exc) or (stopping is not None and stopping.is_set()):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _claim(
        self, conn: AsyncConnection, items: Sequence[Incoming[Any]]
    ) -> list[Incoming[Any]]:
        """Record (source, id) in the inbox; return the items seen for the first time."""
        unique: dict[tuple[str, str], Incoming[Any]] = {}
        for item in items:
            unique.setdefault((item.event.source, item.event.id), item)
        if not unique:
            return []
        rows = await conn.execute(
            text(
                "INSERT INTO inbox (consumer, source, event_id) "
                "SELECT :consumer, s, i FROM unnest(CAST(:sources AS text[]), "
                "CAST(:ids AS text[])) AS t(s, i) "
                "ON CONFLICT DO NOTHING RETURNING source, event_id"
            ),
            {
                "consumer": self.consumer,
                "sources": [k[0] for k in unique],
                "ids": [k[1] for k in unique],
            },
        )
        claimed = {(r.source, r.event_id) for r in rows}
        return [item for k, item in unique.items() if k in claimed]


def _short_type(event_type: str) -> str:
    parts = event_type.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else event_type


_INSERT_OUTBOX = text(
    "INSERT INTO outbox (topic, key, value, headers) "
    "SELECT t, k, v, CAST(h AS jsonb) FROM unnest(CAST(:topics AS text[]), "
    "CAST(:keys AS bytea[]), CAST(:values AS bytea[]), CAST(:headers AS text[])) "
    "WITH ORDINALITY AS r(t, k, v, h, n) ORDER BY n"
)


async def write_outbox(conn: AsyncConnection, records: Sequence[OutgoingRecord]) -> None:
    """Append records to the outbox in one statement, keeping their order (ids ascend)."""
    if not records:
        return
    await conn.execute(
        _INSERT_OUTBOX,
        {
            "topics": [r.topic for r in records],
            "keys": [r.key for r in records],
            "values": [r.value for r in records],
            "headers": [
                orjson.dumps([[n, base64.b64encode(v).decode()] for n, v in r.headers]).decode()
                for r in records
            ],
        },
    )


def dead_letter_record(topic: str, letter: DeadLetter, now: datetime) -> OutgoingRecord:
    """The original bytes and headers, plus headers naming the error and where it came from."""
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
    headers = tuple(r.headers) + tuple((DLQ_PREFIX + name, value.encode()) for name, value in extra)
    return OutgoingRecord(topic=topic, key=r.key, value=r.value, headers=headers)
