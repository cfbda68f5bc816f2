"""The reports' counting: the database counts (``GROUP BY``, ``FILTER``, ``percentile_cont``:
never a row per case into Python) and returns counts per group and arm; the pure core
(``services.scheduler.domain.results``) turns them into rates, intervals and p-values. The
definitions are in ``services/scheduler/reports.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    ColumnElement,
    FromClause,
    and_,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import DateTime, Text
from sqlalchemy.types import Interval as IntervalType

from services.scheduler.domain.results import (
    RECHURN_HORIZONS,
    REONBOARDING_HORIZONS,
    ArmCounts,
    EngagementCounts,
    RechurnCounts,
    Revenue,
    maturity_cutoff,
)
from shared.db.tables import case_steps, cases, win_backs

T = TypeVar("T")


async def snapshot(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """``work`` on one connection in one REPEATABLE READ transaction: every query of a report
    sees the same snapshot."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await work(conn)


GroupBy = Literal["none", "playbook", "reason", "lifecycle", "value_tier", "label", "variant"]
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "playbook": ("playbook",),
    "reason": ("reason",),
    "lifecycle": ("lifecycle",),
    "value_tier": ("value_tier",),
    "label": ("label",),
    "variant": ("playbook", "step_key", "variant"),
}
ENGAGEMENT_KEYS = ("playbook", "step_key", "channel", "template", "variant")
FIRED = ("dispatched", "sent", "failed", "suppressed")
"""Step states of a message handed to the dispatcher."""
SENT_EVIDENCE = ("sent", "delivered", "opened", "clicked", "bounced", "complained", "unsubscribed")
DELIVERY_EVIDENCE = ("delivered", "opened", "clicked")


# -- the filters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """Cases whose churn falls on ``start``..``end`` (UTC dates, inclusive) of ``playbook``."""

    start: date | None = None
    end: date | None = None
    playbook: str | None = None

    def conditions(self, winback_only: bool = True) -> list[ColumnElement[bool]]:
        # reactivation counts win-back cases only: a re-onboarding case (opened on a return)
        # is not a churn to win back; the messages report counts every message
        found: list[ColumnElement[bool]] = []
        if winback_only:
            found.append(cases.c.purpose == "winback")
        if self.start is not None:
            found.append(cases.c.churned_at >= datetime.combine(self.start, time(), UTC))
        if self.end is not None:
            after = datetime.combine(self.end, time(), UTC) + timedelta(days=1)
            found.append(cases.c.churned_at < after)
        if self.playbook is not None:
            found.append(cases.c.playbook == self.playbook)
        return found

    def reonboarding_conditions(self, returned_at: ColumnElement[Any]) -> list[ColumnElement[bool]]:
        """Re-onboarding cases whose return (``returned_at``) falls on ``start``..``end``."""
        found: list[ColumnElement[bool]] = [cases.c.purpose == "reonboarding"]
        if self.start is not None:
            found.append(returned_at >= datetime.combine(self.start, time(), UTC))
        if self.end is not None:
            found.append(returned_at < datetime.combine(self.end, time(), UTC) + timedelta(days=1))
        if self.playbook is not None:
            found.append(cases.c.playbook == self.playbook)
        return found


# -- counting in the database -------------------------------------------------------------------
def _units(group_by: GroupBy, filters: Filters) -> FromClause:
    """One row per (case, group it belongs to): the case's arm, return and group key."""
    segment = cases.c.segment
    keys: list[ColumnElement[Any]]
    source: FromClause = cases
    if group_by == "playbook":
        keys = [cases.c.playbook.label("playbook")]
    elif group_by == "reason":
        keys = [func.coalesce(segment["reason"].astext, "unknown").label("reason")]
    elif group_by == "lifecycle":
        keys = [segment["lifecycle"].astext.label("lifecycle")]
    elif group_by == "value_tier":
        keys = [segment["value_tier"].astext.label("value_tier")]
    elif group_by == "label":
        labels = (
            func.jsonb_array_elements_text(
                func.coalesce(segment["labels"], literal_column("'[]'::jsonb"))
            )
            .table_valued("value")
            .lateral("labels")
        )
        source = cases.outerjoin(labels, true())
        keys = [labels.c.value.label("label")]
    elif group_by == "variant":
        source = cases.join(case_steps, case_steps.c.case_id == cases.c.id)
        keys = [
            cases.c.playbook.label("playbook"),
            case_steps.c.step_key.label("step_key"),
            case_steps.c.variant.label("variant"),
        ]
    else:
        keys = []
    return (
        select(
            cases.c.id.label("case_id"),
            cases.c.holdout.label("holdout"),
            cases.c.returned_at.label("returned_at"),
            *keys,
        )
        .select_from(source)
        .where(*filters.conditions())
        .subquery("units")
    )


Key = tuple[Any, ...]


def _within(days: int) -> ColumnElement[Any]:
    # whole hours, not days: "+ 90 days" would follow the session time zone's DST
    return func.make_interval(0, 0, 0, 0, days * 24, type_=IntervalType)


@dataclass
class ArmTally:
    targeted: int = 0
    returned: int = 0
    credited: int = 0
    median: float | None = None
    p90: float | None = None
    revenue: list[Revenue] = field(default_factory=list)
    rechurn: list[RechurnCounts] = field(default_factory=list)

    def counts(self) -> ArmCounts:
        return ArmCounts(
            targeted=self.targeted,
            returned=self.returned,
            credited=self.credited,
            days_to_return_median=self.median,
            days_to_return_p90=self.p90,
            revenue=tuple(self.revenue),
            rechurn=tuple(self.rechurn)
            or tuple(RechurnCounts(days, 0, 0) for days in RECHURN_HORIZONS),
        )


async def count_winback(
    conn: AsyncConnection, group_by: GroupBy, filters: Filters, as_of: datetime
) -> dict[Key, dict[bool, ArmTally]]:
    """Per group key and arm (``holdout``): targeted, returned, credited, days to return,
    revenue per currency and re-churn counts. Three grouped queries."""
    names = GROUP_KEYS[group_by]
    units = _units(group_by, filters)
    keys = [units.c[name] for name in names]
    found: dict[Key, dict[bool, ArmTally]] = {}

    def arm(row: Any) -> ArmTally:
        key = tuple(row[name] for name in names)
        return found.setdefault(key, {}).setdefault(bool(row["holdout"]), ArmTally())

    cohort = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            func.count().label("targeted"),
            func.count().filter(units.c.returned_at.is_not(None)).label("returned"),
        ).group_by(*keys, units.c.holdout)
    )
    for row in cohort.mappings():
        target = arm(row)
        target.targeted, target.returned = int(row["targeted"]), int(row["returned"])

    # the customer's next churn after each return, for re-churn: a lateral join, so that it
    # is looked up once per return (ix_cases_customer_id), not once per FILTER using it
    later = cases.alias("later")
    next_churn = (
        select(func.min(later.c.churned_at).label("at"))
        .where(
            later.c.customer_id == win_backs.c.customer_id,
            later.c.purpose == "winback",
            later.c.churned_at > win_backs.c.returned_at,
        )
        .lateral("next_churn")
    )
    returns = (
        select(
            win_backs.c.case_id,
            win_backs.c.step_key,
            win_backs.c.days_to_return,
            win_backs.c.returned_at,
            next_churn.c.at.label("next_churn_at"),
        )
        .select_from(win_backs.join(next_churn, true()))
        .subquery("returns")
    )
    joined = units.join(returns, returns.c.case_id == units.c.case_id)
    rechurn_columns: list[ColumnElement[Any]] = []
    for days in RECHURN_HORIZONS:
        matured = returns.c.returned_at <= maturity_cutoff(as_of, days)
        rechurned = and_(matured, returns.c.next_churn_at <= returns.c.returned_at + _within(days))
        rechurn_columns += [
            func.count().filter(matured).label(f"matured_{days}"),
            func.count().filter(rechurned).label(f"rechurned_{days}"),
        ]
    timing = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            func.count().filter(returns.c.step_key.is_not(None)).label("credited"),
            func.percentile_cont(0.5).within_group(returns.c.days_to_return).label("median"),
            func.percentile_cont(0.9).within_group(returns.c.days_to_return).label("p90"),
            *rechurn_columns,
        )
        .select_from(joined)
        .group_by(*keys, units.c.holdout)
    )
    for row in timing.mappings():
        target = arm(row)
        target.credited = int(row["credited"])
        target.median = float(row["median"]) if row["median"] is not None else None
        target.p90 = float(row["p90"]) if row["p90"] is not None else None
        target.rechurn = [
            RechurnCounts(days, int(row[f"matured_{days}"]), int(row[f"rechurned_{days}"]))
            for days in RECHURN_HORIZONS
        ]

    revenue = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            win_backs.c.currency,
            func.count().label("returns"),
            func.coalesce(func.sum(win_backs.c.mrr_regained_minor), 0).label("mrr"),
        )
        .select_from(units.join(win_backs, win_backs.c.case_id == units.c.case_id))
        .group_by(*keys, units.c.holdout, win_backs.c.currency)
    )
    for row in revenue.mappings():
        arm(row).revenue.append(Revenue(row["currency"], int(row["returns"]), int(row["mrr"])))
    return found


@dataclass
class ReonboardingTally:
    cases: int = 0
    rechurn: list[RechurnCounts] = field(
        default_factory=lambda: [RechurnCounts(days, 0, 0) for days in REONBOARDING_HORIZONS]
    )


async def count_reonboarding(
    conn: AsyncConnection, by_playbook: bool, filters: Filters, as_of: datetime
) -> dict[Key, dict[bool, ReonboardingTally]]:
    """Per playbook (or one group) and arm: re-onboarding cases and their re-churn counts at
    each horizon. One grouped query."""
    returned_at = func.coalesce(
        cases.c.episode["returned_at"].astext.cast(DateTime(timezone=True)), cases.c.opened_at
    )
    reonboarding = (
        select(
            cases.c.customer_id,
            cases.c.holdout,
            cases.c.playbook,
            returned_at.label("returned_at"),
        )
        .where(*filters.reonboarding_conditions(returned_at))
        .subquery("reonboarding")
    )
    # the customer's next churn after the return: the same lateral join as for win-backs
    later = cases.alias("later")
    next_churn = (
        select(func.min(later.c.churned_at).label("at"))
        .where(
            later.c.customer_id == reonboarding.c.customer_id,
            later.c.purpose == "winback",
            later.c.churned_at > reonboarding.c.returned_at,
        )
        .lateral("next_churn")
    )
    keys = [reonboarding.c.playbook] if by_playbook else []
    columns: list[ColumnElement[Any]] = []
    for days in REONBOARDING_HORIZONS:
        matured = reonboarding.c.returned_at <= maturity_cutoff(as_of, days)
        rechurned = and_(matured, next_churn.c.at <= reonboarding.c.returned_at + _within(days))
        columns += [
            func.count().filter(matured).label(f"matured_{days}"),
            func.count().filter(rechurned).label(f"rechurned_{days}"),
        ]
    rows = await conn.execute(
        select(*keys, reonboarding.c.holdout, func.count().label("cases"), *columns)
        .select_from(reonboarding.join(next_churn, true()))
        .group_by(*keys, reonboarding.c.holdout)
    )
    found: dict[Key, dict[bool, ReonboardingTally]] = {}
    for row in rows.mappings():
        key = (row["playbook"],) if by_playbook else ()
        found.setdefault(key, {})[bool(row["holdout"])] = ReonboardingTally(
            cases=int(row["cases"]),
            rechurn=[
                RechurnCounts(days, int(row[f"matured_{days}"]), int(row[f"rechurned_{days}"]))
                for days in REONBOARDING_HORIZONS
            ],
        )
    return found


async def count_messages(
    conn: AsyncConnection, filters: Filters
) -> list[tuple[dict[str, Any], EngagementCounts]]:
    """Per (playbook, step, channel, template, variant): what happened to the messages handed
    to the dispatcher. One grouped query; holdout steps are never sent and are left out."""
    outcome = case_steps.c.outcome
    sent_evidence = outcome.has_any(array(SENT_EVIDENCE, type_=Text))
    delivered = outcome.has_any(array(DELIVERY_EVIDENCE, type_=Text))
    keys = [
        cases.c.playbook.label("playbook"),
        case_steps.c.step_key,
        case_steps.c.channel,
        case_steps.c.template,
        case_steps.c.variant,
    ]

    def count(condition: ColumnElement[bool], name: str) -> ColumnElement[Any]:
        return func.count().filter(condition).label(name)

    rows = await conn.execute(
        select(
            *keys,
            func.count().label("dispatched"),
            count(or_(case_steps.c.state == "sent", sent_evidence), "sent"),
            count(delivered, "delivered"),
            *(
                count(outcome.has_key(name), name)
                for name in ("opened", "clicked", "bounced", "complained", "unsubscribed")
            ),
            count(case_steps.c.state == "failed", "failed"),
            count(case_steps.c.state == "suppressed", "suppressed"),
        )
        .select_from(case_steps.join(cases, cases.c.id == case_steps.c.case_id))
        .where(
            case_steps.c.holdout == false(),
            case_steps.c.state.in_(FIRED),
            *filters.conditions(winback_only=False),
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    found = []
    for row in rows.mappings():
        found.append(
            (
                {name: row[name] for name in ENGAGEMENT_KEYS},
                EngagementCounts(**{f.name: int(row[f.name]) for f in fields(EngagementCounts)}),
            )
        )
    return found
