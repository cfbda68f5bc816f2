"""The scheduler's rows: its view of customers, cases, step timers and win-backs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Row, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler.domain import MIGRATED, PlannedStep, SentStep
from services.scheduler.domain.case import Case, CaseChange
from services.scheduler.views import case_from_rows, case_row, event_message, step_row
from shared.channels import address_hash as address_hash  # erasure hashes, as the dispatcher
from shared.cloudevents import CloudEvent
from shared.db.tables import case_steps, cases, scheduler_customers, win_backs
from shared.messaging.pipeline import Tx

OPEN = ("open", "paused")
PROFILE = (
    "email",
    "phone",
    "name",
    "locale",
    "timezone",
    "plan",
    "mrr_minor",
    "currency",
    "customer_since",
    "engagement",
    "crm_owner",
    "status",
    "fiscal_year_start_month",
)


async def upsert_customer(
    conn: AsyncConnection, snapshot: Mapping[str, Any], now: datetime
) -> None:
    """Take the profile as ingest published it (ingest already ordered it by event time)."""
    values: dict[str, Any] = {"id": snapshot["id"], "updated_at": now}
    for name in PROFILE:
        if name in snapshot:
            value = snapshot[name]
            if name == "customer_since" and isinstance(value, str):
                value = datetime.fromisoformat(value)
            values[name] = value
    if "consent" in snapshot:
        values["consent"] = snapshot["consent"] or {}
    if "opted_out_all" in snapshot:
        values["opted_out_all"] = bool(snapshot["opted_out_all"])
    stmt = insert(scheduler_customers).values(**values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[scheduler_customers.c.id],
            set_={k: stmt.excluded[k] for k in values if k != "id"},
            where=scheduler_customers.c.erased_at.is_(None),
        )
    )


async def customer(conn: AsyncConnection, customer_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            scheduler_customers.select().where(scheduler_customers.c.id == customer_id)
        )
    ).one_or_none()


async def customers(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, Row[Any]]:
    if not ids:
        return {}
    rows = await conn.execute(
        scheduler_customers.select().where(scheduler_customers.c.id.in_(list(ids)))
    )
    return {r.id: r for r in rows}


async def set_consent(
    conn: AsyncConnection, customer_id: str, channel: str, granted: bool, now: datetime
) -> None:
    if channel == "all":
        values: dict[str, Any] = {"opted_out_all": not granted}
    else:
        patch = bindparam("consent_patch", value={channel: granted}, type_=JSONB)
        values = {"consent": scheduler_customers.c.consent.op("||")(patch)}
    await conn.execute(
        insert(scheduler_customers).values(id=customer_id, updated_at=now).on_conflict_do_nothing()
    )
    await conn.execute(
        update(scheduler_customers)
        .where(scheduler_customers.c.id == customer_id)
        .values(updated_at=now, **values)
    )


async def open_case(conn: AsyncConnection, customer_id: str) -> Row[Any] | None:
    """The customer's open (or paused) case, locked for this transaction."""
    return (
        await conn.execute(
            cases.select()
            .where(cases.c.customer_id == customer_id, cases.c.status.in_(OPEN))
            .with_for_update()
        )
    ).one_or_none()


async def case_by_id(conn: AsyncConnection, case_id: str, lock: bool = False) -> Row[Any] | None:
    query = cases.select().where(cases.c.id == case_id)
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).one_or_none()


async def case_exists_for_episode(conn: AsyncConnection, episode_id: str) -> bool:
    found = await conn.scalar(select(cases.c.id).where(cases.c.episode_id == episode_id))
    return found is not None


async def insert_steps(conn: AsyncConnection, steps: Sequence[Mapping[str, Any]]) -> int:
    if not steps:
        return 0
    result = await conn.execute(
        insert(case_steps)
        .on_conflict_do_nothing(index_elements=[case_steps.c.case_id, case_steps.c.step_key])
        .returning(case_steps.c.id),
        [dict(s) for s in steps],
    )
    return len(result.all())


async def sent_steps(
    conn: AsyncConnection, case_id: str, crm_owner: str | None
) -> list[tuple[int, SentStep]]:
    rows = await conn.execute(
        select(case_steps, cases.c.playbook, cases.c.playbook_version)
        .join(cases, cases.c.id == case_steps.c.case_id)
        .where(case_steps.c.case_id == case_id, case_steps.c.state.in_(["dispatched", "sent"]))
        .order_by(case_steps.c.fired_at)
    )
    return [
        (
            r.id,
            SentStep(
                step_key=r.step_key,
                channel=r.channel,
                template=r.template,
                variant=r.variant,
                sent_at=r.fired_at,
                crm_owner=crm_owner,
                playbook=r.playbook,
                playbook_version=r.playbook_version,
                offer=r.offer,
            ),
        )
        for r in rows
    ]


async def step_keys(conn: AsyncConnection, case_id: str) -> list[str]:
    return list(
        (
            await conn.execute(select(case_steps.c.step_key).where(case_steps.c.case_id == case_id))
        ).scalars()
    )


async def open_cases_for_feature(conn: AsyncConnection, feature_key: str) -> list[Row[Any]]:
    return list(
        await conn.execute(
            cases.select()
            .where(cases.c.feature_key == feature_key, cases.c.status.in_(OPEN))
            .with_for_update(skip_locked=False)
        )
    )


async def record_win_back(conn: AsyncConnection, row: Mapping[str, Any]) -> None:
    await conn.execute(insert(win_backs).values(**row).on_conflict_do_nothing())


async def set_last_won_back(conn: AsyncConnection, customer_id: str, at: datetime) -> None:
    await conn.execute(
        update(scheduler_customers)
        .where(
            scheduler_customers.c.id == customer_id,
            func.coalesce(scheduler_customers.c.last_won_back_at, at) <= at,
        )
        .values(last_won_back_at=at)
    )


async def set_last_active(conn: AsyncConnection, customer_id: str, at: datetime) -> None:
    """Record activity at ``at`` (the register only moves forward: events may arrive late)."""
    await conn.execute(
        update(scheduler_customers)
        .where(
            scheduler_customers.c.id == customer_id,
            func.coalesce(scheduler_customers.c.last_active_at, at) <= at,
        )
        .values(last_active_at=at)
    )


async def record_outcome(
    conn: AsyncConnection,
    case_id: str,
    step_key: str,
    state: str | None,
    outcome: Mapping[str, Any],
    now: datetime,
) -> None:
    """Merge a delivery outcome into the step; move its state when the outcome is final."""
    patch = bindparam("patch", value=dict(outcome), type_=JSONB)
    values: dict[str, Any] = {"outcome": case_steps.c.outcome.op("||")(patch), "updated_at": now}
    where = [case_steps.c.case_id == case_id, case_steps.c.step_key == step_key]
    if state is not None:
        values["state"] = state
        if state == "sent":  # a late "sent" never overwrites a final answer that came first
            where.append(case_steps.c.state.in_(["dispatched", "pending"]))
    await conn.execute(update(case_steps).where(*where).values(**values))


# -- a batch of events at a time (the handler): one statement per kind of row ----------------
# Module-level textual statements: each is compiled once per process (SQLAlchemy's compiled
# cache) and prepared once per connection (asyncpg's statement cache), whatever the batch size.
_CUSTOMER_COLUMNS = (*PROFILE, "consent", "opted_out_all", "last_won_back_at", "last_active_at")
_LOCK_CUSTOMERS = text(
    "SELECT * FROM scheduler_customers WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE"
)
_WRITE_CUSTOMERS = text(
    "INSERT INTO scheduler_customers (id, email, phone, name, locale, timezone, plan, "
    "mrr_minor, currency, customer_since, engagement, crm_owner, status, consent, "
    "opted_out_all, last_won_back_at, last_active_at, updated_at, fiscal_year_start_month) "
    "SELECT u.id, u.email, u.phone, u.name, u.locale, u.timezone, u.plan, u.mrr_minor, "
    "u.currency, u.customer_since, u.engagement, u.crm_owner, u.status, "
    "CAST(u.consent AS jsonb), u.opted_out_all, u.last_won_back_at, u.last_active_at, "
    "u.updated_at, u.fiscal_year_start_month "
    "FROM unnest(CAST(:id AS text[]), CAST(:email AS text[]), CAST(:phone AS text[]), "
    "CAST(:name AS text[]), CAST(:locale AS text[]), CAST(:timezone AS text[]), "
    "CAST(:plan AS text[]), CAST(:mrr_minor AS bigint[]), CAST(:currency AS text[]), "
    "CAST(:customer_since AS timestamptz[]), CAST(:engagement AS text[]), "
    "CAST(:crm_owner AS text[]), CAST(:status AS text[]), CAST(:consent AS text[]), "
    "CAST(:opted_out_all AS boolean[]), CAST(:last_won_back_at AS timestamptz[]), "
    "CAST(:last_active_at AS timestamptz[]), CAST(:updated_at AS timestamptz[]), "
    "CAST(:fiscal_year_start_month AS smallint[])) "
    "AS u(id, email, phone, name, locale, timezone, plan, mrr_minor, currency, "
    "customer_since, engagement, crm_owner, status, consent, opted_out_all, "
    "last_won_back_at, last_active_at, updated_at, fiscal_year_start_month) "
    "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, phone = EXCLUDED.phone, "
    "name = EXCLUDED.name, locale = EXCLUDED.locale, timezone = EXCLUDED.timezone, "
    "plan = EXCLUDED.plan, mrr_minor = EXCLUDED.mrr_minor, currency = EXCLUDED.currency, "
    "customer_since = EXCLUDED.customer_since, engagement = EXCLUDED.engagement, "
    "crm_owner = EXCLUDED.crm_owner, status = EXCLUDED.status, consent = EXCLUDED.consent, "
    "opted_out_all = EXCLUDED.opted_out_all, last_won_back_at = EXCLUDED.last_won_back_at, "
    "last_active_at = EXCLUDED.last_active_at, updated_at = EXCLUDED.updated_at, "
    "fiscal_year_start_month = EXCLUDED.fiscal_year_start_month"
)
_OPEN_CASES = text(
    "SELECT * FROM cases WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "AND status IN ('open', 'paused') ORDER BY customer_id FOR UPDATE"
)
_CASE_STEPS = text(
    "SELECT case_id, step_key, state, state_reason, channel, template, offer, is_discount, "
    'discount_fallback_template, variant, "window", on_cap, holdout, "trigger", '
    "inactive_for, due_at, original_due_at, expires_at "
    "FROM case_steps WHERE case_id = ANY(CAST(:ids AS text[])) "
    "ORDER BY case_id, due_at, id FOR UPDATE"
)
_EPISODES = text("SELECT episode_id FROM cases WHERE episode_id = ANY(CAST(:ids AS text[]))")
_RECORD_OUTCOMES = text(
    "UPDATE case_steps AS s SET state = COALESCE(u.state, s.state), "
    "outcome = s.outcome || CAST(u.patch AS jsonb), updated_at = :now "
    "FROM unnest(CAST(:case_ids AS text[]), CAST(:keys AS text[]), CAST(:states AS text[]), "
    "CAST(:patches AS text[])) AS u(case_id, step_key, state, patch) "
    "WHERE s.case_id = u.case_id AND s.step_key = u.step_key "
    # a late "sent" never overwrites a final answer that came first
    "AND (u.state IS DISTINCT FROM 'sent' OR s.state IN ('dispatched', 'pending'))"
)


async def lock_customers(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored customers among ``ids`` (as plain dicts, to fold a batch's events into),
    locked for this transaction so that :func:`write_customers` can write what the batch
    made of them without losing a concurrent change (an erasure waits, or is waited for)."""
    if not ids:
        return {}
    rows = await conn.execute(_LOCK_CUSTOMERS, {"ids": sorted(set(ids))})
    return {r["id"]: dict(r) for r in rows.mappings()}


def new_customer(customer_id: str) -> dict[str, Any]:
    """A customer row as inserted with only its id (the columns' defaults)."""
    row: dict[str, Any] = {name: None for name in _CUSTOMER_COLUMNS}
    row.update(
        id=customer_id, consent={}, opted_out_all=False, suppressed_channels=[], erased_at=None
    )
    return row


async def write_customers(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write customers as a batch left them (rows from :func:`lock_customers` or
    :func:`new_customer`, changed in memory): one statement. ``erased_at`` and
    ``suppressed_channels`` are not written (others own them)."""
    if not rows:
        return
    params: dict[str, list[Any]] = {"id": [r["id"] for r in rows]}
    for name in _CUSTOMER_COLUMNS:
        params[name] = [r.get(name) for r in rows]
    params["consent"] = [orjson.dumps(r.get("consent") or {}).decode() for r in rows]
    params["opted_out_all"] = [bool(r.get("opted_out_all")) for r in rows]
    params["updated_at"] = [r["updated_at"] for r in rows]
    await conn.execute(_WRITE_CUSTOMERS, params)


async def load_open_cases(conn: AsyncConnection, customer_ids: Sequence[str]) -> dict[str, Case]:
    """The open (or paused) case of each of these customers that has one, with its steps:
    two statements, the case rows and then their step rows locked for this transaction."""
    if not customer_ids:
        return {}
    rows = (await conn.execute(_OPEN_CASES, {"ids": sorted(set(customer_ids))})).mappings().all()
    if not rows:
        return {}
    by_case: dict[str, list[Any]] = {}
    steps = await conn.execute(_CASE_STEPS, {"ids": [r["id"] for r in rows]})
    for step in steps.mappings():
        by_case.setdefault(step["case_id"], []).append(step)
    return {r["customer_id"]: case_from_rows(r, by_case.get(r["id"], [])) for r in rows}


async def episodes_with_cases(conn: AsyncConnection, episode_ids: Sequence[str]) -> set[str]:
    """Which of these episodes already have a case."""
    if not episode_ids:
        return set()
    rows = await conn.execute(_EPISODES, {"ids": sorted(set(episode_ids))})
    return set(rows.scalars())


@dataclass(frozen=True, slots=True)
class Outcome:
    """A delivery outcome for a step: ``patch`` is merged into its ``outcome`` JSON; a final
    ``state`` (``sent``, ``failed``, ``suppressed``) moves the step."""

    case_id: str
    step_key: str
    state: str | None
    patch: Mapping[str, Any]


async def record_outcomes(
    conn: AsyncConnection, outcomes: Sequence[Outcome], now: datetime
) -> None:
    """Record outcomes in their order (:func:`record_outcome` each): one ``UPDATE … FROM
    unnest`` per round, where round k holds the k-th outcome of each step — one round unless a
    step has several outcomes in the batch (an update joins a row once)."""
    rounds: list[list[Outcome]] = []
    seen: Counter[tuple[str, str]] = Counter()
    for outcome in outcomes:
        key = (outcome.case_id, outcome.step_key)
        if seen[key] == len(rounds):
            rounds.append([])
        rounds[seen[key]].append(outcome)
        seen[key] += 1
    for batch in rounds:
        await conn.execute(
            _RECORD_OUTCOMES,
            {
                "now": now,
                "case_ids": [o.case_id for o in batch],
                "keys": [o.step_key for o in batch],
                "states": [o.state for o in batch],
                "patches": [orjson.dumps(dict(o.patch)).decode() for o in batch],
            },
        )


# -- waking the step timers when steps are written due now -----------------------------------
STEPS_DUE_CHANNEL = "winback_steps_due"
"""The PostgreSQL notification channel of "steps are due now" (``LISTEN`` in the timers)."""
STEPS_DUE = "winback.steps_due"
"""The key set in a connection's ``info`` by a transaction that wrote steps due now: the
timers of this process (``services.scheduler.timers``) are woken when the connection goes
back to the pool, after the commit."""
_NOTIFY = text("SELECT pg_notify(:channel, '')")


async def steps_due(conn: AsyncConnection) -> None:
    """This transaction writes steps that are due now: wake the step timers when it commits
    instead of at their next poll. ``pg_notify`` is delivered on commit to every listening
    timer (any process), and the connection is marked for this process's timers (the pool
    hands it back after the commit). Once per transaction."""
    sync = conn.sync_connection
    transaction = sync.get_transaction() if sync is not None else None
    if transaction is not None and conn.info.get(STEPS_DUE) is transaction:
        return
    conn.info[STEPS_DUE] = transaction if transaction is not None else True
    await conn.execute(_NOTIFY, {"channel": STEPS_DUE_CHANNEL})


async def erase_customer(conn: AsyncConnection, customer_id: str, now: datetime) -> None:
    await conn.execute(
        update(scheduler_customers)
        .where(scheduler_customers.c.id == customer_id)
        .values(
            email=None, phone=None, name=None, erased_at=now, opted_out_all=True, updated_at=now
        )
    )
    await conn.execute(
        update(case_steps)
        .where(case_steps.c.customer_id == customer_id)
        .values(context={}, updated_at=now)
    )
    await drop_inactivity_timers(conn, [customer_id])  # an erased customer is nobody's passive user


# -- moving open cases onto another playbook version -----------------------------------------
def _on_version(name: str, version: int) -> Any:
    return (
        (cases.c.playbook == name)
        & (cases.c.playbook_version == version)
        & cases.c.status.in_(OPEN)
    )


async def open_cases_on_version(
    conn: AsyncConnection, name: str, version: int, limit: int
) -> list[str]:
    """Ids of up to ``limit`` open (or paused) cases running ``name`` at ``version``, oldest
    first. Not locked: each is locked and checked again when it is migrated."""
    rows = await conn.execute(
        select(cases.c.id)
        .where(_on_version(name, version))
        .order_by(cases.c.opened_at, cases.c.id)
        .limit(limit)
    )
    return list(rows.scalars())


async def count_open_cases_on_version(conn: AsyncConnection, name: str, version: int) -> int:
    found = await conn.scalar(
        select(func.count()).select_from(cases).where(_on_version(name, version))
    )
    return int(found or 0)


_PLANNED_COLUMNS = (
    "channel",
    "template",
    "offer",
    "is_discount",
    "discount_fallback_template",
    "variant",
    "window",
    "on_cap",
    "holdout",
    "trigger",
    "inactive_for",
    "due_at",
    "original_due_at",
    "expires_at",
)


def _planned_values(step: PlannedStep) -> dict[str, Any]:
    row = step_row("", "", step)
    return {name: row[name] for name in _PLANNED_COLUMNS}


# -- the case aggregate: load, and persist what its commands return --------------------------
class CaseConflict(RuntimeError):
    """A row was not in the state a case command was decided on (a bug: the rows are locked
    while the command decides). Nothing is kept: the caller's transaction rolls back."""


# what the aggregate holds of a step (not its rendering context or delivery outcomes)
_STEP_COLUMNS = (
    case_steps.c.case_id,
    case_steps.c.step_key,
    case_steps.c.state,
    case_steps.c.state_reason,
    *(case_steps.c[name] for name in _PLANNED_COLUMNS),
)


async def _with_steps(conn: AsyncConnection, rows: Sequence[Row[Any]], lock: bool) -> list[Case]:
    """The aggregates of case ``rows``: their steps in one query (locked with ``lock``, after
    the case rows, so a timer deciding one of them is waited for)."""
    if not rows:
        return []
    query = (
        select(*_STEP_COLUMNS)
        .where(case_steps.c.case_id.in_([r.id for r in rows]))
        .order_by(case_steps.c.case_id, case_steps.c.due_at, case_steps.c.id)
    )
    if lock:
        query = query.with_for_update()
    by_case: dict[str, list[Any]] = {}
    for step in (await conn.execute(query)).mappings():
        by_case.setdefault(step["case_id"], []).append(step)
    return [case_from_rows(r._mapping, by_case.get(r.id, [])) for r in rows]


async def load_case(conn: AsyncConnection, case_id: str, lock: bool = False) -> Case | None:
    """A case and its steps; with ``lock``, the case row and then its step rows are locked
    for this transaction."""
    row = await case_by_id(conn, case_id, lock=lock)
    return None if row is None else (await _with_steps(conn, [row], lock))[0]


async def load_open_case(conn: AsyncConnection, customer_id: str) -> Case | None:
    """The customer's open (or paused) case and its steps, locked for this transaction."""
    row = await open_case(conn, customer_id)
    return None if row is None else (await _with_steps(conn, [row], True))[0]


async def load_latest_winback_case(conn: AsyncConnection, customer_id: str) -> Case | None:
    """The customer's most recent win-back case (by churn, then opening), open or closed,
    and its steps, locked for this transaction."""
    row = (
        await conn.execute(
            cases.select()
            .where(cases.c.customer_id == customer_id, cases.c.purpose == "winback")
            .order_by(cases.c.churned_at.desc(), cases.c.opened_at.desc(), cases.c.id.desc())
            .limit(1)
            .with_for_update()
        )
    ).first()
    return None if row is None else (await _with_steps(conn, [row], True))[0]


async def load_expired_cases(conn: AsyncConnection, now: datetime, limit: int) -> list[Case]:
    """Up to ``limit`` open (or paused) cases whose horizon has passed, with their steps,
    locked; cases another transaction holds are skipped (a later sweep takes them)."""
    rows = (
        await conn.execute(
            cases.select()
            .where(cases.c.status.in_(OPEN), cases.c.expires_at <= now)
            .order_by(cases.c.expires_at, cases.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return await _with_steps(conn, rows, True)


_SAVE_CASES = text(
    "UPDATE cases AS c SET status = u.status, close_reason = u.close_reason, "
    "closed_at = u.closed_at, returned_at = u.returned_at, "
    "playbook_version = u.playbook_version, expires_at = u.expires_at, updated_at = :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:was_status AS text[]), "
    "CAST(:was_version AS integer[]), CAST(:status AS text[]), CAST(:close_reason AS text[]), "
    "CAST(:closed_at AS timestamptz[]), CAST(:returned_at AS timestamptz[]), "
    "CAST(:playbook_version AS integer[]), CAST(:expires_at AS timestamptz[])) "
    "AS u(id, was_status, was_version, status, close_reason, closed_at, returned_at, "
    "playbook_version, expires_at) "
    "WHERE c.id = u.id AND c.status = u.was_status AND c.playbook_version = u.was_version "
    "RETURNING c.id"
)
_CANCEL_STEPS = text(
    "UPDATE case_steps AS s SET state = 'cancelled', state_reason = u.reason, updated_at = :now "
    "FROM unnest(CAST(:case_ids AS text[]), CAST(:keys AS text[]), CAST(:reasons AS text[])) "
    "AS u(case_id, step_key, reason) "
    "WHERE s.case_id = u.case_id AND s.step_key = u.step_key AND s.state = 'pending' "
    "RETURNING s.id"
)


async def save_cases(
    tx: Tx,
    topic: str,
    changes: Sequence[CaseChange],
    cause: CloudEvent | None = None,
    *,
    causes: Sequence[CloudEvent | None] | None = None,
) -> None:
    """Persist what case commands returned — the one way a case's state is written: update
    the changed case rows, cancel / retime / update / add their steps, insert opened cases,
    and put every domain event in the outbox on ``topic`` (keyed by customer, caused by
    ``cause``, or change by change by ``causes``). Set-based: a batch of changes costs a few
    statements, not a few per case. Each case appears at most once in ``changes``. A change
    that leaves steps of an open case due now wakes the step timers (:func:`steps_due`).

    Raises:
        CaseConflict: a row was not in the state the change was decided on.
    """
    conn, now = tx.conn, tx.now
    if causes is None:
        causes = [cause] * len(changes)
    elif len(causes) != len(changes):
        raise ValueError(f"{len(causes)} causes for {len(changes)} changes")
    kept = [(c, why) for c, why in zip(changes, causes, strict=True) if c.changed]
    changes = [c for c, _ in kept]
    moved = [c for c in changes if c.before is not None]
    opened = [c.after for c in changes if c.before is None]
    if moved:
        # closes and moves first: an opened case may replace one of them (one open per customer)
        befores = [c.before for c in moved if c.before is not None]
        afters = [c.after for c in moved]
        saved = (
            await conn.execute(
                _SAVE_CASES,
                {
                    "now": now,
                    "ids": [a.id for a in afters],
                    "was_status": [b.status for b in befores],
                    "was_version": [b.playbook_version for b in befores],
                    "status": [a.status for a in afters],
                    "close_reason": [a.close_reason for a in afters],
                    "closed_at": [a.closed_at for a in afters],
                    "returned_at": [a.returned_at for a in afters],
                    "playbook_version": [a.playbook_version for a in afters],
                    "expires_at": [a.expires_at for a in afters],
                },
            )
        ).all()
        if len(saved) != len(afters):
            missing = sorted({a.id for a in afters} - {r.id for r in saved})
            raise CaseConflict(f"cases {missing} are not in the state they were decided on")
    cancels = [(c.after.id, s.step_key, s.reason) for c in moved for s in c.cancelled]
    if cancels:
        result = await conn.execute(
            _CANCEL_STEPS,
            {
                "now": now,
                "case_ids": [c[0] for c in cancels],
                "keys": [c[1] for c in cancels],
                "reasons": [c[2] for c in cancels],
            },
        )
        if len(result.all()) != len(cancels):
            raise CaseConflict(f"cannot cancel {[(c[0], c[1]) for c in cancels]}: not pending")
    for change in moved:
        await _change_steps(conn, change, now)
    if opened:
        await _insert_cases(conn, [case_row(case) for case in opened])
    added = [step_row(c.after.id, c.after.customer_id, step) for c in changes for step in c.added]
    if added:
        await _add_steps(conn, added, now)
    if any(_leaves_due(change, now) for change in changes):
        await steps_due(conn)
    for change, why in kept:
        for event in change.events:
            kind, data = event_message(event)
            tx.emit(
                topic,
                event.customer_id,
                kind,
                data,
                cause=why,
                subject=event.customer_id,
            )


def _leaves_due(change: CaseChange, now: datetime) -> bool:
    """Whether the change leaves a step that fires now: the case is open after it, and it
    opened or resumed the case, or added or retimed steps, one of them pending and due."""
    after = change.after
    if after.status != "open":
        return False
    before = change.before
    if before is not None and before.status == "open" and not change.added and not change.retimed:
        return False
    return any(s.pending and s.planned.due_at <= now for s in after.steps)


_INSERT_CASES = text(
    "INSERT INTO cases (id, customer_id, episode_id, status, purpose, playbook, "
    "playbook_version, segment, episode, feature_key, holdout, is_rechurn, churned_at, "
    "opened_at, expires_at, close_reason, closed_at, returned_at) "
    "SELECT u.id, u.customer_id, u.episode_id, u.status, u.purpose, u.playbook, "
    "u.playbook_version, CAST(u.segment AS jsonb), CAST(u.episode AS jsonb), u.feature_key, "
    "u.holdout, u.is_rechurn, u.churned_at, u.opened_at, u.expires_at, u.close_reason, "
    "u.closed_at, u.returned_at "
    "FROM unnest(CAST(:id AS text[]), CAST(:customer_id AS text[]), "
    "CAST(:episode_id AS text[]), CAST(:status AS text[]), CAST(:purpose AS text[]), "
    "CAST(:playbook AS text[]), CAST(:playbook_version AS integer[]), "
    "CAST(:segment AS text[]), CAST(:episode AS text[]), CAST(:feature_key AS text[]), "
    "CAST(:holdout AS boolean[]), CAST(:is_rechurn AS boolean[]), "
    "CAST(:churned_at AS timestamptz[]), CAST(:opened_at AS timestamptz[]), "
    "CAST(:expires_at AS timestamptz[]), CAST(:close_reason AS text[]), "
    "CAST(:closed_at AS timestamptz[]), CAST(:returned_at AS timestamptz[])) "
    "AS u(id, customer_id, episode_id, status, purpose, playbook, playbook_version, segment, "
    "episode, feature_key, holdout, is_rechurn, churned_at, opened_at, expires_at, "
    "close_reason, closed_at, returned_at)"
)
_CASE_JSON = ("segment", "episode")
_CASE_COLUMNS = (
    "id",
    "customer_id",
    "episode_id",
    "status",
    "purpose",
    "playbook",
    "playbook_version",
    "segment",
    "episode",
    "feature_key",
    "holdout",
    "is_rechurn",
    "churned_at",
    "opened_at",
    "expires_at",
    "close_reason",
    "closed_at",
    "returned_at",
)


async def _insert_cases(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert case rows (:func:`~services.scheduler.views.case_row`): one statement."""
    params: dict[str, list[Any]] = {}
    for name in _CASE_COLUMNS:
        if name in _CASE_JSON:
            params[name] = [orjson.dumps(r[name]).decode() for r in rows]
        else:
            params[name] = [r[name] for r in rows]
    await conn.execute(_INSERT_CASES, params)


async def _change_steps(conn: AsyncConnection, change: CaseChange, now: datetime) -> None:
    """Retime and update pending steps (a migration's): new timing and content."""
    if not change.retimed and not change.updated:
        return
    case_id = change.after.id
    pending = (case_steps.c.case_id == case_id) & (case_steps.c.state == "pending")
    retimed = {c.step_key for c in change.retimed}
    for step in (*change.retimed, *change.updated):
        values = _planned_values(step.after)
        if step.step_key in retimed:
            values["state_reason"] = None  # an old deferral's reason no longer applies
        result = await conn.execute(
            update(case_steps)
            .where(pending, case_steps.c.step_key == step.step_key)
            .values(**values, updated_at=now)
        )
        if result.rowcount != 1:
            raise CaseConflict(f"case {case_id}: cannot change {step.step_key}")


_STEP_INSERT_COLUMNS = (
    "case_id",
    "customer_id",
    "step_key",
    "channel",
    "template",
    "offer",
    "is_discount",
    "discount_fallback_template",
    "variant",
    "window",
    "on_cap",
    "holdout",
    "trigger",
    "inactive_for",
    "state",
    "due_at",
    "original_due_at",
    "expires_at",
    "context",
)
_STEP_TYPES = {
    "is_discount": "boolean",
    "holdout": "boolean",
    "inactive_for": "interval",
    "due_at": "timestamptz",
    "original_due_at": "timestamptz",
    "expires_at": "timestamptz",
}
_REVIVED = (*_PLANNED_COLUMNS, "state", "context")
_ADD_STEPS = text(
    "INSERT INTO case_steps ({columns}) SELECT {values} FROM unnest({arrays}) AS u({names}) "
    "ON CONFLICT (case_id, step_key) DO UPDATE SET {revive}, state_reason = NULL, "
    "fired_at = NULL, defer_count = 0, updated_at = :now "
    "WHERE case_steps.state = 'cancelled' AND case_steps.state_reason = :migrated "
    "RETURNING case_steps.id".format(
        columns=", ".join(f'"{c}"' for c in _STEP_INSERT_COLUMNS),
        values=", ".join(
            "CAST(u.context AS jsonb)" if c == "context" else f'u."{c}"'
            for c in _STEP_INSERT_COLUMNS
        ),
        arrays=", ".join(
            f"CAST(:{c} AS {_STEP_TYPES.get(c, 'text')}[])" for c in _STEP_INSERT_COLUMNS
        ),
        names=", ".join(f'"{c}"' for c in _STEP_INSERT_COLUMNS),
        revive=", ".join(f'"{c}" = EXCLUDED."{c}"' for c in _REVIVED),
    )
)


async def _add_steps(conn: AsyncConnection, rows: list[dict[str, Any]], now: datetime) -> None:
    """Insert new step rows (one statement); a row a migration cancelled (never fired) is
    planned again."""
    params: dict[str, Any] = {"now": now, "migrated": MIGRATED}
    for name in _STEP_INSERT_COLUMNS:
        if name == "context":
            params[name] = [orjson.dumps(r["context"]).decode() for r in rows]
        else:
            params[name] = [r[name] for r in rows]
    result = await conn.execute(_ADD_STEPS, params)
    if len(result.all()) != len(rows):
        raise CaseConflict(f"cannot add {[(r['case_id'], r['step_key']) for r in rows]}")


# -- inactivity timers: one row per customer who is not churned, due when they turn passive ----
_ARM_TIMERS = text(
    "INSERT INTO inactivity_timers (customer_id, last_active_at, due_at, updated_at) "
    "SELECT u.customer_id, u.last_active_at, u.due_at, :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:at AS timestamptz[]), "
    "CAST(:due AS timestamptz[])) AS u(customer_id, last_active_at, due_at) "
    "ON CONFLICT (customer_id) DO UPDATE SET last_active_at = EXCLUDED.last_active_at, "
    "due_at = EXCLUDED.due_at, updated_at = EXCLUDED.updated_at "
    "WHERE inactivity_timers.last_active_at < EXCLUDED.last_active_at"
)
_CLAIM_TIMERS = text(
    "SELECT customer_id, last_active_at, due_at FROM inactivity_timers WHERE due_at <= :now "
    "ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED"
)
_LOCK_FREE_CUSTOMERS = text(
    "SELECT * FROM scheduler_customers WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id "
    "FOR UPDATE SKIP LOCKED"
)
_KNOWN_CUSTOMERS = text("SELECT id FROM scheduler_customers WHERE id = ANY(CAST(:ids AS text[]))")
_DROP_TIMERS = text("DELETE FROM inactivity_timers WHERE customer_id = ANY(CAST(:ids AS text[]))")
_DEFER_TIMERS = text(
    "UPDATE inactivity_timers AS t SET due_at = u.due_at, updated_at = :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:due AS timestamptz[])) AS u(customer_id, due_at) "
    "WHERE t.customer_id = u.customer_id"
)


async def arm_inactivity_timers(
    conn: AsyncConnection, timers: Mapping[str, tuple[datetime, datetime]], now: datetime
) -> None:
    """Push each customer's inactivity timer forward (``{customer: (last_active_at,
    due_at)}``), or start it: one upsert. A timer that already knows a later activity (events
    may arrive late) keeps it."""
    if not timers:
        return
    ids = sorted(timers)
    await conn.execute(
        _ARM_TIMERS,
        {
            "ids": ids,
            "at": [timers[c][0] for c in ids],
            "due": [timers[c][1] for c in ids],
            "now": now,
        },
    )


async def claim_inactivity_timers(
    conn: AsyncConnection, now: datetime, limit: int
) -> list[Row[Any]]:
    """Up to ``limit`` inactivity timers due at ``now``, locked (``SKIP LOCKED``: another
    scheduler's claim, or a batch pushing one forward, is not waited for)."""
    return list(await conn.execute(_CLAIM_TIMERS, {"now": now, "n": limit}))


async def lock_free_customers(
    conn: AsyncConnection, ids: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The stored customers among ``ids`` that no other transaction holds, locked (as
    :func:`lock_customers`, but ``SKIP LOCKED``: never waits, so it cannot deadlock with a
    batch that holds a customer and waits for their timer), and the ids with no row at all."""
    if not ids:
        return {}, set()
    wanted = sorted(set(ids))
    rows = await conn.execute(_LOCK_FREE_CUSTOMERS, {"ids": wanted})
    free = {r["id"]: dict(r) for r in rows.mappings()}
    missing = [c for c in wanted if c not in free]
    if not missing:
        return free, set()
    known = set((await conn.execute(_KNOWN_CUSTOMERS, {"ids": missing})).scalars())
    return free, set(missing) - known


async def drop_inactivity_timers(conn: AsyncConnection, ids: Sequence[str]) -> None:
    if ids:
        await conn.execute(_DROP_TIMERS, {"ids": sorted(set(ids))})


async def defer_inactivity_timers(
    conn: AsyncConnection, due: Mapping[str, datetime], now: datetime
) -> None:
    """Move these timers to a new ``due_at`` each: one statement."""
    if due:
        ids = sorted(due)
        await conn.execute(_DEFER_TIMERS, {"ids": ids, "due": [due[c] for c in ids], "now": now})
