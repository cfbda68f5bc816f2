"""Results reports: measured lift over the holdout, re-churn of returned customers, win-back
revenue and time to return, and message engagement.

The database counts (``GROUP BY``, ``FILTER``, ``percentile_cont``: never a row per case into
Python); the pure core (``services.scheduler.domain.results``) turns counts into rates,
intervals and p-values. Every route needs a bearer token; errors are problem+json.

Definitions
-----------
* The unit is a **case** (one churn episode). ``targeted``: cases whose churn falls in the
  ``from``/``to`` dates (UTC, both inclusive), split by ``cases.holdout`` into the contacted
  arm and the holdout arm. ``returned``: those of them that came back (``returned_at`` set).
  Intent to treat: a case counts in its arm whatever happened to it later.
* **Re-churn** at N days: a return (a ``win_backs`` row) re-churned if the same customer has a
  later case with ``churned_at`` in ``(returned_at, returned_at + N days]``. Only returns at
  least N days before ``as_of`` (the clock's now) are old enough to judge, so only they count
  in the N-day denominator (``matured``).
* ``group_by``: ``none`` (one group), ``playbook``, ``reason`` (the normalised churn reason),
  ``lifecycle`` (passive user / churned customer / lost lead / expired trial),
  ``value_tier``, ``label`` (a case is in the group of each of its segment labels — these
  groups overlap; a case without labels is under ``label: null``), ``variant`` (per playbook
  step and variant: a case is in the group of every step variant it was *assigned*, sent or
  not; holdout cases are assigned variants too, so each variant has its own randomised
  control — the comparison is by assignment, not exposure).
* Pooling playbooks (``group_by=none``) mixes their holdout shares; when the shares differ
  read the lift per playbook.
* **Re-onboarding** (``reonboarding``): the cases with ``purpose = 'reonboarding'``, opened
  when a win-back case closed as returned, split by their own ``cases.holdout``. Their time is
  the **return** (the episode's ``returned_at``, else the case's ``opened_at``): ``from``/``to``
  select the returns on those dates, and ``playbook`` the re-onboarding playbook. A case
  re-churned at N days (90, 180) if the same customer has a later win-back case with
  ``churned_at`` in ``(return, return + N days]``; only cases returned at least N days before
  ``as_of`` count (``matured``), as for the re-churn above. ``prevented`` is the holdout's
  re-churn rate minus the contacted arm's (re-churns prevented per case: positive is good),
  with Newcombe's interval, the z-test and times the contacted matured cases. Grouped by
  playbook when ``group_by=playbook``; for every other ``group_by``, one ungrouped entry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
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
    Z95,
    ArmCounts,
    ArmResult,
    EngagementCounts,
    EngagementResult,
    GroupResult,
    Interval,
    RechurnCounts,
    RechurnPrevented,
    RechurnResult,
    Revenue,
    engagement,
    group_result,
    maturity_cutoff,
    rechurn_prevented,
    rechurn_result,
)
from shared.clock import Clock
from shared.db.tables import case_steps, cases, win_backs
from shared.http.problems import Problem
from shared.http.types import IsoDate

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
class _Arm:
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
) -> dict[Key, dict[bool, _Arm]]:
    """Per group key and arm (``holdout``): targeted, returned, credited, days to return,
    revenue per currency and re-churn counts. Three grouped queries."""
    names = GROUP_KEYS[group_by]
    units = _units(group_by, filters)
    keys = [units.c[name] for name in names]
    found: dict[Key, dict[bool, _Arm]] = {}

    def arm(row: Any) -> _Arm:
        key = tuple(row[name] for name in names)
        return found.setdefault(key, {}).setdefault(bool(row["holdout"]), _Arm())

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
class _Reonboarding:
    cases: int = 0
    rechurn: list[RechurnCounts] = field(
        default_factory=lambda: [RechurnCounts(days, 0, 0) for days in REONBOARDING_HORIZONS]
    )


async def count_reonboarding(
    conn: AsyncConnection, by_playbook: bool, filters: Filters, as_of: datetime
) -> dict[Key, dict[bool, _Reonboarding]]:
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
    found: dict[Key, dict[bool, _Reonboarding]] = {}
    for row in rows.mappings():
        key = (row["playbook"],) if by_playbook else ()
        found.setdefault(key, {})[bool(row["holdout"])] = _Reonboarding(
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


# -- the API's answers --------------------------------------------------------------------------
class IntervalOut(BaseModel):
    low: float
    high: float


class RevenueOut(BaseModel):
    currency: str | None
    returns: int
    mrr_regained_minor: int


class RechurnOut(BaseModel):
    days: int
    matured: int = Field(description="returns at least `days` days before as_of")
    rechurned: int = Field(description="of them, churned again within `days` days")
    rate: float | None
    rate_ci: IntervalOut | None


class DaysToReturnOut(BaseModel):
    median: float | None
    p90: float | None


class ArmOut(BaseModel):
    targeted: int
    returned: int
    rate: float | None = Field(description="returned ÷ targeted")
    rate_ci: IntervalOut | None = Field(description="Wilson score interval")
    credited: int = Field(description="returns credited to a sent step (attribution window)")
    days_to_return: DaysToReturnOut
    mrr_regained: list[RevenueOut]
    rechurn: list[RechurnOut]


class LiftOut(BaseModel):
    absolute: float | None = Field(description="contacted rate - holdout rate")
    ci: IntervalOut | None = Field(description="Newcombe hybrid score interval")
    p_value: float | None = Field(description="two-sided pooled two-proportion z-test")
    relative: float | None = Field(description="absolute lift ÷ holdout rate")
    incremental_returns: float | None = Field(description="absolute lift times contacted targeted")
    incremental_returns_ci: IntervalOut | None


class GroupOut(BaseModel):
    key: dict[str, Any]
    contacted: ArmOut
    holdout: ArmOut
    lift: LiftOut


class FiltersOut(BaseModel):
    from_: date | None = Field(alias="from", serialization_alias="from")
    to: date | None
    playbook: str | None


class ReonboardingArmOut(BaseModel):
    cases: int = Field(description="re-onboarding cases whose return falls in from/to")
    rechurn: list[RechurnOut]


class RechurnPreventedOut(BaseModel):
    days: int
    difference: float | None = Field(
        description="holdout re-churn rate - contacted re-churn rate: re-churns prevented per "
        "case (positive: re-onboarding helped)"
    )
    ci: IntervalOut | None = Field(description="Newcombe hybrid score interval")
    p_value: float | None = Field(description="two-sided pooled two-proportion z-test")
    rechurns_prevented: float | None = Field(description="difference times contacted matured")
    rechurns_prevented_ci: IntervalOut | None


class ReonboardingOut(BaseModel):
    key: dict[str, Any] = Field(description="{playbook} with group_by=playbook, else {}")
    contacted: ReonboardingArmOut
    holdout: ReonboardingArmOut
    prevented: list[RechurnPreventedOut]


class WinbackReport(BaseModel):
    as_of: datetime
    confidence: float
    group_by: str
    filters: FiltersOut
    groups: list[GroupOut]
    reonboarding: list[ReonboardingOut] = Field(
        description="re-churn of re-onboarded customers, contacted vs holdout, by return date"
    )


class EngagementOut(BaseModel):
    key: dict[str, Any]
    dispatched: int
    sent: int
    delivered: int = Field(description="with a delivery report, or an open or click")
    opened: int
    clicked: int
    bounced: int
    complained: int
    unsubscribed: int
    failed: int
    suppressed: int
    rate_base: str = Field(description="delivered when deliveries are reported, else sent")
    open_rate: float | None
    open_rate_ci: IntervalOut | None
    click_rate: float | None
    click_rate_ci: IntervalOut | None
    bounce_rate: float | None
    complaint_rate: float | None
    unsubscribe_rate: float | None


class MessagesReport(BaseModel):
    filters: FiltersOut
    confidence: float
    items: list[EngagementOut]


def _interval(value: Interval | None) -> IntervalOut | None:
    return IntervalOut(low=value.low, high=value.high) if value is not None else None


def _arm_out(arm: ArmResult) -> ArmOut:
    return ArmOut(
        targeted=arm.targeted,
        returned=arm.returned,
        rate=arm.rate,
        rate_ci=_interval(arm.rate_ci),
        credited=arm.credited,
        days_to_return=DaysToReturnOut(
            median=arm.days_to_return_median, p90=arm.days_to_return_p90
        ),
        mrr_regained=[
            RevenueOut(
                currency=r.currency, returns=r.returns, mrr_regained_minor=r.mrr_regained_minor
            )
            for r in arm.revenue
        ],
        rechurn=[_rechurn_out(r) for r in arm.rechurn],
    )


def _group_out(key: dict[str, Any], result: GroupResult) -> GroupOut:
    lift = result.lift
    return GroupOut(
        key=key,
        contacted=_arm_out(result.contacted),
        holdout=_arm_out(result.holdout),
        lift=LiftOut(
            absolute=lift.absolute,
            ci=_interval(lift.ci),
            p_value=lift.p_value,
            relative=lift.relative,
            incremental_returns=lift.incremental_returns,
            incremental_returns_ci=_interval(lift.incremental_returns_ci),
        ),
    )


def _rechurn_out(r: RechurnResult) -> RechurnOut:
    return RechurnOut(
        days=r.days,
        matured=r.matured,
        rechurned=r.rechurned,
        rate=r.rate,
        rate_ci=_interval(r.rate_ci),
    )


def _prevented_out(p: RechurnPrevented) -> RechurnPreventedOut:
    return RechurnPreventedOut(
        days=p.days,
        difference=p.difference,
        ci=_interval(p.ci),
        p_value=p.p_value,
        rechurns_prevented=p.prevented,
        rechurns_prevented_ci=_interval(p.prevented_ci),
    )


def _engagement_out(key: dict[str, Any], result: EngagementResult) -> EngagementOut:
    c = result.counts
    return EngagementOut(
        key=key,
        dispatched=c.dispatched,
        sent=c.sent,
        delivered=c.delivered,
        opened=c.opened,
        clicked=c.clicked,
        bounced=c.bounced,
        complained=c.complained,
        unsubscribed=c.unsubscribed,
        failed=c.failed,
        suppressed=c.suppressed,
        rate_base=result.rate_base,
        open_rate=result.open_rate,
        open_rate_ci=_interval(result.open_rate_ci),
        click_rate=result.click_rate,
        click_rate_ci=_interval(result.click_rate_ci),
        bounce_rate=result.bounce_rate,
        complaint_rate=result.complaint_rate,
        unsubscribe_rate=result.unsubscribe_rate,
    )


def _sort_key(key: Key) -> tuple[tuple[bool, str], ...]:
    return tuple((part is None, "" if part is None else str(part)) for part in key)


async def winback_report(
    conn: AsyncConnection, group_by: GroupBy, filters: Filters, as_of: datetime
) -> list[GroupOut]:
    found = await count_winback(conn, group_by, filters, as_of)
    names = GROUP_KEYS[group_by]
    if not found and group_by == "none":
        found[()] = {}
    groups = []
    for key in sorted(found, key=_sort_key):
        arms = found[key]
        result = group_result(
            arms.get(False, _Arm()).counts(), arms.get(True, _Arm()).counts(), Z95
        )
        groups.append(_group_out(dict(zip(names, key, strict=True)), result))
    return groups


async def reonboarding_report(
    conn: AsyncConnection, group_by: GroupBy, filters: Filters, as_of: datetime
) -> list[ReonboardingOut]:
    by_playbook = group_by == "playbook"
    found = await count_reonboarding(conn, by_playbook, filters, as_of)
    if not found and not by_playbook:
        found[()] = {}
    groups = []
    for key in sorted(found, key=_sort_key):
        contacted = found[key].get(False, _Reonboarding())
        holdout = found[key].get(True, _Reonboarding())

        def arm(counts: _Reonboarding) -> ReonboardingArmOut:
            return ReonboardingArmOut(
                cases=counts.cases,
                rechurn=[_rechurn_out(rechurn_result(c, Z95)) for c in counts.rechurn],
            )

        groups.append(
            ReonboardingOut(
                key={"playbook": key[0]} if by_playbook else {},
                contacted=arm(contacted),
                holdout=arm(holdout),
                prevented=[
                    _prevented_out(rechurn_prevented(c, h, Z95))
                    for c, h in zip(contacted.rechurn, holdout.rechurn, strict=True)
                ],
            )
        )
    return groups


async def messages_report(conn: AsyncConnection, filters: Filters) -> list[EngagementOut]:
    return [_engagement_out(key, engagement(c)) for key, c in await count_messages(conn, filters)]


# -- the routes ---------------------------------------------------------------------------------
FromDate = Annotated[
    IsoDate | None,
    Query(alias="from", description="churned on or after this date (UTC, ISO 8601)"),
]
ToDate = Annotated[IsoDate | None, Query(description="churned on or before this date (UTC)")]
PlaybookFilter = Annotated[str | None, Query(min_length=1, max_length=100)]

EngineSource = AsyncEngine | Callable[[], AsyncEngine]
T = TypeVar("T")


def _filters(start: date | None, end: date | None, playbook: str | None) -> Filters:
    if start is not None and end is not None and end < start:
        raise Problem(
            422,
            "Invalid parameter",
            "to: before from",
            errors=[{"field": "to", "reason": "must not be before from"}],
        )
    return Filters(start, end, playbook)


def router(engine: EngineSource, clock: Clock, auth: Any) -> APIRouter:
    """``GET /v1/reports/winback`` and ``GET /v1/reports/messages``. ``engine`` is the engine
    or a function returning it (for apps whose engine is made at start-up)."""
    api = APIRouter(prefix="/v1/reports", tags=["reports"], dependencies=[Depends(auth)])
    responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing bearer token (problem+json)"},
        403: {"description": "bad bearer token (problem+json)"},
        422: {"description": "invalid parameter, named (problem+json)"},
    }

    def current_engine() -> AsyncEngine:
        return engine if isinstance(engine, AsyncEngine) else engine()

    async def snapshot(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        # one consistent snapshot for every query of a report
        async with current_engine().connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                return await work(conn)

    @api.get(
        "/winback",
        response_model=WinbackReport,
        response_model_by_alias=True,
        responses=responses,
        summary="Reactivation, measured lift over the holdout, revenue, time to return, re-churn",
        description=(
            "Cases by churn date, split into the contacted arm and the holdout (randomly "
            "sent nothing). Per group: targeted, returned and the rate (Wilson 95% interval) "
            "of each arm; the lift (contacted - holdout) with Newcombe's hybrid score 95% "
            "interval, a two-proportion z-test p-value and the incremental returns; MRR "
            "regained per currency; days from churn to return (median, p90); re-churn of "
            "returned customers at 90/180/365 days, counting only returns old enough "
            "(`matured`). `group_by`: none, playbook, reason, lifecycle, value_tier, label "
            "(groups overlap: a case has several labels), variant (per playbook step and "
            "variant, by assignment). `reonboarding`: re-onboarding cases by return date (and "
            "re-onboarding playbook), contacted vs holdout: re-churn within 90/180 days of the "
            "return over matured cases (Wilson 95%), and the re-churns prevented (holdout - "
            "contacted; positive is good) with Newcombe's interval, the z-test p-value and "
            "times contacted matured; per playbook with group_by=playbook, else ungrouped."
        ),
    )
    async def winback(
        start: FromDate = None,
        to: ToDate = None,
        playbook: PlaybookFilter = None,
        group_by: Annotated[GroupBy, Query(description="how to split the cases")] = "none",
    ) -> WinbackReport:
        filters = _filters(start, to, playbook)
        as_of = clock.now()

        async def both(conn: AsyncConnection) -> tuple[list[GroupOut], list[ReonboardingOut]]:
            return (
                await winback_report(conn, group_by, filters, as_of),
                await reonboarding_report(conn, group_by, filters, as_of),
            )

        groups, reonboarding = await snapshot(both)
        return WinbackReport(
            as_of=as_of,
            confidence=0.95,
            group_by=group_by,
            filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
            groups=groups,
            reonboarding=reonboarding,
        )

    @api.get(
        "/messages",
        response_model=MessagesReport,
        response_model_by_alias=True,
        responses=responses,
        summary="Message engagement per playbook step, channel, template and variant",
        description=(
            "Messages handed to the dispatcher (holdout steps are never sent) of cases by "
            "churn date: sent, delivered (a delivery report, or an open or click), opened, "
            "clicked, bounced, complained, unsubscribed, failed, suppressed; open and click "
            "rates (Wilson 95% intervals) over delivered messages when deliveries are "
            "reported, else over sent; bounce, complaint and unsubscribe rates over sent."
        ),
    )
    async def messages(
        start: FromDate = None,
        to: ToDate = None,
        playbook: PlaybookFilter = None,
    ) -> MessagesReport:
        filters = _filters(start, to, playbook)
        items = await snapshot(lambda conn: messages_report(conn, filters))
        return MessagesReport(
            filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
            confidence=0.95,
            items=items,
        )

    return api
