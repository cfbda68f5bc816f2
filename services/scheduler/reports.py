"""Results reports: measured lift over the holdout, re-churn of returned customers, win-back
revenue and time to return, cost and ROI, cohorts of returned customers, credited win-backs
per CRM owner, and message engagement.

The database counts (``services.scheduler.queries.reports``: ``GROUP BY``, ``FILTER``,
``percentile_cont``: never a row per case into Python); the pure core
(``services.scheduler.domain.results``) turns counts into rates, intervals and p-values; this
module turns those into the answers. Every route needs a bearer token; errors are problem+json.

Definitions
-----------
* The unit is a **case** (one churn episode). ``targeted``: cases whose churn falls in the
  ``from``/``to`` dates (UTC, both inclusive), split by ``cases.holdout`` into the contacted
  arm and the holdout arm. ``returned``: those of them that came back (``returned_at`` set).
  Intent to treat (``lift_definition``): a case counts in its arm whatever happened to it
  later, and so does its return — the handler records every return on the customer's latest
  win-back case within the playbook's attribution horizon of the churn, open or closed
  (``returned_after_close``: returns on a case closed first for another reason). Counting
  only returns while a case is open would bias the lift low: contacted customers can
  unsubscribe (closing their case), holdout customers cannot.
* **Cost and ROI** (``economics``, in ``results.currency`` minor units): messages sent
  (``sent`` state or later evidence) times ``results.message_cost_minor`` by
  ``channel/provider`` or ``channel``; offers redeemed (the offer on a return's credited step)
  priced from the content's ``offers.yaml`` (percent off x months of the regained MRR, free
  months, a trial extension's days / 30, amount off x months, ``cost_minor``) unless
  ``results.offer_cost`` names the offer; MRR regained; recovered revenue = MRR regained x the
  months (30 days) the customer stayed after the return, until the next churn or ``as_of``,
  at most ``revenue_months``. Raw: the contacted arm's figures. Incremental: each figure per
  targeted case minus the holdout's, times the contacted arm's targeted. Other currencies are
  converted with ``results.exchange_rates`` (without a rate: ``unconverted_returns``).
* **Re-churn** at N days: a return (a ``win_backs`` row) re-churned if the same customer has a
  later case with ``churned_at`` in ``(returned_at, returned_at + N days]``. Only returns at
  least N days before ``as_of`` (the clock's now) are old enough to judge, so only they count
  in the N-day denominator (``matured``).
* ``group_by``: ``none`` (one group), ``playbook``, ``reason`` (the normalised churn reason),
  ``lifecycle`` (passive user / churned customer / lost lead / expired trial),
  ``value_tier``, ``crm_owner`` (the customer's CRM owner now, from the scheduler's copy of
  the profile), ``label`` (a case is in the group of each of its segment labels — these
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
* **Cohorts** (``/cohorts``): returns by UTC month or quarter of the return; still active at N
  days = not churned again within N days, over the returns at least N days old; MRR now = the
  profile's MRR of those not churned again.
* **Owners** (``/owners``): credited returns per CRM owner on the credited step, by return
  date — what a commission system imports (JSON, or CSV with a header row).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import date, datetime
from functools import cache
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler.deps import ClockDep, Engine
from services.scheduler.domain.results import (
    INTENT_TO_TREAT,
    Z95,
    ArmMoney,
    ArmMoneyCounts,
    ArmResult,
    CostModel,
    Economics,
    EngagementResult,
    GroupResult,
    Interval,
    LiftDefinition,
    MoneyView,
    OfferCost,
    RechurnPrevented,
    RechurnResult,
    economics,
    engagement,
    group_result,
    rate,
    rechurn_prevented,
    rechurn_result,
    still_active,
)
from services.scheduler.queries.reports import (
    GROUP_KEYS,
    ArmTally,
    Filters,
    GroupBy,
    Key,
    MoneyTally,
    Period,
    ReonboardingTally,
    count_cohorts,
    count_messages,
    count_money,
    count_owners,
    count_reonboarding,
    count_winback,
    snapshot,
)
from shared.content import Offer, shipped
from shared.errors import ConfigError
from shared.http.auth import require_scope
from shared.http.problems import Problem
from shared.http.types import IsoDate
from shared.settings import ResultsSettings


# -- the API's answers --------------------------------------------------------------------------
def _d(text: str) -> Any:
    return Field(description=text)


class IntervalOut(BaseModel):
    low: float = _d("lower end of the 95% interval")
    high: float = _d("upper end of the 95% interval")


class RevenueOut(BaseModel):
    currency: str | None = _d("currency of the MRR (null: not known)")
    returns: int = _d("returns in this currency (win_backs rows)")
    mrr_regained_minor: int = _d("sum of the MRR customers came back with, in minor units")


class RechurnOut(BaseModel):
    days: int = _d("the horizon N: a new churn within N days of the return is a re-churn")
    matured: int = _d("returns at least `days` days before as_of")
    rechurned: int = _d("of them, churned again within `days` days")
    rate: float | None = _d("rechurned ÷ matured (null without matured returns)")
    rate_ci: IntervalOut | None = _d("Wilson score interval of the rate")


class DaysToReturnOut(BaseModel):
    median: float | None = _d("median of days from churn to return over the arm's returns")
    p90: float | None = _d("90th percentile (percentile_cont) of days from churn to return")


class ArmOut(BaseModel):
    targeted: int = _d("win-back cases assigned to this arm whose churn falls in from/to")
    returned: int = _d(
        "of them, cases with a return recorded within the attribution horizon, whatever "
        "closed the case first (intent to treat)"
    )
    returned_after_close: int = _d(
        "of the returned, returns recorded on a case already closed for another reason "
        "(horizon, unsubscribed, superseded, cancelled)"
    )
    rate: float | None = _d("returned ÷ targeted")
    rate_ci: IntervalOut | None = _d("Wilson score interval")
    credited: int = _d("returns credited to a sent step (last touch within the attribution window)")
    days_to_return: DaysToReturnOut = _d("days from churn to return over the arm's returns")
    mrr_regained: list[RevenueOut] = _d("MRR of the arm's returns, per currency")
    rechurn: list[RechurnOut] = _d("re-churn of the arm's returns at 90/180/365 days")


class LiftOut(BaseModel):
    absolute: float | None = _d("contacted rate - holdout rate (intent to treat)")
    ci: IntervalOut | None = _d("Newcombe hybrid score interval")
    p_value: float | None = _d("two-sided pooled two-proportion z-test")
    relative: float | None = _d("absolute lift ÷ holdout rate")
    incremental_returns: float | None = _d("absolute lift times contacted targeted")
    incremental_returns_ci: IntervalOut | None = _d("the lift's interval times contacted targeted")


class ArmMoneyOut(BaseModel):
    messages_sent: int = _d("messages a provider accepted (step sent, or a later outcome)")
    message_cost: float = _d(
        "Σ messages sent * results.message_cost_minor[channel/provider, else channel]"
    )
    offers_redeemed: int = _d("returns credited to a step that carried an offer")
    offer_cost: float = _d(
        "Σ per redeemed offer: offer_cost.mrr_months * MRR regained + offer_cost.fixed_minor"
    )
    cost: float = _d("campaign cost: message_cost + offer_cost")
    mrr_regained: float = _d("Σ MRR regained by the arm's returns (converted)")
    recovered_revenue: float = _d(
        "Σ MRR regained * months the customer stayed after the return (until the next churn "
        "or as_of), at most revenue_months; a month is 30 days"
    )
    unconverted_returns: int = _d(
        "returns in a currency with no results.exchange_rates entry: left out of the money"
    )


class MoneyViewOut(BaseModel):
    reactivations: float | None = _d(
        "raw: contacted returned; incremental: (contacted returned ÷ targeted - holdout "
        "returned ÷ targeted) * contacted targeted"
    )
    mrr_regained: float | None = _d(
        "raw: contacted MRR regained; incremental: the same ITT difference"
    )
    recovered_revenue: float | None = _d(
        "raw: contacted recovered revenue; incremental: the same ITT difference"
    )
    cost: float | None = _d(
        "raw: contacted cost; incremental: contacted cost - holdout cost per targeted * "
        "contacted targeted"
    )
    cost_per_reactivation: float | None = _d(
        "cost ÷ reactivations (null unless both are positive); compare with CAC"
    )
    roi: float | None = _d("(recovered revenue - cost) ÷ cost (null without a cost)")


class EconomicsOut(BaseModel):
    currency: str = _d("results.currency: every amount here is in its minor units")
    revenue_months: int = _d("the horizon of recovered revenue (query parameter)")
    contacted: ArmMoneyOut = _d("the contacted arm's cost and value")
    holdout: ArmMoneyOut = _d("the holdout's (no messages; returns' value)")
    raw: MoneyViewOut = _d("the contacted arm alone, as if every return were caused")
    incremental: MoneyViewOut = _d(
        "beyond what the holdout says would have happened anyway (null without a holdout)"
    )


class GroupOut(BaseModel):
    key: dict[str, Any] = _d("the group's key, by group_by ({} for none)")
    contacted: ArmOut = _d("cases assigned to be contacted")
    holdout: ArmOut = _d("cases randomly assigned to get no message")
    lift: LiftOut = _d("contacted vs holdout by assignment (intent to treat)")
    economics: EconomicsOut = _d("cost, value and ROI, raw and incremental side by side")


class FiltersOut(BaseModel):
    from_: date | None = Field(
        alias="from", serialization_alias="from", description="first date (UTC), inclusive"
    )
    to: date | None = _d("last date (UTC), inclusive")
    playbook: str | None = _d("only this playbook")


class ReonboardingArmOut(BaseModel):
    cases: int = _d("re-onboarding cases whose return falls in from/to")
    rechurn: list[RechurnOut] = _d("re-churn within 90/180 days of the return")


class RechurnPreventedOut(BaseModel):
    days: int = _d("the horizon in days")
    difference: float | None = _d(
        "holdout re-churn rate - contacted re-churn rate: re-churns prevented per "
        "case (positive: re-onboarding helped)"
    )
    ci: IntervalOut | None = _d("Newcombe hybrid score interval")
    p_value: float | None = _d("two-sided pooled two-proportion z-test")
    rechurns_prevented: float | None = _d("difference times contacted matured")
    rechurns_prevented_ci: IntervalOut | None = _d("the interval times contacted matured")


class ReonboardingOut(BaseModel):
    key: dict[str, Any] = _d("{playbook} with group_by=playbook, else {}")
    contacted: ReonboardingArmOut = _d("re-onboarding cases contacted")
    holdout: ReonboardingArmOut = _d("re-onboarding cases held out")
    prevented: list[RechurnPreventedOut] = _d("re-churns prevented at 90/180 days")


class WinbackReport(BaseModel):
    as_of: datetime = _d("the clock's now: what 'old enough' is measured against")
    confidence: float = _d("the intervals' confidence level")
    group_by: str = _d("how the cases are split")
    lift_definition: LiftDefinition = _d(
        "intent_to_treat: contacted vs holdout by assignment; a case's return counts "
        "whatever happened after assignment (unsubscribed, capped, superseded, closed at its "
        "horizon) if it came within the playbook's attribution horizon of the churn"
    )
    revenue_months: int = _d("months of recovered revenue counted per return")
    filters: FiltersOut = _d("the filters applied (churn dates, playbook)")
    groups: list[GroupOut] = _d("one entry per group")
    reonboarding: list[ReonboardingOut] = Field(
        description="re-churn of re-onboarded customers, contacted vs holdout, by return date"
    )


class EngagementOut(BaseModel):
    key: dict[str, Any] = _d("playbook, step_key, channel, template, variant")
    dispatched: int = _d("steps handed to the dispatcher")
    sent: int = _d("accepted by a provider (state sent, or any later outcome)")
    delivered: int = _d("with a delivery report, or an open or click")
    opened: int = _d("with an open reported")
    clicked: int = _d("with a click reported")
    bounced: int = _d("with a bounce reported")
    complained: int = _d("with a spam complaint reported")
    unsubscribed: int = _d("with an unsubscribe from the message")
    failed: int = _d("state failed")
    suppressed: int = _d("state suppressed (suppression list, consent)")
    awaiting_outcome: int = _d(
        "handed to the dispatcher, no outcome yet: in flight, or a send a crash left unknown "
        "until the dispatcher reconciles it (GET /v1/messages/reconciliation there)"
    )
    reconciled: int = _d(
        "sent, confirmed after a crash had left it unknown (a provider webhook, a resend with "
        "the same key, the provider's message search); counted in sent too"
    )
    unconfirmed: int = _d(
        "failed with reason unconfirmed: a send a crash left unknown that nothing confirmed "
        "within the reconciliation window; counted in failed too"
    )
    rate_base: str = _d("delivered when deliveries are reported, else sent")
    open_rate: float | None = _d("opened ÷ rate base")
    open_rate_ci: IntervalOut | None = _d("Wilson score interval")
    click_rate: float | None = _d("clicked ÷ rate base")
    click_rate_ci: IntervalOut | None = _d("Wilson score interval")
    bounce_rate: float | None = _d("bounced ÷ sent")
    complaint_rate: float | None = _d("complained ÷ sent")
    unsubscribe_rate: float | None = _d("unsubscribed ÷ sent")


class MessagesReport(BaseModel):
    filters: FiltersOut = _d("the filters applied (churn dates, playbook)")
    confidence: float = _d("the intervals' confidence level")
    items: list[EngagementOut] = _d("one entry per step, channel, template and variant")


class StillActiveOut(BaseModel):
    days: int = _d("N: days after the return")
    matured: int = _d("returns at least N days before as_of (old enough to judge)")
    active: int = _d("of them, not churned again within N days")
    rate: float | None = _d("active ÷ matured (null until a return is old enough)")
    rate_ci: IntervalOut | None = _d("Wilson score interval")


class CohortOut(BaseModel):
    period: str = _d("the month (2026-03) or quarter (2026-Q1) of the return, UTC")
    period_start: date = _d("first day of the period")
    currency: str | None = _d("currency of the returns' MRR")
    returned: int = _d("returns of win-back cases in the period (credited or not)")
    credited: int = _d("of them, credited to a sent step")
    still_active: list[StillActiveOut] = _d("still active at 30/90/180/365 days")
    rechurned: int = _d("returned customers who churned again by as_of")
    rechurn_rate: float | None = _d("rechurned ÷ returned")
    mrr_at_return_minor: int = _d("Σ MRR the customers came back with")
    mrr_now_minor: int = _d("Σ current MRR (profile) of those not churned again")
    mrr_retained: float | None = _d("mrr_now ÷ mrr_at_return (above 1: expansion)")


class CohortsReport(BaseModel):
    as_of: datetime = _d("the clock's now")
    period: Period = _d("month or quarter")
    filters: FiltersOut = _d("return dates (UTC) and playbook")
    cohorts: list[CohortOut] = _d("one entry per period and currency, oldest first")


class OwnerOut(BaseModel):
    crm_owner: str | None = _d("the CRM owner on the credited step (null: none recorded)")
    currency: str | None = _d("currency of the MRR")
    win_backs: int = _d("returns credited to a sent step in the period")
    customers: int = _d("distinct customers among them")
    mrr_regained_minor: int = _d("Σ MRR the credited customers came back with")
    first_return: datetime = _d("earliest credited return")
    last_return: datetime = _d("latest credited return")


class OwnersReport(BaseModel):
    filters: FiltersOut = _d("return dates (UTC) and playbook")
    owners: list[OwnerOut] = _d("one entry per owner and currency")


def _interval(value: Interval | None) -> IntervalOut | None:
    return IntervalOut(low=value.low, high=value.high) if value is not None else None


def _arm_out(arm: ArmResult, returned_after_close: int) -> ArmOut:
    return ArmOut(
        targeted=arm.targeted,
        returned=arm.returned,
        returned_after_close=returned_after_close,
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


def _money_out(arm: ArmMoney) -> ArmMoneyOut:
    return ArmMoneyOut(**{f: getattr(arm, f) for f in ArmMoneyOut.model_fields})


def _view_out(view: MoneyView) -> MoneyViewOut:
    return MoneyViewOut(**{f: getattr(view, f) for f in MoneyViewOut.model_fields})


def _economics_out(e: Economics) -> EconomicsOut:
    return EconomicsOut(
        currency=e.currency,
        revenue_months=e.revenue_months,
        contacted=_money_out(e.contacted),
        holdout=_money_out(e.holdout),
        raw=_view_out(e.raw),
        incremental=_view_out(e.incremental),
    )


def _group_out(
    key: dict[str, Any], result: GroupResult, arms: dict[bool, ArmTally], money: Economics
) -> GroupOut:
    lift = result.lift
    return GroupOut(
        key=key,
        economics=_economics_out(money),
        contacted=_arm_out(result.contacted, arms.get(False, ArmTally()).returned_after_close),
        holdout=_arm_out(result.holdout, arms.get(True, ArmTally()).returned_after_close),
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
        awaiting_outcome=c.awaiting_outcome,
        reconciled=c.reconciled,
        unconfirmed=c.unconfirmed,
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
    conn: AsyncConnection,
    group_by: GroupBy,
    filters: Filters,
    as_of: datetime,
    costs: CostModel | None = None,
    revenue_months: int = 12,
) -> list[GroupOut]:
    found = await count_winback(conn, group_by, filters, as_of)
    money = await count_money(conn, group_by, filters, as_of, revenue_months)
    costs = costs or default_costs()
    names = GROUP_KEYS[group_by]
    if not found and group_by == "none":
        found[()] = {}
    groups = []
    for key in sorted(found, key=_sort_key):
        arms = found[key]
        contacted, holdout = arms.get(False, ArmTally()), arms.get(True, ArmTally())
        result = group_result(contacted.counts(), holdout.counts(), Z95)
        spent = money.get(key, {})

        value = economics(
            _priced(contacted, spent.get(False)),
            _priced(holdout, spent.get(True)),
            costs,
            revenue_months,
        )
        groups.append(_group_out(dict(zip(names, key, strict=True)), result, arms, value))
    return groups


def _priced(tally: ArmTally, spent: MoneyTally | None) -> ArmMoneyCounts:
    m = spent or MoneyTally()
    return ArmMoneyCounts(tally.targeted, tally.returned, m.messages, m.offers, m.values)


def cost_model(settings: ResultsSettings, offers: Mapping[str, Offer]) -> CostModel:
    """The report's prices: per message from the ``results`` settings; per redeemed offer
    from the content's ``offers`` (:func:`offer_price`), unless ``results.offer_cost`` names
    the offer."""
    base = CostModel(
        currency=settings.currency,
        message_cost_minor=dict(settings.message_cost_minor),
        exchange_rates=dict(settings.exchange_rates),
    )
    prices = {name: offer_price(offer, base, name) for name, offer in offers.items()}
    for name, given in settings.offer_cost.items():
        prices[name] = OfferCost(given.mrr_months, given.fixed_minor)
    return replace(base, offer_cost=prices)


def offer_price(offer: Offer, model: CostModel, name: str = "offer") -> OfferCost:
    """What one redemption of a content offer costs: percent off for N months is percent/100
    x N months of the regained MRR; free months that many; a trial extension its days / 30;
    amount off for N months N x the amount; plus ``cost_minor`` (a specialist's time).
    Amounts in another currency are converted with ``results.exchange_rates``.

    Raises:
        ConfigError: an amount's currency has no exchange rate.
    """
    months = 0.0
    if offer.kind == "percent_off" and offer.percent_off and offer.duration_months:
        months = offer.percent_off / 100 * offer.duration_months
    elif offer.kind == "free_months" and offer.months:
        months = float(offer.months)
    elif offer.kind == "trial_extension" and offer.days:
        months = offer.days / 30
    fixed = 0.0
    amounts = [(offer.cost_minor, offer.cost_currency)]
    if offer.kind == "amount_off" and offer.amount_off_minor and offer.duration_months:
        amounts.append((offer.amount_off_minor * offer.duration_months, offer.currency))
    for amount, currency in amounts:
        if amount is None:
            continue
        converted = model.convert(amount, currency)
        if converted is None:
            raise ConfigError(
                f"results.exchange_rates: offer {name!r} costs {currency}, which has no rate "
                f"to {model.currency}"
            )
        fixed += converted
    return OfferCost(months, fixed)


@cache
def default_costs() -> CostModel:
    """The prices of the default ``results`` settings and the shipped offers."""
    return cost_model(ResultsSettings(), shipped().offers)


def _costs(request: Request) -> CostModel:
    found: CostModel | None = getattr(request.app.state, "results_costs", None)
    return found if found is not None else default_costs()


Costs = Annotated[CostModel, Depends(_costs)]


async def cohorts_report(
    conn: AsyncConnection, period: Period, filters: Filters, as_of: datetime
) -> list[CohortOut]:
    found = []
    for c in await count_cohorts(conn, period, filters, as_of):
        start = c.period_start
        label = (
            f"{start.year}-Q{(start.month - 1) // 3 + 1}"
            if period == "quarter"
            else f"{start.year}-{start.month:02d}"
        )
        actives = [still_active(a, Z95) for a in c.still_active]
        found.append(
            CohortOut(
                period=label,
                period_start=start,
                currency=c.currency,
                returned=c.returned,
                credited=c.credited,
                still_active=[
                    StillActiveOut(
                        days=a.days,
                        matured=a.matured,
                        active=a.active,
                        rate=a.rate,
                        rate_ci=_interval(a.rate_ci),
                    )
                    for a in actives
                ],
                rechurned=c.rechurned,
                rechurn_rate=rate(c.rechurned, c.returned),
                mrr_at_return_minor=c.mrr_at_return_minor,
                mrr_now_minor=c.mrr_now_minor,
                mrr_retained=c.mrr_now_minor / c.mrr_at_return_minor
                if c.mrr_at_return_minor > 0
                else None,
            )
        )
    return found


async def owners_report(conn: AsyncConnection, filters: Filters) -> list[OwnerOut]:
    return [
        OwnerOut(
            crm_owner=o.crm_owner,
            currency=o.currency,
            win_backs=o.win_backs,
            customers=o.customers,
            mrr_regained_minor=o.mrr_regained_minor,
            first_return=o.first_return,
            last_return=o.last_return,
        )
        for o in await count_owners(conn, filters)
    ]


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
    costs: Costs,
    start: FromDate = None,
    to: ToDate = None,
    playbook: PlaybookFilter = None,
    group_by: Annotated[GroupBy, Query(description="how to split the cases")] = "none",
    revenue_months: Annotated[
        int, Query(ge=1, le=60, description="months of recovered revenue counted per return")
    ] = 12,
) -> WinbackReport:
    filters = _filters(start, to, playbook)
    as_of = clock.now()

    async def both(conn: AsyncConnection) -> tuple[list[GroupOut], list[ReonboardingOut]]:
        return (
            await winback_report(conn, group_by, filters, as_of, costs, revenue_months),
            await reonboarding_report(conn, group_by, filters, as_of),
        )

    groups, reonboarding = await snapshot(engine, both)
    return WinbackReport(
        as_of=as_of,
        confidence=0.95,
        group_by=group_by,
        lift_definition=INTENT_TO_TREAT,
        revenue_months=revenue_months,
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


ReturnFrom = Annotated[
    IsoDate | None,
    Query(alias="from", description="returned on or after this date (UTC, ISO 8601)"),
]
ReturnTo = Annotated[IsoDate | None, Query(description="returned on or before this date (UTC)")]


@routes.get(
    "/cohorts",
    response_model=CohortsReport,
    response_model_by_alias=True,
    responses=RESPONSES,
    summary="Returned customers by month or quarter of return: retention, re-churn, MRR",
    operation_id="getCohortsReport",
    dependencies=[require_scope("read")],
    description=(
        "Returns of win-back cases (credited or not) grouped by the UTC month or quarter of "
        "the return and currency: still active at 30/90/180/365 days (not churned again "
        "within N days) over the returns at least N days old (`matured`; a rate only once "
        "one is old enough), re-churned by now, MRR at return and now (the current MRR of "
        "those not churned again). `from`/`to` select return dates."
    ),
)
async def cohorts(
    engine: Engine,
    clock: ClockDep,
    period: Annotated[Period, Query(description="month or quarter of the return")] = "quarter",
    start: ReturnFrom = None,
    to: ReturnTo = None,
    playbook: PlaybookFilter = None,
) -> CohortsReport:
    filters = _filters(start, to, playbook)
    as_of = clock.now()
    found = await snapshot(engine, lambda conn: cohorts_report(conn, period, filters, as_of))
    return CohortsReport(
        as_of=as_of,
        period=period,
        filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
        cohorts=found,
    )


OWNER_COLUMNS = (
    "crm_owner",
    "currency",
    "win_backs",
    "customers",
    "mrr_regained_minor",
    "first_return",
    "last_return",
)


@routes.get(
    "/owners",
    response_model=OwnersReport,
    response_model_by_alias=True,
    responses={
        **RESPONSES,
        200: {
            "description": "JSON, or with format=csv a CSV file with a header row: "
            + ",".join(OWNER_COLUMNS),
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
    },
    summary="Credited win-backs per CRM owner, for a commission system (JSON or CSV)",
    operation_id="getOwnersReport",
    dependencies=[require_scope("read")],
    description=(
        "Returns credited to a sent step (last touch within the attribution window) per CRM "
        "owner on that step and currency: win-backs, distinct customers, MRR regained (minor "
        "units), first and last return. `from`/`to` select return dates (a commission "
        "period). `format=csv`: text/csv with a header row."
    ),
)
async def owners(
    engine: Engine,
    start: ReturnFrom = None,
    to: ReturnTo = None,
    playbook: PlaybookFilter = None,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Any:
    filters = _filters(start, to, playbook)
    found = await snapshot(engine, lambda conn: owners_report(conn, filters))
    if format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(OWNER_COLUMNS)
        for o in found:
            row = o.model_dump(mode="json")
            writer.writerow(["" if row[c] is None else row[c] for c in OWNER_COLUMNS])
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="winback-owners.csv"'},
        )
    return OwnersReport(
        filters=FiltersOut.model_validate({"from": start, "to": to, "playbook": playbook}),
        owners=found,
    )
