"""The scheduler's rows: its view of customers, cases, step timers and win-backs."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler.domain import MIGRATED, PlannedStep, SentStep
from services.scheduler.domain.case import Case, CaseChange
from services.scheduler.views import case_from_rows, case_row, event_message, step_row
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
)


def address_hash(channel: str, address: str) -> str:
    """The suppression-list key of a contact point: SHA-256 of the normalised address."""
    normal = address.strip().lower() if channel == "email" else address.strip()
    return hashlib.sha256(f"{channel}:{normal}".encode()).hexdigest()


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
    tx: Tx, topic: str, changes: Sequence[CaseChange], cause: CloudEvent | None = None
) -> None:
    """Persist what case commands returned — the one way a case's state is written: update
    the changed case rows, cancel / retime / update / add their steps, insert opened cases,
    and put every domain event in the outbox on ``topic`` (keyed by customer, caused by
    ``cause``). Set-based: a batch of changes costs a few statements, not a few per case.

    Raises:
        CaseConflict: a row was not in the state the change was decided on.
    """
    conn, now = tx.conn, tx.now
    changes = [c for c in changes if c.changed]
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
        await conn.execute(cases.insert(), [case_row(case) for case in opened])
    added = [step_row(c.after.id, c.after.customer_id, step) for c in changes for step in c.added]
    if added:
        await _add_steps(conn, added, now)
    for change in changes:
        for event in change.events:
            kind, data = event_message(event)
            tx.emit(
                topic,
                event.customer_id,
                kind,
                data,
                cause=cause,
                subject=event.customer_id,
            )


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


async def _add_steps(conn: AsyncConnection, rows: list[dict[str, Any]], now: datetime) -> None:
    """Insert new step rows; a row a migration cancelled (never fired) is planned again."""
    stmt = insert(case_steps).values(rows)
    revive = {name: stmt.excluded[name] for name in (*_PLANNED_COLUMNS, "state", "context")}
    result = await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[case_steps.c.case_id, case_steps.c.step_key],
            set_={
                **revive,
                "state_reason": None,
                "fired_at": None,
                "defer_count": 0,
                "updated_at": now,
            },
            where=(case_steps.c.state == "cancelled") & (case_steps.c.state_reason == MIGRATED),
        ).returning(case_steps.c.id)
    )
    if len(result.all()) != len(rows):
        raise CaseConflict(f"cannot add {[(r['case_id'], r['step_key']) for r in rows]}")
