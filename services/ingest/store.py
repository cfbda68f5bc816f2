"""Customers and churn episodes in PostgreSQL: load a batch's customers, save the results."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.customer import (
    PROFILE_FIELDS,
    CustomerState,
    Draft,
    Episode,
    OpenEpisode,
    Refinement,
    status_of,
)
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
            lifecycle=r.lifecycle,
            lifecycle_at=r.lifecycle_at,
            activity=r.activity,
            activity_at=r.activity_at,
            profile_times={k: datetime.fromisoformat(v) for k, v in r.profile_times.items()},
            consent=dict(r.consent),
            opted_out_all=r.opted_out_all,
            open_episodes=tuple(episodes.get(r.id, ())),
            erased=r.erased_at is not None,
        )
    return out


_CUSTOMER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "text"),
    ("email", "text"),
    ("phone", "text"),
    ("name", "text"),
    ("locale", "text"),
    ("timezone", "text"),
    ("plan", "text"),
    ("mrr_minor", "bigint"),
    ("currency", "text"),
    ("customer_since", "timestamptz"),
    ("engagement", "text"),
    ("crm_owner", "text"),
    ("fiscal_year_start_month", "smallint"),
    ("status", "text"),
    ("lifecycle", "text"),
    ("lifecycle_at", "timestamptz"),
    ("activity", "text"),
    ("activity_at", "timestamptz"),
    ("profile_times", "jsonb"),
    ("consent", "jsonb"),
    ("opted_out_all", "boolean"),
    ("updated_at", "timestamptz"),
)
_EPISODE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "text"),
    ("customer_id", "text"),
    ("kind", "text"),
    ("reason", "text"),
    ("reason_raw", "text"),
    ("comment", "text"),
    ("feature", "text"),
    ("competitor", "text"),
    ("occurred_at", "timestamptz"),
    ("mrr_at_churn_minor", "bigint"),
    ("currency", "text"),
    ("tenure_days", "integer"),
    ("ended_at", "timestamptz"),
    ("end_reason", "text"),
    ("source", "text"),
    ("source_event_id", "text"),
)


def _unnest_insert(
    table: str,
    columns: tuple[tuple[str, str], ...],
    tail: str,
    computed: dict[str, str] | None = None,
) -> Any:
    """One INSERT for many rows: each column travels as one array parameter (jsonb as text);
    ``computed`` columns are SQL expressions evaluated per row."""
    arrays = ", ".join(
        f"CAST(:{name} AS {'text' if kind == 'jsonb' else kind}[])" for name, kind in columns
    )
    select = ", ".join(
        f"CAST({name} AS jsonb)" if kind == "jsonb" else name for name, kind in columns
    )
    names = ", ".join(name for name, _ in columns)
    extra = computed or {}
    target = ", ".join([names, *extra])
    values = ", ".join([select, *extra.values()])
    return text(
        f"INSERT INTO {table} ({target}) SELECT {values} FROM unnest({arrays}) AS t({names}) {tail}"
    )


_UPSERT_CUSTOMERS = _unnest_insert(
    "customers",
    _CUSTOMER_COLUMNS,
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n, _ in _CUSTOMER_COLUMNS if n != "id"),
)
_INSERT_EPISODES = _unnest_insert(
    "churn_episodes",
    _EPISODE_COLUMNS,
    "ON CONFLICT DO NOTHING",
    computed={"recorded_at": "clock_timestamp()"},
)


def customer_columns(
    states: Sequence[CustomerState | Draft], now: datetime
) -> dict[str, list[Any]]:
    """The customers as ``_UPSERT_CUSTOMERS`` takes them: one list per column, built column by
    column (no dict per row)."""
    profiles = [s.profile for s in states]
    return {
        "id": [s.id for s in states],
        **{name: [p.get(name) for p in profiles] for name in PROFILE_FIELDS},
        "status": [status_of(s.lifecycle, s.activity) for s in states],
        "lifecycle": [s.lifecycle for s in states],
        "lifecycle_at": [s.lifecycle_at for s in states],
        "activity": [s.activity for s in states],
        "activity_at": [s.activity_at for s in states],
        # orjson writes an aware datetime as isoformat() does
        "profile_times": [orjson.dumps(s.profile_times).decode() for s in states],
        "consent": [orjson.dumps(s.consent).decode() for s in states],
        "opted_out_all": [s.opted_out_all for s in states],
        "updated_at": [now] * len(states),
    }


def episode_columns(episodes: Sequence[Episode]) -> dict[str, list[Any]]:
    return {name: [getattr(e, name) for e in episodes] for name, _ in _EPISODE_COLUMNS}


async def save(
    conn: AsyncConnection,
    states: Sequence[CustomerState | Draft],
    new_episodes: Sequence[Episode],
    ended: Sequence[tuple[str, datetime, str]],
    now: datetime,
    refined: Sequence[Refinement] = (),
) -> None:
    if states:
        await conn.execute(_UPSERT_CUSTOMERS, customer_columns(states, now))
    if new_episodes:
        await conn.execute(_INSERT_EPISODES, episode_columns(new_episodes))
    if ended:
        await conn.execute(
            text(
                "UPDATE churn_episodes AS e SET ended_at = t.ended_at, end_reason = t.reason "
                "FROM unnest(CAST(:ids AS text[]), CAST(:ats AS timestamptz[]), "
                "CAST(:reasons AS text[])) AS t(id, ended_at, reason) "
                "WHERE e.id = t.id AND e.ended_at IS NULL"
            ),
            {
                "ids": [e[0] for e in ended],
                "ats": [e[1] for e in ended],
                "reasons": [e[2] for e in ended],
            },
        )
    if refined:
        # exit-survey answers, in order: the last one for an episode wins
        await conn.execute(
            text(
                "UPDATE churn_episodes AS e SET reason = COALESCE(t.reason, e.reason), "
                "reason_raw = COALESCE(t.reason_raw, e.reason_raw), "
                "comment = COALESCE(t.comment, e.comment) "
                "FROM unnest(CAST(:ids AS text[]), CAST(:reasons AS text[]), "
                "CAST(:raws AS text[]), CAST(:comments AS text[])) AS t(id, reason, reason_raw, "
                "comment) WHERE e.id = t.id"
            ),
            {
                "ids": [r.episode_id for r in latest(refined)],
                "reasons": [r.reason for r in latest(refined)],
                "raws": [r.reason_raw for r in latest(refined)],
                "comments": [r.comment for r in latest(refined)],
            },
        )


def latest(refined: Sequence[Refinement]) -> list[Refinement]:
    """One refinement per episode, the last of each (an UPDATE … FROM takes one row per
    target row, which one is not defined)."""
    return list({r.episode_id: r for r in refined}.values())
