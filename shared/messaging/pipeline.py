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
import hashlib
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
from shared.messaging.transport import (
    DEFAULT_MAX_RECORD_BYTES,
    OutgoingRecord,
    Record,
    header_size,
    record_problem,
)

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
        """Queue an event for the outbox, keyed so one customer's events stay in order.

        Never raises over the broker's limits: ``write_outbox`` checks the record when it is
        written and parks one a broker would refuse (a bug of ours), outside the business
        decision."""
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
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.handler = handler
        self.clock = clock
        self.dead_letter_topic = dead_letter_topic
        self.source = source
        self.max_record_bytes = max_record_bytes

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
                tx.outgoing.append(
                    dead_letter_record(
                        self.dead_letter_topic, letter, tx.now, self.max_record_bytes
                    )
                )
            await write_outbox(conn, tx.outgoing, self.max_record_bytes)
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
    "INSERT INTO outbox (topic, key, value, headers, parked_at, park_reason) "
    "SELECT t, k, v, CAST(h AS jsonb), CASE WHEN p IS NULL THEN NULL ELSE now() END, p "
    "FROM unnest(CAST(:topics AS text[]), CAST(:keys AS bytea[]), CAST(:values AS bytea[]), "
    "CAST(:headers AS text[]), CAST(:parked AS text[])) "
    "WITH ORDINALITY AS r(t, k, v, h, p, n) ORDER BY n"
)


async def write_outbox(
    conn: AsyncConnection,
    records: Sequence[OutgoingRecord],
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> None:
    """Append records to the outbox in one statement, keeping their order (ids ascend).

    Each record is checked against what the broker takes (``record_problem``: its size as
    Kafka counts it against ``max_record_bytes``, the topic name, header names). One that
    fails is a bug in our own code: it is written **parked** (``parked_at``, ``park_reason``)
    and logged, never published, and the transaction goes on — the business change it belongs
    to is not undone. Dead letters are cut down beforehand (``dead_letter_record``)."""
    if not records:
        return
    parked: list[str | None] = []
    for r in records:
        problem = record_problem(r, max_record_bytes)
        parked.append(problem.reason if problem is not None else None)
        if problem is not None:
            log.error(
                "outbox record parked when written: a broker would refuse it",
                extra={"topic": r.topic[:249], "reason": problem.reason},
            )
            metrics.OUTBOX_PARKED.labels(r.topic[:249], problem.code).inc()
    await conn.execute(
        _INSERT_OUTBOX,
        {
            "topics": [r.topic for r in records],
            "keys": [r.key for r in records],
            "values": [r.value for r in records],
            "headers": [
                orjson.dumps(
                    [[_header_name(n), base64.b64encode(v).decode()] for n, v in r.headers]
                ).decode()
                for r in records
            ],
            "parked": parked,
        },
    )


def _header_name(name: str) -> str:
    """A header name JSON can hold: one that is not UTF-8 (its record is parked) escaped."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


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
