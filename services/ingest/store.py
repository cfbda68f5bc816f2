"""Customers and churn episodes in PostgreSQL: load a batch's customers, save the results."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime

from sqlalchemy import text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.customer import PROFILE_FIELDS, CustomerState, Episode, OpenEpisode
from shared.db.tables import churn_episodes, customers


async def lock_customers(conn: AsyncConnection, ids: Collection[str]) -> None:
    """Serialise concurrent writers of the same customers (Kafka consumers and HTTP)."""
    if not ids:
        return
    await conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(i, 7) AS h "
            "FROM unnest(CAST(:ids AS text[])) AS t(i) ORDER BY h) AS s"
        ),
        {"ids": sorted(ids)},
    )


async def load(conn: AsyncConnection, ids: Collection[str]) -> dict[str, CustomerState]:
    if not ids:
        return {}
    await lock_customers(conn, ids)
    id_list = list(ids)
    rows = (await conn.execute(customers.select().where(customers.c.id.in_(id_list)))).all()
    open_rows = (
        await conn.execute(
            churn_episodes.select()
            .with_only_columns(
                churn_episodes.c.id,
                churn_episodes.c.customer_id,
                churn_episodes.c.kind,
                churn_episodes.c.occurred_at,
            )
            .where(churn_episodes.c.customer_id.in_(id_list), churn_episodes.c.ended_at.is_(None))
            .order_by(churn_episodes.c.occurred_at)
        )
    ).all()
    episodes: dict[str, list[OpenEpisode]] = {}
    for r in open_rows:
        episodes.setdefault(r.customer_id, []).append(OpenEpisode(r.id, r.kind, r.occurred_at))
    out = {}
    for r in rows:
        m = r._mapping
        out[r.id] = CustomerState(
            id=r.id,
            profile={name: m[name] for name in PROFILE_FIELDS if m[name] is not None},
            status=r.status,
            status_at=r.status_at,
            profile_times={k: datetime.fromisoformat(v) for k, v in r.profile_times.items()},
            consent=dict(r.consent),
            opted_out_all=r.opted_out_all,
            open_episodes=tuple(episodes.get(r.id, ())),
        )
    return out


async def save(
    conn: AsyncConnection,
    states: Iterable[CustomerState],
    new_episodes: Sequence[Episode],
    ended: Sequence[tuple[str, datetime, str]],
    now: datetime,
) -> None:
    rows = [
        {
            "id": s.id,
            **{name: s.profile.get(name) for name in PROFILE_FIELDS},
            "status": s.status,
            "status_at": s.status_at,
            "profile_times": {k: v.isoformat() for k, v in s.profile_times.items()},
            "consent": s.consent,
            "opted_out_all": s.opted_out_all,
            "updated_at": now,
        }
        for s in states
    ]
    if rows:
        stmt = insert(customers)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[customers.c.id],
                set_={c: stmt.excluded[c] for c in rows[0] if c != "id"},
            ),
            rows,
        )
    if new_episodes:
        await conn.execute(
            insert(churn_episodes).on_conflict_do_nothing(index_elements=[churn_episodes.c.id]),
            [
                {
                    "id": e.id,
                    "customer_id": e.customer_id,
                    "kind": e.kind,
                    "reason": e.reason,
                    "reason_raw": e.reason_raw,
                    "comment": e.comment,
                    "feature": e.feature,
                    "competitor": e.competitor,
                    "occurred_at": e.occurred_at,
                    "mrr_at_churn_minor": e.mrr_at_churn_minor,
                    "currency": e.currency,
                    "tenure_days": e.tenure_days,
                    "ended_at": e.ended_at,
                    "end_reason": e.end_reason,
                    "source": e.source,
                    "source_event_id": e.source_event_id,
                }
                for e in new_episodes
            ],
        )
    for episode_id, ended_at, reason in ended:
        await conn.execute(
            update(churn_episodes)
            .where(churn_episodes.c.id == episode_id, churn_episodes.c.ended_at.is_(None))
            .values(ended_at=ended_at, end_reason=reason)
        )
