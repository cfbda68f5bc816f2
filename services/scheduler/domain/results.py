"""What the win-back programme achieved: reactivation rates, measured lift over the holdout,
re-churn of returned customers and message engagement — plain counts in, plain results out.

The database adapter (``services/scheduler/queries/reports.py``) does the counting; this module
only turns counts into rates, intervals and tests, so every number is checkable by hand.

Statistical choices
-------------------
* A rate's interval is the **Wilson score interval**: unlike the Wald interval it stays inside
  [0, 1], is not degenerate at 0 or n successes, and keeps close to its nominal coverage for
  the small arms (and small holdouts) win-back programmes have.
* The lift (contacted rate - holdout rate) has **Newcombe's hybrid score interval** (method 10
  of Newcombe, *Statistics in Medicine* 1998; 17:873-890), built from the two Wilson
  intervals; it has good coverage where the Wald difference interval is too narrow (rates near
  0, small arms).
* Its p-value is the two-sided **pooled two-proportion z-test** (``math.erfc``): the
  conventional test of "no difference", which with a 1:1 split agrees with the sign of the
  Newcombe interval in all but borderline cases.
* Incremental returns are the lift times the contacted arm's size, with the lift's interval
  scaled the same way: the returns the messages caused beyond what the holdout says would
  have happened anyway.
* Re-onboarding (a case opened on a return, with its own random holdout) is measured by
  re-churn, a rate where lower is better: the **re-churns prevented** are the holdout's
  re-churn rate minus the contacted arm's (positive: re-onboarding helped), with Newcombe's
  interval of that difference and the same z-test, times the contacted arm's matured cases.
* The comparison is intent to treat: every case the programme targeted counts in its arm,
  whatever happened later (superseded, unsubscribed, erased), because holdout membership is
  random and what happens after it is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Literal

from babel.numbers import get_currency_precision

Z95 = 1.959963984540054
"""The standard normal's 97.5th percentile: two-sided 95% intervals."""

RECHURN_HORIZONS: tuple[int, ...] = (90, 180, 365)
"""Days after a return within which a new churn counts as a re-churn."""

REONBOARDING_HORIZONS: tuple[int, ...] = (90, 180)
"""The re-churn horizons re-onboarding is judged at."""


@dataclass(frozen=True, slots=True)
class Interval:
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"interval low {self.low} above high {self.high}")

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def scaled(self, factor: float) -> Interval:
        """The interval times a non-negative ``factor``."""
        return Interval(self.low * factor, self.high * factor)


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")


def rate(successes: int, trials: int) -> float | None:
    """``successes / trials``; ``None`` when there were no trials."""
    _check_counts(successes, trials)
    return successes / trials if trials else None


def wilson(successes: int, trials: int, z: float = Z95) -> Interval | None:
    """The Wilson score interval for ``successes / trials``; ``None`` for no trials."""
    _check_counts(successes, trials)
    if trials == 0:
        return None
    n, p, z2 = trials, successes / trials, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the exact ends at 0 and n successes; elsewhere clamp float noise into [0, 1]
    low = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes == trials else max(p, min(1.0, centre + half))
    return Interval(low, high)


def newcombe(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, z: float = Z95
) -> Interval | None:
    """Newcombe's hybrid score interval for the difference of rates a - b; ``None`` when an
    arm had no trials."""
    wa, wb = wilson(successes_a, trials_a, z), wilson(successes_b, trials_b, z)
    if wa is None or wb is None:
        return None
    pa, pb = successes_a / trials_a, successes_b / trials_b
    diff = pa - pb
    below = math.sqrt((pa - wa.low) ** 2 + (wb.high - pb) ** 2)
    above = math.sqrt((wa.high - pa) ** 2 + (pb - wb.low) ** 2)
    return Interval(max(-1.0, min(diff, diff - below)), min(1.0, max(diff, diff + above)))


def two_proportion_p_value(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int
) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test of "the rates are equal";
    ``None`` when an arm had no trials. With no variation at all (every trial a success, or
    none) there is no evidence of a difference: 1.0."""
    _check_counts(successes_a, trials_a)
    _check_counts(successes_b, trials_b)
    if trials_a == 0 or trials_b == 0:
        return None
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    if se == 0:
        return 1.0
    z = (successes_a / trials_a - successes_b / trials_b) / se
    return min(1.0, math.erfc(abs(z) / math.sqrt(2)))


# -- reactivation and lift ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Revenue:
    """The MRR returned customers came back with, in one currency (``None``: not known)."""

    currency: str | None
    returns: int
    mrr_regained_minor: int


@dataclass(frozen=True, slots=True)
class RechurnCounts:
    """Returned customers old enough to judge at ``days`` (returned at least that many days
    before the report's ``as_of``) and how many of them churned again within ``days``."""

    days: int
    matured: int
    rechurned: int

    def __post_init__(self) -> None:
        _check_counts(self.rechurned, self.matured)


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """One arm (contacted or holdout) of a group, as the database counted it.

    ``returned`` cases came back; ``credited`` of them were credited to a sent step;
    ``days_to_return_median`` / ``_p90`` are over the arm's returns (``None`` without any).
    """

    targeted: int
    returned: int
    credited: int = 0
    days_to_return_median: float | None = None
    days_to_return_p90: float | None = None
    revenue: Sequence[Revenue] = ()
    rechurn: Sequence[RechurnCounts] = ()

    def __post_init__(self) -> None:
        _check_counts(self.returned, self.targeted)
        if not 0 <= self.credited <= self.returned:
            raise ValueError(f"credited {self.credited} not within 0..{self.returned}")


@dataclass(frozen=True, slots=True)
class RechurnResult:
    days: int
    matured: int
    rechurned: int
    rate: float | None
    rate_ci: Interval | None


@dataclass(frozen=True, slots=True)
class ArmResult:
    targeted: int
    returned: int
    rate: float | None
    rate_ci: Interval | None
    credited: int
    days_to_return_median: float | None
    days_to_return_p90: float | None
    revenue: tuple[Revenue, ...]
    rechurn: tuple[RechurnResult, ...]


@dataclass(frozen=True, slots=True)
class Lift:
    """Contacted rate - holdout rate, and what it means in customers. Every field is
    ``None`` when an arm is empty (a playbook without a holdout measures no lift)."""

    absolute: float | None = None
    ci: Interval | None = None
    p_value: float | None = None
    relative: float | None = None
    incremental_returns: float | None = None
    incremental_returns_ci: Interval | None = None


@dataclass(frozen=True, slots=True)
class GroupResult:
    contacted: ArmResult
    holdout: ArmResult
    lift: Lift = field(default_factory=Lift)


def rechurn_result(counts: RechurnCounts, z: float = Z95) -> RechurnResult:
    return RechurnResult(
        days=counts.days,
        matured=counts.matured,
        rechurned=counts.rechurned,
        rate=rate(counts.rechurned, counts.matured),
        rate_ci=wilson(counts.rechurned, counts.matured, z),
    )


def arm_result(counts: ArmCounts, z: float = Z95) -> ArmResult:
    return ArmResult(
        targeted=counts.targeted,
        returned=counts.returned,
        rate=rate(counts.returned, counts.targeted),
        rate_ci=wilson(counts.returned, counts.targeted, z),
        credited=counts.credited,
        days_to_return_median=counts.days_to_return_median,
        days_to_return_p90=counts.days_to_return_p90,
        revenue=tuple(sorted(counts.revenue, key=lambda r: (r.currency is None, r.currency or ""))),
        rechurn=tuple(rechurn_result(c, z) for c in sorted(counts.rechurn, key=lambda c: c.days)),
    )


def lift(contacted: ArmCounts, holdout: ArmCounts, z: float = Z95) -> Lift:
    """The measured lift of contacting over the holdout, with its interval and p-value."""
    if contacted.targeted == 0 or holdout.targeted == 0:
        return Lift()
    pc = contacted.returned / contacted.targeted
    ph = holdout.returned / holdout.targeted
    absolute = pc - ph
    ci = newcombe(contacted.returned, contacted.targeted, holdout.returned, holdout.targeted, z)
    assert ci is not None
    return Lift(
        absolute=absolute,
        ci=ci,
        p_value=two_proportion_p_value(
            contacted.returned, contacted.targeted, holdout.returned, holdout.targeted
        ),
        relative=absolute / ph if ph > 0 else None,
        incremental_returns=absolute * contacted.targeted,
        incremental_returns_ci=ci.scaled(contacted.targeted),
    )


def group_result(contacted: ArmCounts, holdout: ArmCounts, z: float = Z95) -> GroupResult:
    return GroupResult(
        contacted=arm_result(contacted, z),
        holdout=arm_result(holdout, z),
        lift=lift(contacted, holdout, z),
    )


@dataclass(frozen=True, slots=True)
class RechurnPrevented:
    """Holdout re-churn rate - contacted re-churn rate at ``days``: the re-churns that
    contacting prevented per contacted case (positive: fewer re-churns when contacted), and
    ``prevented`` = that difference times the contacted arm's matured cases. Every field but
    ``days`` is ``None`` when an arm has no matured case."""

    days: int
    difference: float | None = None
    ci: Interval | None = None
    p_value: float | None = None
    prevented: float | None = None
    prevented_ci: Interval | None = None


def rechurn_prevented(
    contacted: RechurnCounts, holdout: RechurnCounts, z: float = Z95
) -> RechurnPrevented:
    """Re-churns prevented by contacting (holdout rate - contacted rate) at one horizon, with
    Newcombe's interval of the difference and the pooled z-test's p-value."""
    if contacted.days != holdout.days:
        raise ValueError(f"horizons differ: {contacted.days} and {holdout.days} days")
    if contacted.matured == 0 or holdout.matured == 0:
        return RechurnPrevented(contacted.days)
    difference = holdout.rechurned / holdout.matured - contacted.rechurned / contacted.matured
    ci = newcombe(holdout.rechurned, holdout.matured, contacted.rechurned, contacted.matured, z)
    assert ci is not None
    return RechurnPrevented(
        days=contacted.days,
        difference=difference,
        ci=ci,
        p_value=two_proportion_p_value(
            holdout.rechurned, holdout.matured, contacted.rechurned, contacted.matured
        ),
        prevented=difference * contacted.matured,
        prevented_ci=ci.scaled(contacted.matured),
    )


def maturity_cutoff(as_of: datetime, days: int) -> datetime:
    """The latest return that has had ``days`` days to re-churn by ``as_of``: only returns at
    or before it count in the ``days``-day re-churn denominator."""
    if as_of.utcoffset() is None:
        raise ValueError("as_of must be timezone-aware")
    return as_of - timedelta(days=days)


# -- message engagement ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EngagementCounts:
    """Messages of one (step, template, variant, channel), counted by what was reported.

    ``dispatched`` handed to the dispatcher; ``sent`` accepted by a provider; ``delivered``
    with a delivery report — or an open or click, which prove delivery — so ``opened`` and
    ``clicked`` never exceed it.
    """

    dispatched: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    bounced: int = 0
    complained: int = 0
    unsubscribed: int = 0
    failed: int = 0
    suppressed: int = 0
    awaiting_outcome: int = 0
    reconciled: int = 0
    unconfirmed: int = 0

    def __post_init__(self) -> None:
        for count in fields(self):
            if getattr(self, count.name) < 0:
                raise ValueError(f"{count.name} must not be negative")
        if self.opened > self.delivered or self.clicked > self.delivered:
            raise ValueError("opened and clicked count delivered messages only")
        if self.delivered > self.sent or self.bounced > self.sent:
            raise ValueError("delivered and bounced count sent messages only")


RateBase = Literal["delivered", "sent"]


@dataclass(frozen=True, slots=True)
class EngagementResult:
    counts: EngagementCounts
    rate_base: RateBase
    """Open and click rates are over delivered messages when delivery is reported, else sent."""
    open_rate: float | None
    open_rate_ci: Interval | None
    click_rate: float | None
    click_rate_ci: Interval | None
    bounce_rate: float | None
    complaint_rate: float | None
    unsubscribe_rate: float | None


def _share(part: int, whole: int) -> float | None:
    return min(1.0, part / whole) if whole else None


def engagement(counts: EngagementCounts, z: float = Z95) -> EngagementResult:
    """Open and click rates over delivered-or-sent messages (delivered when the provider
    reports deliveries, else sent), and bounce, complaint and unsubscribe rates over sent."""
    base: RateBase = "delivered" if counts.delivered > 0 else "sent"
    denominator = counts.delivered if base == "delivered" else counts.sent
    return EngagementResult(
        counts=counts,
        rate_base=base,
        open_rate=rate(counts.opened, denominator) if denominator else None,
        open_rate_ci=wilson(counts.opened, denominator, z) if denominator else None,
        click_rate=rate(counts.clicked, denominator) if denominator else None,
        click_rate_ci=wilson(counts.clicked, denominator, z) if denominator else None,
        bounce_rate=_share(counts.bounced, counts.sent),
        complaint_rate=_share(counts.complained, counts.sent),
        unsubscribe_rate=_share(counts.unsubscribed, counts.sent),
    )


# -- intent to treat ------------------------------------------------------------------------
LiftDefinition = Literal["intent_to_treat"]
INTENT_TO_TREAT: LiftDefinition = "intent_to_treat"
"""The lift compares the arms by assignment: every case counts in the arm it was randomised to
and its return counts whatever happened to the case after assignment (unsubscribed, capped,
superseded, closed at its horizon), as long as it came within the attribution horizon."""


def itt_estimate(
    contacted_returned: int, contacted: int, holdout_returned: int, holdout: int
) -> float | None:
    """The intent-to-treat effect: returned ÷ assigned in the contacted arm minus the same in
    the holdout; ``None`` when an arm is empty."""
    pc, ph = rate(contacted_returned, contacted), rate(holdout_returned, holdout)
    return None if pc is None or ph is None else pc - ph


# -- cost and return on investment ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OfferCost:
    """What one redeemed offer costs: ``mrr_months`` months of the MRR the customer came back
    with (50% off for 3 months: 1.5; a free month: 1) plus ``fixed_minor`` (in the report
    currency's minor units: a specialist's time)."""

    mrr_months: float = 0.0
    fixed_minor: float = 0.0


@dataclass(frozen=True, slots=True)
class CostModel:
    """The prices the report charges: per message by channel (``"email"``) or by channel and
    provider (``"email/sendgrid"``, which wins), per redeemed offer, all in ``currency``'s minor
    units; ``exchange_rates`` converts other currencies (one unit of it in ``currency``)."""

    currency: str
    message_cost_minor: Mapping[str, float] = field(default_factory=dict)
    offer_cost: Mapping[str, OfferCost] = field(default_factory=dict)
    exchange_rates: Mapping[str, float] = field(default_factory=dict)

    def message(self, channel: str, provider: str | None) -> float:
        """The cost of one message sent on ``channel`` through ``provider``."""
        if provider is not None and f"{channel}/{provider}" in self.message_cost_minor:
            return self.message_cost_minor[f"{channel}/{provider}"]
        return self.message_cost_minor.get(channel, 0.0)

    def convert(self, minor: float, currency: str | None) -> float | None:
        """``minor`` units of ``currency`` in the report currency's minor units; ``None`` when
        there is no rate (or no currency)."""
        if currency is None:
            return None
        if currency == self.currency:
            return float(minor)
        rate_ = self.exchange_rates.get(currency)
        if rate_ is None:
            return None
        major = minor / 10.0 ** _precision(currency)
        return float(major * rate_ * 10.0 ** _precision(self.currency))


def _precision(currency: str) -> int:
    return int(get_currency_precision(currency))


@dataclass(frozen=True, slots=True)
class MessagesSent:
    channel: str
    provider: str | None
    sent: int


@dataclass(frozen=True, slots=True)
class OffersRedeemed:
    """Credited returns whose credited step carried ``offer``, in one currency."""

    offer: str
    currency: str | None
    redeemed: int
    mrr_regained_minor: int


@dataclass(frozen=True, slots=True)
class ReturnValue:
    """Returns in one currency: how many, the MRR they came back with, and the revenue they
    brought within the chosen horizon (MRR times the months they stayed, up to it)."""

    currency: str | None
    returns: int
    mrr_regained_minor: int
    recovered_revenue_minor: float


@dataclass(frozen=True, slots=True)
class ArmMoneyCounts:
    targeted: int
    returned: int
    messages: Sequence[MessagesSent] = ()
    offers: Sequence[OffersRedeemed] = ()
    values: Sequence[ReturnValue] = ()


@dataclass(frozen=True, slots=True)
class ArmMoney:
    """One arm's money in the report currency's minor units."""

    messages_sent: int
    message_cost: float
    offers_redeemed: int
    offer_cost: float
    cost: float
    mrr_regained: float
    recovered_revenue: float
    unconverted_returns: int
    """Returns in a currency without an exchange rate (or none): left out of the money."""


@dataclass(frozen=True, slots=True)
class MoneyView:
    """Cost per reactivation and ROI, raw (the contacted arm alone) or incremental (beyond
    what the holdout says would have happened anyway)."""

    reactivations: float | None
    mrr_regained: float | None
    recovered_revenue: float | None
    cost: float | None
    cost_per_reactivation: float | None
    roi: float | None


@dataclass(frozen=True, slots=True)
class Economics:
    currency: str
    revenue_months: int
    contacted: ArmMoney
    holdout: ArmMoney
    raw: MoneyView
    incremental: MoneyView


def arm_money(counts: ArmMoneyCounts, model: CostModel) -> ArmMoney:
    message_cost = sum(model.message(m.channel, m.provider) * m.sent for m in counts.messages)
    offer_cost = 0.0
    for o in counts.offers:
        price = model.offer_cost.get(o.offer, OfferCost())
        regained = model.convert(o.mrr_regained_minor, o.currency) or 0.0
        offer_cost += price.mrr_months * regained + price.fixed_minor * o.redeemed
    mrr = revenue = 0.0
    unconverted = 0
    for v in counts.values:
        converted_mrr = model.convert(v.mrr_regained_minor, v.currency)
        converted_revenue = model.convert(v.recovered_revenue_minor, v.currency)
        if converted_mrr is None or converted_revenue is None:
            unconverted += v.returns
            continue
        mrr += converted_mrr
        revenue += converted_revenue
    return ArmMoney(
        messages_sent=sum(m.sent for m in counts.messages),
        message_cost=message_cost,
        offers_redeemed=sum(o.redeemed for o in counts.offers),
        offer_cost=offer_cost,
        cost=message_cost + offer_cost,
        mrr_regained=mrr,
        recovered_revenue=revenue,
        unconverted_returns=unconverted,
    )


def _ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or whole is None or whole <= 0:
        return None
    return part / whole


def _roi(revenue: float | None, cost: float | None) -> float | None:
    if revenue is None or cost is None or cost <= 0:
        return None
    return (revenue - cost) / cost


def economics(
    contacted: ArmMoneyCounts, holdout: ArmMoneyCounts, model: CostModel, revenue_months: int
) -> Economics:
    """Campaign cost, cost per reactivation, MRR regained, recovered revenue and ROI.

    Raw: the contacted arm's figures; cost per reactivation = cost ÷ returned; ROI =
    (recovered revenue - cost) ÷ cost. Incremental: each figure per targeted case in the
    contacted arm minus the same in the holdout, times the contacted arm's targeted (the
    intent-to-treat difference scaled to the arm), so cost per incremental reactivation =
    incremental cost ÷ incremental reactivations (``None`` unless both are positive) and ROI
    = (incremental revenue - incremental cost) ÷ incremental cost. ``None`` without a holdout.
    """
    c, h = arm_money(contacted, model), arm_money(holdout, model)
    raw = MoneyView(
        reactivations=float(contacted.returned),
        mrr_regained=c.mrr_regained,
        recovered_revenue=c.recovered_revenue,
        cost=c.cost,
        cost_per_reactivation=_ratio(c.cost, contacted.returned),
        roi=_roi(c.recovered_revenue, c.cost),
    )
    if contacted.targeted == 0 or holdout.targeted == 0:
        incremental = MoneyView(None, None, None, None, None, None)
    else:
        n = contacted.targeted

        def beyond(a: float, b: float) -> float:
            return (a / contacted.targeted - b / holdout.targeted) * n

        reactivations = beyond(contacted.returned, holdout.returned)
        cost = beyond(c.cost, h.cost)
        revenue = beyond(c.recovered_revenue, h.recovered_revenue)
        incremental = MoneyView(
            reactivations=reactivations,
            mrr_regained=beyond(c.mrr_regained, h.mrr_regained),
            recovered_revenue=revenue,
            cost=cost,
            cost_per_reactivation=_ratio(cost, reactivations) if cost > 0 else None,
            roi=_roi(revenue, cost),
        )
    return Economics(model.currency, revenue_months, c, h, raw, incremental)


# -- cohorts of returned customers ----------------------------------------------------------
COHORT_HORIZONS: tuple[int, ...] = (30, 90, 180, 365)
"""Days after a return at which a cohort's customers are checked: still active?"""


@dataclass(frozen=True, slots=True)
class StillActiveCounts:
    """Returns of a cohort old enough to judge at ``days`` and how many had not churned again
    within ``days``."""

    days: int
    matured: int
    active: int

    def __post_init__(self) -> None:
        _check_counts(self.active, self.matured)


@dataclass(frozen=True, slots=True)
class StillActive:
    days: int
    matured: int
    active: int
    rate: float | None
    rate_ci: Interval | None


def still_active(counts: StillActiveCounts, z: float = Z95) -> StillActive:
    """Still active ÷ matured returns at ``days``, with its Wilson interval; ``None`` when no
    return of the cohort is old enough yet."""
    return StillActive(
        days=counts.days,
        matured=counts.matured,
        active=counts.active,
        rate=rate(counts.active, counts.matured),
        rate_ci=wilson(counts.active, counts.matured, z),
    )
