"""The outbox relay: publishes outbox rows with the idempotent producer and marks them.

One relay publishes at a time (a transaction-scoped advisory lock), so rows go out in id
order and one customer's events keep their order; other relays wait as stand-bys. A crash
between publish and mark yields at most a duplicate, which the consumers' inboxes absorb.
Published rows are deleted later by the retention job (``shared.messaging.retention``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import metrics
from shared.clock import Clock
from shared.messaging.transport import OutgoingRecord, Publisher

log = logging.getLogger(__name__)

RELAY_LOCK = 0x57494E42  # "WINB"


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        clock: Clock,
        batch_size: int = 1000,
        idle_poll_seconds: float = 0.05,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.clock = clock
        self.batch_size = batch_size
        self.idle_poll_seconds = idle_poll_seconds
        self._stopping = asyncio.Event()

    async def publish_once(self) -> int:
        """Publish one batch; return how many rows went out (0 if idle or not the leader)."""
        async with self.engine.begin() as conn:
            leader = await conn.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RELAY_LOCK}
            )
            if not leader:
                return 0
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, topic, key, value, headers FROM outbox "
                        "WHERE published_at IS NULL ORDER BY id LIMIT :n "
                        "FOR UPDATE SKIP LOCKED"
                    ),
                    {"n": self.batch_size},
                )
            ).all()
            if not rows:
                return 0
            await self.publisher.publish(
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
            await conn.execute(
                text("UPDATE outbox SET published_at = :now WHERE id = ANY(:ids)"),
                {"now": self.clock.now(), "ids": [r.id for r in rows]},
            )
        for r in rows:
            metrics.OUTBOX_PUBLISHED.labels(r.topic).inc()
        return len(rows)

    async def report_backlog(self) -> None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*) AS n, min(created_at) AS oldest FROM outbox "
                        "WHERE published_at IS NULL"
                    )
                )
            ).one()
        metrics.OUTBOX_BACKLOG.set(row.n)
        age = (self.clock.now() - row.oldest).total_seconds() if row.oldest else 0.0
        metrics.OUTBOX_OLDEST_AGE.set(max(0.0, age))

    async def run(self) -> None:
        await self.publisher.start()
        delay = self.idle_poll_seconds
        reported_at = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                sent = await self.publish_once()
                delay = self.idle_poll_seconds
            except Exception:
                log.exception("outbox relay failed; retrying")
                sent = 0
                delay = min(max(delay * 2, 0.1), 5.0)
            if loop.time() - reported_at > 60:
                reported_at = loop.time()
                try:
                    await self.report_backlog()
                except Exception:
                    log.exception("outbox housekeeping failed")
            if sent < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    def stop(self) -> None:
        self._stopping.set()
