"""The unit of work: one state change and the events it publishes, in ONE transaction.

Every state change in winback goes through it — the consume → transact → emit pipeline
(``shared.messaging.pipeline``), and the changes made outside a consumer (the scheduler's API
controls, erasure, playbook migrations, step timer and horizon sweep; the dispatcher's
sender)::

    async with UnitOfWork(engine, clock, source, max_record_bytes, name="scheduler.erase") as tx:
        await store.erase_customer(tx.conn, customer_id, tx.now)
        tx.emit(topic, customer_id, de.CUSTOMER_ERASED, data)

- ``tx.conn`` is the open transaction, ``tx.now`` the time of the unit (from the injected
  clock: every time it stores comes from it), ``tx.emit(...)`` queues an event;
- on a clean exit the queued events are written to the outbox (``write_outbox``: checked
  against the broker's limits, a record a broker would refuse is parked, not published) and
  the transaction commits; on an exception it rolls back and nothing reaches the outbox;
- either way ``winback_unit_of_work_seconds{unit}`` observes its duration and
  ``winback_units_of_work_total{unit,outcome}`` counts it (``committed``, ``rolled_back``, or
  ``transient`` when a failure worth retrying ended it).

A unit is entered once. To retry one on a transient failure, run a function that opens a new
unit through a ``shared.retry.RetryPolicy`` (``Pipeline.transact_reliably`` does).

Stored times come from one clock: ``outbox.created_at`` and ``parked_at`` are the unit's
``now``, as is ``inbox.received_at`` (the pipeline's claim); the columns' ``now()`` defaults
stay only for rows written by older code during a rolling upgrade.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import metrics
from shared.clock import Clock
from shared.cloudevents import CORRELATION, CloudEvent
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES, OutgoingRecord, record_problem
from shared.retry import is_transient

log = logging.getLogger(__name__)


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


class UnitOfWork:
    """``async with UnitOfWork(...) as tx``: one transaction, its outbox written on a clean
    exit, its metrics recorded on any exit (see the module's docstring). ``name`` labels the
    metrics (the consumer's name for the pipeline, ``<service>.<operation>`` elsewhere);
    ``max_record_bytes`` is ``kafka.max_record_bytes``, the largest record the broker takes."""

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        source: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        *,
        name: str,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.source = source
        self.max_record_bytes = max_record_bytes
        self.name = name
        self._cm: contextlib.AbstractAsyncContextManager[Tx] | None = None

    async def __aenter__(self) -> Tx:
        if self._cm is not None:
            raise RuntimeError(f"unit of work {self.name!r} entered twice: make a new one")
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _run(self) -> AsyncIterator[Tx]:
        started = time.perf_counter()
        outcome = "rolled_back"
        try:
            async with self.engine.begin() as conn:
                tx = Tx(conn=conn, now=self.clock.now(), source=self.source)
                yield tx
                await write_outbox(conn, tx.outgoing, self.max_record_bytes, now=tx.now)
            outcome = "committed"
        except BaseException as exc:
            if is_transient(exc):
                outcome = "transient"
            raise
        finally:
            metrics.UNIT_OF_WORK_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            metrics.UNITS_OF_WORK.labels(self.name, outcome).inc()


_INSERT_OUTBOX = text(
    "INSERT INTO outbox (topic, key, value, headers, created_at, parked_at, park_reason) "
    "SELECT t, k, v, CAST(h AS jsonb), CAST(:now AS timestamptz), "
    "CASE WHEN p IS NULL THEN NULL ELSE CAST(:now AS timestamptz) END, p "
    "FROM unnest(CAST(:topics AS text[]), CAST(:keys AS bytea[]), CAST(:values AS bytea[]), "
    "CAST(:headers AS text[]), CAST(:parked AS text[])) "
    "WITH ORDINALITY AS r(t, k, v, h, p, n) ORDER BY n"
)


async def write_outbox(
    conn: AsyncConnection,
    records: Sequence[OutgoingRecord],
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    *,
    now: datetime,
) -> None:
    """Append records to the outbox in one statement, keeping their order (ids ascend),
    stamped ``created_at = now``. The unit of work calls it on exit; services never do.

    Each record is checked against what the broker takes (``record_problem``: its size as
    Kafka counts it against ``max_record_bytes``, the topic name, header names). One that
    fails is a bug in our own code: it is written **parked** (``parked_at = now``,
    ``park_reason``) and logged, never published, and the transaction goes on — the business
    change it belongs to is not undone. Dead letters are cut down beforehand
    (``shared.messaging.pipeline.dead_letter_record``)."""
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
            "now": now,
            "topics": [r.topic for r in records],
            "keys": [r.key for r in records],
            "values": [r.value for r in records],
            "headers": [
                orjson.dumps(
                    [[header_name(n), base64.b64encode(v).decode()] for n, v in r.headers]
                ).decode()
                for r in records
            ],
            "parked": parked,
        },
    )


def header_name(name: str) -> str:
    """A header name JSON can hold: one that is not UTF-8 (its record is parked) escaped."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")
