"""What ``POST /v1/simulate`` reads of a known customer: their scheduler profile, the churn of
their latest win-back case and the messages sent to them (caps and the discount period)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler import store
from services.scheduler.domain import ChurnEpisode, ContactHistory
from services.scheduler.views import episode_from_json
from shared.db.tables import case_steps, cases


@dataclass(frozen=True)
class KnownCustomer:
    """A customer as the scheduler has them: the profile row, the churn of their latest
    win-back case (``None``: none) and the messages sent to them, by case episode."""

    row: Any
    episode: ChurnEpisode | None
    recorded_at: datetime | None  # when that case opened: the churn as the scheduler saw it
    sends: list[tuple[datetime, bool, str]]

    def history(self, episode_id: str, now: datetime) -> ContactHistory:
        """Messages sent at or before ``now`` in cases other than ``episode_id``'s."""
        kept = [(at, discount) for at, discount, ep in self.sends if ep != episode_id and at <= now]
        return ContactHistory(
            sent_at=tuple(at for at, _ in kept),
            discounts_at=tuple(at for at, discount in kept if discount),
        )


async def known_customer(conn: AsyncConnection, customer_id: str) -> KnownCustomer | None:
    """The customer's scheduler records; ``None`` for an unknown or erased customer."""
    row = await store.customer(conn, customer_id)
    if row is None or row.erased_at is not None:
        return None
    latest = (
        await conn.execute(
            select(cases.c.episode, cases.c.opened_at)
            .where(cases.c.customer_id == customer_id, cases.c.purpose == "winback")
            .order_by(cases.c.opened_at.desc())
            .limit(1)
        )
    ).first()
    sends = await conn.execute(
        select(case_steps.c.fired_at, case_steps.c.is_discount, cases.c.episode_id)
        .join(cases, cases.c.id == case_steps.c.case_id)
        .where(
            case_steps.c.customer_id == customer_id,
            case_steps.c.state.in_(("dispatched", "sent")),
            case_steps.c.fired_at.is_not(None),
        )
    )
    return KnownCustomer(
        row,
        episode_from_json(latest.episode) if latest is not None else None,
        latest.opened_at if latest is not None else None,
        [(r.fired_at, bool(r.is_discount), r.episode_id) for r in sends],
    )
