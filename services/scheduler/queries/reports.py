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
    COHORT_HORIZONS,
    RECHURN_HORIZONS,
    REONBOARDING_HORIZONS,
    ArmCounts,
    EngagementCounts,
    MessagesSent,
    OffersRedeemed,
    RechurnCounts,
    ReturnValue,
    Revenue,
    StillActiveCounts,
    maturity_cutoff,
)
from shared.db.tables import case_steps, cases, scheduler_customers, win_backs

T = TypeVar("T")


async def snapshot(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """``work`` on one connection in one REPEATABLE READ transaction: every query of a report
    sees the same snapshot."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await work(conn)


GroupBy = Literal[
    "none", "playbook", "reason", "lifecycle", "value_tier", "label", "variant", "crm_owner"
]
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "crm_owner": ("crm_owner",),
    "none": (),
    "playbook": ("playbook",),
    "reason": ("reason",),
    "lifecycle": ("lifecycle",),
    "value_tier": ("value_tier",),
    "label": ("label",),
    "variant": ("playbook", "step_key", "variant"),
}
ENGAGEMENT_KEYS = ("playbook", "step_key", "channel", "template", "variant")
UNCONFIRMED = "unconfirmed"
"""The dispatcher's reason for a send a crash left unknown that nothing confirmed in time."""
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
    elif group_by == "crm_owner":
        # the customer's CRM owner now (the scheduler's copy of the profile)
        source = cases.outerjoin(
            scheduler_customers, scheduler_customers.c.id == cases.c.customer_id
        )
        keys = [scheduler_customers.c.crm_owner.label("crm_owner")]
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
            cases.c.close_reason.label("close_reason"),
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


def _returns() -> FromClause:
    """One row per return (``win_backs``) with the customer's next churn after it
    (``next_churn_at``, null if none): a lateral join, so that it is looked up once per return
    (ix_cases_customer_id), not once per FILTER using it."""
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
    return (
        select(
            win_backs.c.case_id,
            win_backs.c.customer_id,
            win_backs.c.step_id,
            win_backs.c.step_key,
            win_backs.c.crm_owner,
            win_backs.c.playbook,
            win_backs.c.days_to_return,
            win_backs.c.returned_at,
            win_backs.c.mrr_regained_minor,
            win_backs.c.currency,
            next_churn.c.at.label("next_churn_at"),
        )
        .select_from(win_backs.join(next_churn, true()))
        .subquery("returns")
    )


@dataclass
class ArmTally:
    targeted: int = 0
    returned: int = 0
    returned_after_close: int = 0
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
            func.count()
            .filter(units.c.returned_at.is_not(None), units.c.close_reason != "returned")
            .label("returned_after_close"),
        ).group_by(*keys, units.c.holdout)
    )
    for row in cohort.mappings():
        target = arm(row)
        target.targeted, target.returned = int(row["targeted"]), int(row["returned"])
        target.returned_after_close = int(row["returned_after_close"])

    returns = _returns()
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
            count(case_steps.c.state == "dispatched", "awaiting_outcome"),
            count(outcome.has_key("confirmed_by"), "reconciled"),
            count(outcome["failed_reason"].astext == UNCONFIRMED, "unconfirmed"),
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


# -- cost and value ---------------------------------------------------------------------------
MONTH_SECONDS = 30 * 86_400
"""A month of recovered revenue is 30 days (as playbook durations count it)."""


@dataclass
class MoneyTally:
    messages: list[MessagesSent] = field(default_factory=list)
    offers: list[OffersRedeemed] = field(default_factory=list)
    values: list[ReturnValue] = field(default_factory=list)


async def count_money(
    conn: AsyncConnection, group_by: GroupBy, filters: Filters, as_of: datetime, months: int
) -> dict[Key, dict[bool, MoneyTally]]:
    """Per group key and arm: messages sent per channel and provider, offers redeemed (the
    offer on a return's credited step) per offer and currency, and per currency the returns,
    their MRR and the revenue recovered within ``months`` of each return (MRR times the
    months until the customer churned again, ``as_of`` or ``months``, whichever is first).
    Three grouped queries."""
    names = GROUP_KEYS[group_by]
    units = _units(group_by, filters)
    keys = [units.c[name] for name in names]
    found: dict[Key, dict[bool, MoneyTally]] = {}

    def arm(row: Any) -> MoneyTally:
        key = tuple(row[name] for name in names)
        return found.setdefault(key, {}).setdefault(bool(row["holdout"]), MoneyTally())

    sent = case_steps.alias("sent")
    provider = sent.c.outcome["provider"].astext
    rows = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            sent.c.channel,
            provider.label("provider"),
            func.count().label("sent"),
        )
        .select_from(units.join(sent, sent.c.case_id == units.c.case_id))
        .where(
            sent.c.holdout == false(),
            or_(sent.c.state == "sent", sent.c.outcome.has_any(array(SENT_EVIDENCE, type_=Text))),
        )
        .group_by(*keys, units.c.holdout, sent.c.channel, provider)
    )
    for row in rows.mappings():
        arm(row).messages.append(MessagesSent(row["channel"], row["provider"], int(row["sent"])))

    credited = case_steps.alias("credited")
    rows = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            credited.c.offer,
            win_backs.c.currency,
            func.count().label("redeemed"),
            func.coalesce(func.sum(win_backs.c.mrr_regained_minor), 0).label("mrr"),
        )
        .select_from(
            units.join(win_backs, win_backs.c.case_id == units.c.case_id).join(
                credited, credited.c.id == win_backs.c.step_id
            )
        )
        .where(credited.c.offer.is_not(None))
        .group_by(*keys, units.c.holdout, credited.c.offer, win_backs.c.currency)
    )
    for row in rows.mappings():
        arm(row).offers.append(
            OffersRedeemed(row["offer"], row["currency"], int(row["redeemed"]), int(row["mrr"]))
        )

    returns = _returns()
    until = func.least(returns.c.next_churn_at, as_of, returns.c.returned_at + _within(months * 30))
    stayed = func.greatest(0, func.extract("epoch", until - returns.c.returned_at))
    rows = await conn.execute(
        select(
            *keys,
            units.c.holdout,
            returns.c.currency,
            func.count().label("returns"),
            func.coalesce(func.sum(returns.c.mrr_regained_minor), 0).label("mrr"),
            func.coalesce(func.sum(returns.c.mrr_regained_minor * stayed / MONTH_SECONDS), 0).label(
                "recovered"
            ),
        )
        .select_from(units.join(returns, returns.c.case_id == units.c.case_id))
        .group_by(*keys, units.c.holdout, returns.c.currency)
    )
    for row in rows.mappings():
        arm(row).values.append(
            ReturnValue(
                row["currency"], int(row["returns"]), int(row["mrr"]), float(row["recovered"])
            )
        )
    return found


# -- cohorts and owners -----------------------------------------------------------------------
Period = Literal["month", "quarter"]


def _on_dates(
    column: ColumnElement[Any], start: date | None, end: date | None
) -> list[ColumnElement[bool]]:
    found: list[ColumnElement[bool]] = []
    if start is not None:
        found.append(column >= datetime.combine(start, time(), UTC))
    if end is not None:
        found.append(column < datetime.combine(end, time(), UTC) + timedelta(days=1))
    return found


@dataclass(frozen=True)
class CohortTally:
    period_start: date
    currency: str | None
    returned: int
    credited: int
    rechurned: int
    still_active: tuple[StillActiveCounts, ...]
    mrr_at_return_minor: int
    mrr_now_minor: int


async def count_cohorts(
    conn: AsyncConnection, period: Period, filters: Filters, as_of: datetime
) -> list[CohortTally]:
    """Returns of win-back cases by the UTC month or quarter of the return (``filters``: the
    return's date and the playbook) and currency: credited, re-churned (a later win-back
    churn by ``as_of``), still active at each of :data:`COHORT_HORIZONS` days over the returns
    old enough, MRR at return and now (the profile's MRR of those not churned again). One
    grouped query."""
    returns = _returns()
    start = func.date_trunc(period, func.timezone("UTC", returns.c.returned_at)).label("start")
    columns: list[ColumnElement[Any]] = []
    for days in COHORT_HORIZONS:
        matured = returns.c.returned_at <= maturity_cutoff(as_of, days)
        gone = returns.c.next_churn_at <= returns.c.returned_at + _within(days)
        columns += [
            func.count().filter(matured).label(f"matured_{days}"),
            func.count()
            .filter(matured, or_(returns.c.next_churn_at.is_(None), ~gone))
            .label(f"active_{days}"),
        ]
    still = returns.c.next_churn_at.is_(None)
    conditions = _on_dates(returns.c.returned_at, filters.start, filters.end)
    if filters.playbook is not None:
        conditions.append(returns.c.playbook == filters.playbook)
    rows = await conn.execute(
        select(
            start,
            returns.c.currency,
            func.count().label("returned"),
            func.count().filter(returns.c.step_key.is_not(None)).label("credited"),
            func.count().filter(~still).label("rechurned"),
            func.coalesce(func.sum(returns.c.mrr_regained_minor), 0).label("mrr_at_return"),
            func.coalesce(func.sum(scheduler_customers.c.mrr_minor).filter(still), 0).label(
                "mrr_now"
            ),
            *columns,
        )
        .select_from(
            returns.outerjoin(
                scheduler_customers, scheduler_customers.c.id == returns.c.customer_id
            )
        )
        .where(returns.c.returned_at <= as_of, *conditions)
        .group_by(start, returns.c.currency)
        .order_by(start, returns.c.currency)
    )
    return [
        CohortTally(
            period_start=row["start"].date(),
            currency=row["currency"],
            returned=int(row["returned"]),
            credited=int(row["credited"]),
            rechurned=int(row["rechurned"]),
            still_active=tuple(
                StillActiveCounts(days, int(row[f"matured_{days}"]), int(row[f"active_{days}"]))
                for days in COHORT_HORIZONS
            ),
            mrr_at_return_minor=int(row["mrr_at_return"]),
            mrr_now_minor=int(row["mrr_now"]),
        )
        for row in rows.mappings()
    ]


@dataclass(frozen=True)
class OwnerTally:
    crm_owner: str | None
    currency: str | None
    win_backs: int
    customers: int
    mrr_regained_minor: int
    first_return: datetime
    last_return: datetime


async def count_owners(conn: AsyncConnection, filters: Filters) -> list[OwnerTally]:
    """Credited win-backs (a return credited to a sent step) per CRM owner on the credited
    step and currency, by the return's date (``filters``) and playbook. One grouped query."""
    conditions = [
        win_backs.c.step_key.is_not(None),
        *_on_dates(win_backs.c.returned_at, filters.start, filters.end),
    ]
    if filters.playbook is not None:
        conditions.append(win_backs.c.playbook == filters.playbook)
    rows = await conn.execute(
        select(
            win_backs.c.crm_owner,
            win_backs.c.currency,
            func.count().label("win_backs"),
            func.count(func.distinct(win_backs.c.customer_id)).label("customers"),
            func.coalesce(func.sum(win_backs.c.mrr_regained_minor), 0).label("mrr"),
            func.min(win_backs.c.returned_at).label("first_return"),
            func.max(win_backs.c.returned_at).label("last_return"),
        )
        .where(*conditions)
        .group_by(win_backs.c.crm_owner, win_backs.c.currency)
        .order_by(win_backs.c.crm_owner.nulls_last(), win_backs.c.currency.nulls_last())
    )
    return [
        OwnerTally(
            crm_owner=row["crm_owner"],
            currency=row["currency"],
            win_backs=int(row["win_backs"]),
            customers=int(row["customers"]),
            mrr_regained_minor=int(row["mrr"]),
            first_return=row["first_return"],
            last_return=row["last_return"],
        )
        for row in rows.mappings()
    ]
