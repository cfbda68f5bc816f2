"""Retention of the shared loop's tables: old inbox rows and published outbox rows are deleted
in bounded batches by a periodic job every service runs (``Runtime.every``, wired once in
``shared.bootstrap.build_core``).

- An inbox row is what makes a redelivered event a duplicate; once it is deleted, a redelivery
  of that event would be handled again. Rows go after ``keep_inbox`` (see
  ``RetentionSettings``: longer than any record can be redelivered). ``received_at`` is the
  time of the unit of work that claimed the event (the injected clock), so the cutoff is the
  injected clock's too. (The demo's clock runs twelve hours a second: there an inbox row is
  kept about half a minute of real time — far longer than a redelivery takes.)
- An outbox row is needed only until it is published; ``published_at`` comes from the
  injected clock, so the cutoff does too.
- A parked outbox row (``parked_at``: the broker refuses it for good, see
  ``shared.messaging.outbox``) is never published, so it is never pruned either: it stays
  until an operator publishes it again or deletes it — it is an event nobody downstream saw.

Every batch is its own short transaction that deletes at most ``batch_size`` rows, oldest
first, through the time index (``ix_inbox_received_at``, ``ix_outbox_published_at``). Rows
another process is pruning at the same moment are skipped (``SKIP LOCKED``), so replicas can
run the job together without waiting on each other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import metrics
from shared.clock import Clock

log = logging.getLogger(__name__)

_PRUNE_INBOX = text(
    "DELETE FROM inbox WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM inbox WHERE received_at < :cutoff "
    "ORDER BY received_at LIMIT :n FOR UPDATE SKIP LOCKED))"
)
_PRUNE_OUTBOX = text(
    "DELETE FROM outbox WHERE id = ANY(ARRAY("
    "SELECT id FROM outbox WHERE published_at < :cutoff "
    "ORDER BY published_at LIMIT :n FOR UPDATE SKIP LOCKED))"
)


async def _delete(conn: AsyncConnection, statement: TextClause, params: Mapping[str, Any]) -> int:
    result = await conn.execute(statement, dict(params))
    return int(getattr(result, "rowcount", 0) or 0)


async def prune_inbox_batch(
    conn: AsyncConnection, clock: Clock, keep: timedelta, batch_size: int
) -> int:
    """Delete at most ``batch_size`` inbox rows received more than ``keep`` ago, oldest first."""
    return await _delete(conn, _PRUNE_INBOX, {"cutoff": clock.now() - keep, "n": batch_size})


async def prune_outbox_batch(
    conn: AsyncConnection, clock: Clock, keep: timedelta, batch_size: int
) -> int:
    """Delete at most ``batch_size`` outbox rows published more than ``keep`` ago."""
    return await _delete(conn, _PRUNE_OUTBOX, {"cutoff": clock.now() - keep, "n": batch_size})


async def _prune(
    engine: AsyncEngine,
    table: str,
    batch: Callable[[AsyncConnection], Awaitable[int]],
    batch_size: int,
    max_batches: int | None,
) -> int:
    """Run ``batch`` in its own transaction until a batch comes back short (nothing old is
    left) or ``max_batches`` ran; return the rows deleted."""
    total = batches = 0
    while max_batches is None or batches < max_batches:
        async with engine.begin() as conn:
            deleted = await batch(conn)
        batches += 1
        total += deleted
        if deleted:
            metrics.RETENTION_PRUNED.labels(table).inc(deleted)
        if deleted < batch_size:
            break
    return total


async def prune_inbox(
    engine: AsyncEngine,
    clock: Clock,
    keep: timedelta,
    batch_size: int,
    max_batches: int | None = None,
) -> int:
    """Delete the inbox rows older than ``keep`` in batches of at most ``batch_size``."""
    return await _prune(
        engine,
        "inbox",
        lambda conn: prune_inbox_batch(conn, clock, keep, batch_size),
        batch_size,
        max_batches,
    )


async def prune_outbox(
    engine: AsyncEngine,
    clock: Clock,
    keep: timedelta,
    batch_size: int,
    max_batches: int | None = None,
) -> int:
    """Delete the outbox rows published more than ``keep`` ago in batches of ``batch_size``.
    Unpublished rows, parked ones included, are never touched."""
    return await _prune(
        engine,
        "outbox",
        lambda conn: prune_outbox_batch(conn, clock, keep, batch_size),
        batch_size,
        max_batches,
    )


@dataclass
class Retention:
    """The periodic job: prune the inbox, then the published outbox rows."""

    engine: AsyncEngine
    clock: Clock
    keep_inbox: timedelta
    keep_published: timedelta
    batch_size: int = 5000
    max_batches_per_run: int | None = 100

    async def run_once(self) -> dict[str, int]:
        pruned = {
            "inbox": await prune_inbox(
                self.engine,
                self.clock,
                self.keep_inbox,
                self.batch_size,
                self.max_batches_per_run,
            ),
            "outbox": await prune_outbox(
                self.engine,
                self.clock,
                self.keep_published,
                self.batch_size,
                self.max_batches_per_run,
            ),
        }
        if any(pruned.values()):
            log.info(
                "retention pruned old rows",
                extra={"inbox_pruned": pruned["inbox"], "outbox_pruned": pruned["outbox"]},
            )
        return pruned

    async def __call__(self) -> None:
        await self.run_once()
