"""Cases for the status API: a customer's cases with their steps, a filtered page of cases,
one case with its steps. Rows come back as they are; the API shapes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    TIMESTAMP,
    ColumnElement,
    Row,
    and_,
    cast,
    false,
    func,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler import store
from services.scheduler.domain import DEFAULT_LADDER, Playbook, WindowLadder
from shared.db.tables import case_steps, cases, scheduler_customers


@dataclass
class CaseRows:
    """Case rows, each case's steps (by due time) and each customer's time zone."""

    cases: list[Row[Any]]
    steps: dict[str, list[Row[Any]]] = field(default_factory=dict)
    timezones: dict[str, str | None] = field(default_factory=dict)

    def steps_of(self, case_id: str) -> list[Row[Any]]:
        return self.steps.get(case_id, [])


@dataclass
class CustomerCases(CaseRows):
    """A customer's scheduler row (``None`` when only cases are left) and cases, newest
    first."""

    person: Row[Any] | None = None


def _by_case(steps: Sequence[Row[Any]]) -> dict[str, list[Row[Any]]]:
    found: dict[str, list[Row[Any]]] = {}
    for s in steps:
        found.setdefault(s.case_id, []).append(s)
    return found


async def customer_cases(conn: AsyncConnection, customer_id: str) -> CustomerCases | None:
    """The customer and every case of theirs with its steps; ``None``: we know nothing of
    them."""
    person = await store.customer(conn, customer_id)
    rows = (
        await conn.execute(
            cases.select()
            .where(cases.c.customer_id == customer_id)
            .order_by(cases.c.opened_at.desc())
        )
    ).all()
    if person is None and not rows:
        return None
    steps = (
        await conn.execute(
            case_steps.select()
            .where(case_steps.c.customer_id == customer_id)
            .order_by(case_steps.c.due_at, case_steps.c.id)
        )
    ).all()
    tz = person.timezone if person is not None else None
    return CustomerCases(list(rows), _by_case(steps), {customer_id: tz}, person)


class UnknownWindow(ValueError):
    """A window no loaded playbook's ladder (nor the default one) has."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"window: must be one of {', '.join(names)}")
        self.names = names


def in_window(playbooks: Sequence[Playbook], name: str, now: datetime) -> ColumnElement[bool]:
    """Cases whose timing window is ``name`` now, each measured on its own playbook's ladder
    (the default one for a playbook no longer loaded), from the return for a re-onboarding
    case and from the churn for a win-back case. Raises ``UnknownWindow``."""
    ladders: dict[WindowLadder, list[tuple[str, int]]] = {}
    for p in playbooks:
        ladders.setdefault(p.ladder, []).append((p.name, p.version))
    known = [key for keys in ladders.values() for key in keys]
    every = (DEFAULT_LADDER, *ladders)
    names = list(dict.fromkeys(w.name for ladder in every for w in ladder.windows))
    if name not in names:
        raise UnknownWindow(names)
    start = func.coalesce(
        cast(cases.c.episode["returned_at"].astext, TIMESTAMP(timezone=True)),
        cases.c.churned_at,
    )
    pairs = tuple_(cases.c.playbook, cases.c.playbook_version)
    choices: list[tuple[WindowLadder, ColumnElement[bool]]] = [
        (ladder, pairs.in_(keys)) for ladder, keys in ladders.items()
    ]
    choices.append((DEFAULT_LADDER, pairs.not_in(known) if known else true()))
    matches: list[ColumnElement[bool]] = []
    for ladder, runs in choices:
        span = next((w for w in ladder.windows if w.name == name), None)
        if span is None:
            continue
        condition = and_(runs, start > now - span.end)
        if span.start > timedelta(0):  # the first window also takes a start a bit ahead
            condition = and_(condition, start <= now - span.start)
        matches.append(condition)
    return or_(*matches) if matches else false()


@dataclass(frozen=True)
class CaseFilter:
    """What ``GET /v1/cases`` filters on; ``window`` is a condition from ``in_window``;
    ``after``: the (opened_at, id) of the last case of the previous page."""

    status: Literal["open", "paused", "closed"] | None = None
    purpose: Literal["winback", "reonboarding"] | None = None
    segment: str | None = None
    playbook: str | None = None
    window: ColumnElement[bool] | None = None
    due_before: datetime | None = None
    after: tuple[datetime, str] | None = None


async def case_page(conn: AsyncConnection, where: CaseFilter, limit: int) -> tuple[CaseRows, bool]:
    """At most ``limit`` cases, newest first, with their steps and customers' time zones; and
    whether more follow."""
    query = select(cases)
    if where.status:
        query = query.where(cases.c.status == where.status)
    if where.purpose:
        query = query.where(cases.c.purpose == where.purpose)
    if where.segment:
        query = query.where(
            or_(
                cases.c.segment["lifecycle"].astext == where.segment,
                cases.c.segment["reason"].astext == where.segment,
                cases.c.segment["labels"].contains([where.segment]),
            )
        )
    if where.playbook:
        query = query.where(cases.c.playbook == where.playbook)
    if where.window is not None:
        query = query.where(where.window)
    if where.due_before is not None:
        query = query.where(
            select(case_steps.c.id)
            .where(
                case_steps.c.case_id == cases.c.id,
                case_steps.c.state == "pending",
                case_steps.c.due_at < where.due_before,
            )
            .exists()
        )
    if where.after is not None:
        at, case_id = where.after
        query = query.where(
            or_(cases.c.opened_at < at, and_(cases.c.opened_at == at, cases.c.id < case_id))
        )
    query = query.order_by(cases.c.opened_at.desc(), cases.c.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    page = list(rows[:limit])
    tzs = dict(
        (
            await conn.execute(
                select(scheduler_customers.c.id, scheduler_customers.c.timezone).where(
                    scheduler_customers.c.id.in_([r.customer_id for r in page])
                )
            )
        ).all()
    )
    steps = (
        await conn.execute(
            case_steps.select()
            .where(case_steps.c.case_id.in_([r.id for r in page]))
            .order_by(case_steps.c.due_at)
        )
    ).all()
    return CaseRows(page, _by_case(steps), tzs), len(rows) > limit


async def case_detail(conn: AsyncConnection, case_id: str) -> CaseRows | None:
    """One case with its steps and its customer's time zone; ``None``: no such case."""
    row = await store.case_by_id(conn, case_id)
    if row is None:
        return None
    steps = (
        await conn.execute(
            case_steps.select().where(case_steps.c.case_id == case_id).order_by(case_steps.c.due_at)
        )
    ).all()
    tz = await conn.scalar(
        select(scheduler_customers.c.timezone).where(scheduler_customers.c.id == row.customer_id)
    )
    return CaseRows([row], _by_case(steps), {row.customer_id: tz})
