"""The outbox relay: publishes outbox rows with the idempotent producer and marks them.

One relay publishes at a time (a transaction-scoped advisory lock), so rows go out in id
order and one customer's events keep their order; other relays wait as stand-bys. A crash
between publish and mark yields at most a duplicate, which the consumers' inboxes absorb.
Published rows are deleted later by the retention job (``shared.messaging.retention``).

No single row can block the rest. Each pass learns the outcome of every row
(``Publisher.publish_each``):
- published → ``published_at``;
- refused by the broker for good (too large, a topic name it rejects, a record it cannot
  take) → **parked**: ``parked_at`` and ``park_reason`` are set, it is logged and counted
  (``winback_outbox_parked_total{topic,reason}``), and the rows after it go on in the same
  pass. Parked rows are not backlog (``winback_outbox_parked_rows`` counts them), are never
  published as they are and never pruned: an operator looks at them
  (``SELECT id, topic, parked_at, park_reason FROM outbox WHERE parked_at IS NOT NULL``);
- failed for now (broker unreachable, leader moving, topic missing) → left as it is, and the
  pass is retried with backoff (``RELAY_RETRY``, the log line throttled); the rows of that
  topic after it wait too, so per-key order holds.
Rows over the broker's limits are mostly parked when written (``uow.write_outbox``).

Rows are stamped by the injected clock (``created_at`` by the unit of work that wrote them,
``published_at``/``parked_at`` here), so the backlog's age (``winback_outbox_oldest_age_seconds``)
is the clock's now minus the oldest ``created_at``: one clock on both sides.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, replace

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import metrics
from shared.clock import Clock
from shared.errors import TransientError
from shared.messaging.transport import OutgoingRecord, Publisher
from shared.retry import TRANSIENT, RetryPolicy, any_exception

log = logging.getLogger(__name__)

RELAY_LOCK = 0x57494E42  # "WINB"

RELAY_RETRY = replace(TRANSIENT, retry_on=any_exception)
"""A pass that failed (rows not published for now, or an error) is retried after 0.1 s, then
windows doubling to 5 s, until it succeeds or the relay stops: the relay never gives up."""


@dataclass(frozen=True)
class RelayPass:
    """What one pass did: rows published, parked, and left for a retry (failed for now)."""

    published: int = 0
    parked: int = 0
    failed: int = 0

    @property
    def settled(self) -> int:
        return self.published + self.parked


class RowsNotPublished(TransientError):
    """A pass left rows unpublished for now: the relay retries it."""

    def __init__(self, done: RelayPass, errors: dict[str, int], first: str) -> None:
        super().__init__(
            f"{done.failed} rows not published ({done.published} published, "
            f"{done.parked} parked), errors {errors}: {first}"
        )
        self.done = done


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        clock: Clock,
        batch_size: int = 1000,
        idle_poll_seconds: float = 0.05,
        retry: RetryPolicy = RELAY_RETRY,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.clock = clock
        self.batch_size = batch_size
        self.idle_poll_seconds = idle_poll_seconds
        self.retry = retry
        self._stopping = asyncio.Event()

    async def publish_once(self) -> RelayPass:
        """Publish one batch and mark each row published or parked; nothing if idle or not
        the leader."""
        done, _ = await self._publish_batch()
        return done

    async def _publish_batch(self) -> tuple[RelayPass, RowsNotPublished | None]:
        async with self.engine.begin() as conn:
            leader = await conn.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RELAY_LOCK}
            )
            if not leader:
                return RelayPass(), None
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, topic, key, value, headers FROM outbox "
                        "WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT :n "
                        "FOR UPDATE SKIP LOCKED"
                    ),
                    {"n": self.batch_size},
                )
            ).all()
            if not rows:
                return RelayPass(), None
            outcomes = await self.publisher.publish_each(
                [
                    OutgoingRecord(
                        topic=r.topic,
                        key=r.key,
                        value=r.value,
                        headers=tuple((n, base64.b64decode(v)) for n, v in r.headers),
                    )
                    for r in rows
                ]
            )
            now = self.clock.now()
            published = [r for r, o in zip(rows, outcomes, strict=True) if o.status == "published"]
            parked = [(r, o) for r, o in zip(rows, outcomes, strict=True) if o.status == "refused"]
            failed = [o for o in outcomes if o.status == "failed"]
            if published:
                await conn.execute(
                    text("UPDATE outbox SET published_at = :now WHERE id = ANY(:ids)"),
                    {"now": now, "ids": [r.id for r in published]},
                )
            if parked:
                await conn.execute(
                    text(
                        "UPDATE outbox SET parked_at = :now, park_reason = p.reason "
                        "FROM unnest(CAST(:ids AS bigint[]), CAST(:reasons AS text[])) "
                        "AS p(id, reason) WHERE outbox.id = p.id"
                    ),
                    {
                        "now": now,
                        "ids": [r.id for r, _ in parked],
                        "reasons": [o.reason[:2000] for _, o in parked],
                    },
                )
        for r in published:
            metrics.OUTBOX_PUBLISHED.labels(r.topic).inc()
        for r, o in parked:
            metrics.OUTBOX_PARKED.labels(r.topic[:249], o.code).inc()
            log.error(
                "outbox row parked: the broker refuses it for good",
                extra={"outbox_id": r.id, "topic": r.topic[:249], "reason": o.reason[:1000]},
            )
        done = RelayPass(len(published), len(parked), len(failed))
        if not failed:
            return done, None
        errors = dict(Counter(o.code for o in failed))
        return done, RowsNotPublished(done, errors, failed[0].reason[:500])

    async def report_backlog(self) -> None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*) AS n, min(created_at) AS oldest FROM outbox "
                        "WHERE published_at IS NULL AND parked_at IS NULL"
                    )
                )
            ).one()
            parked = await conn.scalar(
                text("SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL")
            )
        metrics.OUTBOX_BACKLOG.set(row.n)
        metrics.OUTBOX_PARKED_ROWS.set(parked or 0)
        age = (self.clock.now() - row.oldest).total_seconds() if row.oldest else 0.0
        metrics.OUTBOX_OLDEST_AGE.set(max(0.0, age))

    async def _pass(self) -> RelayPass:
        """One pass; raises ``RowsNotPublished`` (after committing what it did) when rows
        failed for now, so that the retry policy backs off."""
        done, failure = await self._publish_batch()
        if failure is not None:
            raise failure
        return done

    async def run(self) -> None:
        await self.publisher.start()
        reported_at = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                done = await self.retry.call(self._pass, "outbox relay pass", log, self._stopping)
            except Exception:
                return  # stopping: the failure was logged while it was retried
            if loop.time() - reported_at > 60:
                reported_at = loop.time()
                try:
                    await self.report_backlog()
                except Exception:
                    log.exception("outbox housekeeping failed")
            if done.settled < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.idle_poll_seconds)

    def stop(self) -> None:
        self._stopping.set()
