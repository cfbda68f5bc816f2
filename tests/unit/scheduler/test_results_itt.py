"""The intent-to-treat lift is unbiased where unsubscribes are common, and what counting only
returns while a case is open would report instead; cost and ROI arithmetic, raw and
incremental; still-active cohorts. Simulated populations with deterministic seeds."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.results import (
    INTENT_TO_TREAT,
    ArmCounts,
    ArmMoneyCounts,
    CostModel,
    MessagesSent,
    OfferCost,
    OffersRedeemed,
    ReturnValue,
    StillActiveCounts,
    economics,
    itt_estimate,
    lift,
    still_active,
)


@dataclass(frozen=True)
class Draw:
    """One simulated programme: per arm, assigned cases and returns counted two ways."""

    contacted: int
    holdout: int
    contacted_returned: int  # every return within the horizon (intent to treat)
    holdout_returned: int
    contacted_returned_while_open: int  # only returns before the case closed (the old count)


def simulate(
    rng: random.Random, n: int, holdout_share: float, base: float, effect: float, unsub: float
) -> Draw:
    """``n`` churned customers, each randomised to the holdout with ``holdout_share``. A
    holdout customer returns within the horizon with ``base``, a contacted one with ``base +
    effect``; a contacted customer unsubscribes (closing the case) with ``unsub``, at a time
    uniform over the horizon, and the return (uniform over the horizon too) may come after."""
    c = h = cr = hr = open_cr = 0
    for _ in range(n):
        if rng.random() < holdout_share:
            h += 1
            hr += rng.random() < base
            continue
        c += 1
        returns = rng.random() < base + effect
        cr += returns
        unsubscribed_at = rng.random() if rng.random() < unsub else 2.0
        if returns and rng.random() < unsubscribed_at:
            open_cr += 1
    return Draw(c, h, cr, hr, open_cr)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    base=st.sampled_from([0.10, 0.20]),
    effect=st.sampled_from([0.0, 0.03, 0.08]),
    unsub=st.sampled_from([0.5, 0.8]),
    holdout_share=st.sampled_from([0.2, 0.5]),
)
def test_the_intent_to_treat_lift_is_unbiased_where_unsubscribes_are_common(
    seed: int, base: float, effect: float, unsub: float, holdout_share: float
) -> None:
    rng = random.Random(seed)
    draws = [simulate(rng, 1000, holdout_share, base, effect, unsub) for _ in range(80)]
    estimates, covered, while_open = [], 0, []
    for d in draws:
        measured = lift(
            ArmCounts(d.contacted, d.contacted_returned), ArmCounts(d.holdout, d.holdout_returned)
        )
        assert measured.absolute is not None
        assert measured.ci is not None
        assert measured.absolute == pytest.approx(
            itt_estimate(d.contacted_returned, d.contacted, d.holdout_returned, d.holdout)
        )
        estimates.append(measured.absolute)
        covered += measured.ci.contains(effect)
        while_open.append(
            d.contacted_returned_while_open / d.contacted - d.holdout_returned / d.holdout
        )
    mean = sum(estimates) / len(estimates)
    # the mean of 80 estimates has a standard error below 0.004 in every setting here
    assert abs(mean - effect) < 0.015
    assert covered / len(draws) >= 0.85  # the 95% interval covers the true effect
    # counting only returns while the case was open loses the unsubscribers' returns: the
    # measured lift is biased low, by about (base + effect) * unsub / 2: at least 0.025 here
    biased = sum(while_open) / len(while_open)
    assert effect - biased > 0.015


def test_the_definition_is_named() -> None:
    assert INTENT_TO_TREAT == "intent_to_treat"
    assert itt_estimate(0, 0, 1, 10) is None


MODEL = CostModel(
    currency="EUR",
    message_cost_minor={"email": 0.1, "email/sendgrid": 0.08, "sms": 5.0},
    offer_cost={"discount_50pct_3mo": OfferCost(mrr_months=1.5), "call": OfferCost(0, 2000)},
    exchange_rates={"USD": 0.9, "JPY": 0.0062},
)


def test_costs_per_channel_and_provider_and_currency_conversion() -> None:
    assert MODEL.message("email", "sendgrid") == 0.08
    assert MODEL.message("email", "postmark") == 0.1
    assert MODEL.message("crm", None) == 0.0
    assert MODEL.convert(1000, "EUR") == 1000
    assert MODEL.convert(1000, "USD") == pytest.approx(900)
    assert MODEL.convert(1000, "JPY") == pytest.approx(1000 * 0.0062 * 100)  # yen: no minor
    assert MODEL.convert(1000, "GBP") is None
    assert MODEL.convert(1000, None) is None


def test_economics_raw_and_incremental() -> None:
    contacted = ArmMoneyCounts(
        targeted=1000,
        returned=150,
        messages=[MessagesSent("email", "sendgrid", 3000), MessagesSent("sms", "twilio", 200)],
        offers=[OffersRedeemed("discount_50pct_3mo", "EUR", 20, 20 * 4900)],
        values=[
            ReturnValue("EUR", 140, 140 * 4900, 140 * 4900 * 6.0),
            ReturnValue("USD", 5, 5 * 1000, 5 * 1000 * 6.0),
            ReturnValue("GBP", 5, 5 * 1000, 5 * 1000 * 6.0),
        ],
    )
    holdout = ArmMoneyCounts(
        targeted=500, returned=50, values=[ReturnValue("EUR", 50, 50 * 4900, 50 * 4900 * 6.0)]
    )
    result = economics(contacted, holdout, MODEL, 12)
    c = result.contacted
    assert c.message_cost == pytest.approx(3000 * 0.08 + 200 * 5.0)
    assert c.offer_cost == pytest.approx(1.5 * 20 * 4900)
    assert c.cost == pytest.approx(c.message_cost + c.offer_cost)
    assert c.mrr_regained == pytest.approx(140 * 4900 + 5 * 900)
    assert c.unconverted_returns == 5
    assert result.holdout.cost == 0
    assert result.raw.cost_per_reactivation == pytest.approx(c.cost / 150)
    assert result.raw.roi == pytest.approx((c.recovered_revenue - c.cost) / c.cost)
    inc = result.incremental
    assert inc.reactivations == pytest.approx((0.15 - 0.10) * 1000)
    assert inc.cost == pytest.approx(c.cost)
    revenue = (c.recovered_revenue / 1000 - result.holdout.recovered_revenue / 500) * 1000
    assert inc.recovered_revenue == pytest.approx(revenue)
    assert inc.cost_per_reactivation == pytest.approx(c.cost / 50)
    assert inc.roi == pytest.approx((revenue - c.cost) / c.cost)
    # no holdout: no incremental figures
    alone = economics(contacted, ArmMoneyCounts(0, 0), MODEL, 12)
    assert alone.incremental.reactivations is None
    assert alone.incremental.roi is None
    # no lift: no cost per incremental reactivation
    flat = economics(contacted, ArmMoneyCounts(1000, 150), MODEL, 12)
    assert flat.incremental.reactivations == 0
    assert flat.incremental.cost_per_reactivation is None


def test_still_active_only_over_returns_old_enough() -> None:
    assert still_active(StillActiveCounts(90, 0, 0)).rate is None
    judged = still_active(StillActiveCounts(90, 40, 30))
    assert judged.rate == 0.75
    assert judged.rate_ci is not None
    assert judged.rate_ci.contains(0.75)
    with pytest.raises(ValueError, match="successes"):
        StillActiveCounts(30, 3, 4)
