"""What was already sent for a case, for a CRM task to show (``sent_so_far``).

One statement on ``ix_deliveries_customer_id`` (a customer has few deliveries), filtered to the
case's sent ones, oldest first, at most ``limit``."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.tables import deliveries


class SentSteps:
    """``await SentSteps(engine)(customer_id, case_id, idempotency_key)`` →
    ``["email: winback_offer (2026-11-02)", …]``: the case's steps sent so far, this one
    left out."""

    def __init__(self, engine: AsyncEngine, limit: int = 20) -> None:
        self._engine = engine
        self._limit = limit

    async def __call__(self, customer_id: str, case_id: str, idempotency_key: str) -> Sequence[str]:
        d = deliveries.c
        query = (
            select(d.channel, d.template, d.sent_at)
            .where(
                d.customer_id == customer_id,
                d.case_id == case_id,
                d.state == "sent",
                d.idempotency_key != idempotency_key,
            )
            .order_by(d.sent_at.asc().nulls_last(), d.id)
            .limit(self._limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            f"{r.channel}: {r.template}"
            + (f" ({r.sent_at.date().isoformat()})" if r.sent_at is not None else "")
            for r in rows
        ]
