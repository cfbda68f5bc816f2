"""Results reports: measured lift over the holdout, re-churn of returned customers, win-back
revenue and time to return, and message engagement.

The database counts (``services.scheduler.queries.reports``: ``GROUP BY``, ``FILTER``,
``percentile_cont``: never a row per case into Python); the pure core
(``services.scheduler.domain.results``) turns counts into rates, intervals and p-values; this
module turns those into the answers. Every route needs a bearer token; errors are problem+json.

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
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler.deps import ClockDep, Engine
from services.scheduler.domain.results import (
    Z95,
    ArmResult,
    EngagementResult,
    GroupResult,
    Interval,
    RechurnPrevented,
    RechurnResult,
    engagement,
    group_result,
    rechurn_prevented,
    rechurn_result,
)
from services.scheduler.queries.reports import (
    GROUP_KEYS,
    ArmTally,
    Filters,
    GroupBy,
    Key,
    ReonboardingTally,
    count_messages,
    count_reonboarding,
    count_winback,
    snapshot,
)
from shared.http.auth import require_scope
from shared.http.problems import Problem
from shared.http.types import IsoDate


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
            arms.get(False, ArmTally()).counts(), arms.get(True, ArmTally()).counts(), Z95
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
        contacted = found[key].get(False, ReonboardingTally())
        holdout = found[key].get(True, ReonboardingTally())

        def arm(counts: ReonboardingTally) -> ReonboardingArmOut:
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


def _filters(start: date | None, end: date | None, playbook: str | None) -> Filters:
    if start is not None and end is not None and end < start:
        raise Problem(
            422,
            "Invalid parameter",
            "to: before from",
            errors=[{"field": "to", "reason": "must not be before from"}],
        )
    return Filters(start, end, playbook)


# 401, 403 and 503 are documented for every route by shared.http.problems.document_problems
RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"description": "invalid parameter, named (problem+json)"},
}
routes = APIRouter(prefix="/v1/reports", tags=["reports"])


def router(auth: Callable[..., Awaitable[None]] | None = None) -> APIRouter:
    """``GET /v1/reports/winback`` and ``GET /v1/reports/messages`` (scope ``read``; ``auth``
    is an extra guard if given); they read the engine and the clock ``deps.install`` put in
    the app's state."""
    guarded = APIRouter(dependencies=[Depends(auth)] if auth is not None else [])
    guarded.include_router(routes)
    return guarded


@routes.get(
    "/winback",
    response_model=WinbackReport,
    response_model_by_alias=True,
    responses=RESPONSES,
    summary="Reactivation, measured lift over the holdout, revenue, time to return, re-churn",
    operation_id="getWinbackReport",
    dependencies=[require_scope("read")],
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
    engine: Engine,
    clock: ClockDep,
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

    groups, reonboarding = await snapshot(engine, both)
    return WinbackReport(
        as_of=as_of,
        confidence=0.95,
        group_by=group_by,
        filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
        groups=groups,
        reonboarding=reonboarding,
    )


@routes.get(
    "/messages",
    response_model=MessagesReport,
    response_model_by_alias=True,
    responses=RESPONSES,
    summary="Message engagement per playbook step, channel, template and variant",
    operation_id="getMessagesReport",
    dependencies=[require_scope("read")],
    description=(
        "Messages handed to the dispatcher (holdout steps are never sent) of cases by "
        "churn date: sent, delivered (a delivery report, or an open or click), opened, "
        "clicked, bounced, complained, unsubscribed, failed, suppressed; open and click "
        "rates (Wilson 95% intervals) over delivered messages when deliveries are "
        "reported, else over sent; bounce, complaint and unsubscribe rates over sent."
    ),
)
async def messages(
    engine: Engine,
    start: FromDate = None,
    to: ToDate = None,
    playbook: PlaybookFilter = None,
) -> MessagesReport:
    filters = _filters(start, to, playbook)
    items = await snapshot(engine, lambda conn: messages_report(conn, filters))
    return MessagesReport(
        filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
        confidence=0.95,
        items=items,
    )
