"""The results core: rates, Wilson and Newcombe intervals, the z-test, lift, re-churn and
engagement, against published values and numbers worked out by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.scheduler.domain.results import (
    Z95,
    ArmCounts,
    EngagementCounts,
    Interval,
    RechurnCounts,
    RechurnPrevented,
    Revenue,
    arm_result,
    engagement,
    group_result,
    lift,
    maturity_cutoff,
    newcombe,
    rate,
    rechurn_prevented,
    rechurn_result,
    two_proportion_p_value,
    wilson,
)

# Published values (4 decimals):
# - Wilson score 81/263 -> 0.2553..0.3662 and 15/148 -> 0.0624..0.1605: Newcombe (1998),
#   "Two-sided confidence intervals for the single proportion", Stat Med 17:857-872, table I.
# - Wilson 13/16 -> 0.5699..0.9341 and Newcombe hybrid score 7/34 - 1/34 -> 0.0189..0.3404
#   (Perondi et al. 2004): R package contingencytables (ocbe-uio/contingencytables,
#   tests/testthat/test-ch2.R and test-ch4.R).
# - Newcombe hybrid score 56/70 - 48/80 -> 0.0524..0.3339: Newcombe (1998), "Interval
#   estimation for the difference between independent proportions", Stat Med 17:873-890,
#   method 10.
# - Pearson chi-squared 3/4 vs 1/4: T = 2.000, P = 0.15730 (contingencytables test-ch4.R,
#   the "tea" table); the pooled z-test's z^2 is that statistic.


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (13, 16, 0.5699, 0.9341),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_intervals(
    successes: int, trials: int, low: float, high: float
) -> None:
    ci = wilson(successes, trials)
    assert ci is not None
    assert round(ci.low, 4) == low
    assert round(ci.high, 4) == high


def test_wilson_by_hand_for_half() -> None:
    # 50/100, z = 1.96: centre 0.5, half = z/(1+z²/n) * sqrt(0.25/100 + z²/(4·100²))
    z = 1.96
    half = z / (1 + z * z / 100) * math.sqrt(0.0025 + z * z / 40_000)
    ci = wilson(50, 100, z)
    assert ci is not None
    assert ci.low == pytest.approx(0.5 - half)
    assert ci.high == pytest.approx(0.5 + half)
    assert round(ci.low, 4) == 0.4038
    assert round(ci.high, 4) == 0.5962


def test_wilson_ends_are_exact_at_none_and_all() -> None:
    none_of = wilson(0, 10)
    assert none_of is not None
    assert none_of.low == 0.0
    assert round(none_of.high, 4) == 0.2775
    all_of = wilson(10, 10)
    assert all_of is not None
    assert all_of.high == 1.0
    assert round(all_of.low, 4) == 0.7225


@pytest.mark.parametrize(
    ("a", "n_a", "b", "n_b", "low", "high"),
    [
        (7, 34, 1, 34, 0.0189, 0.3404),
        (56, 70, 48, 80, 0.0524, 0.3339),
        (0, 10, 0, 10, -0.2775, 0.2775),
        (5, 56, 0, 29, -0.0381, 0.1926),
    ],
)
def test_newcombe_matches_published_intervals(
    a: int, n_a: int, b: int, n_b: int, low: float, high: float
) -> None:
    ci = newcombe(a, n_a, b, n_b)
    assert ci is not None
    assert (round(ci.low, 4), round(ci.high, 4)) == (low, high)


def test_newcombe_is_built_from_the_two_wilson_intervals() -> None:
    ca, ch = wilson(150, 1000), wilson(100, 1000)
    assert ca is not None
    assert ch is not None
    ci = newcombe(150, 1000, 100, 1000)
    assert ci is not None
    assert ci.low == pytest.approx(0.05 - math.hypot(0.15 - ca.low, ch.high - 0.10))
    assert ci.high == pytest.approx(0.05 + math.hypot(ca.high - 0.15, 0.10 - ch.low))
    assert (round(ci.low, 4), round(ci.high, 4)) == (0.0210, 0.0790)


def test_z_test_by_hand() -> None:
    # 3/4 vs 1/4: pooled 0.5, se = sqrt(0.25 · (1/4 + 1/4)) = 0.35355, z = 1.41421, z² = 2
    assert two_proportion_p_value(3, 4, 1, 4) == pytest.approx(0.15730, abs=5e-6)
    # 150/1000 vs 100/1000: pooled 0.125, se = sqrt(0.125·0.875·0.002) = 0.0147902, z = 3.3806
    p = two_proportion_p_value(150, 1000, 100, 1000)
    assert p == pytest.approx(math.erfc(0.05 / math.sqrt(0.125 * 0.875 * 0.002) / math.sqrt(2)))
    assert p == pytest.approx(0.000723, abs=1e-6)


def test_z_test_without_variation_or_trials() -> None:
    assert two_proportion_p_value(0, 10, 0, 20) == 1.0
    assert two_proportion_p_value(5, 5, 7, 7) == 1.0
    assert two_proportion_p_value(0, 0, 1, 10) is None


def test_lift_of_a_thousand_each() -> None:
    result = lift(ArmCounts(1000, 150), ArmCounts(1000, 100))
    assert result.absolute == pytest.approx(0.05)
    assert result.relative == pytest.approx(0.5)
    assert result.incremental_returns == pytest.approx(50.0)
    assert result.ci is not None
    assert result.incremental_returns_ci is not None
    assert result.incremental_returns_ci.low == pytest.approx(result.ci.low * 1000)
    assert result.incremental_returns_ci.high == pytest.approx(result.ci.high * 1000)
    assert result.p_value is not None
    assert result.p_value < 0.01


def test_incremental_returns_scale_with_the_contacted_arm() -> None:
    # 90% contacted: 900 with 135 returned, 100 holdout with 10 returned: lift 0.05 → 45 more
    result = lift(ArmCounts(900, 135), ArmCounts(100, 10))
    assert result.incremental_returns == pytest.approx(45.0)
    assert result.p_value is not None
    assert result.p_value > 0.05  # a holdout of 100 cannot tell 15% from 10%
    assert result.ci is not None
    assert result.ci.contains(0.0)


def test_no_holdout_means_no_lift() -> None:
    result = group_result(ArmCounts(50, 5), ArmCounts(0, 0))
    assert result.lift.absolute is None
    assert result.lift.ci is None
    assert result.lift.p_value is None
    assert result.holdout.rate is None
    assert result.contacted.rate == pytest.approx(0.1)


def test_no_return_in_the_holdout_has_no_relative_lift() -> None:
    assert lift(ArmCounts(10, 2), ArmCounts(10, 0)).relative is None


def test_arm_result_orders_revenue_and_rechurn() -> None:
    arm = arm_result(
        ArmCounts(
            10,
            4,
            credited=3,
            days_to_return_median=12.5,
            days_to_return_p90=40.0,
            revenue=(Revenue(None, 1, 0), Revenue("USD", 1, 900), Revenue("EUR", 2, 9800)),
            rechurn=(RechurnCounts(365, 0, 0), RechurnCounts(90, 4, 1)),
        )
    )
    assert [r.currency for r in arm.revenue] == ["EUR", "USD", None]
    assert [r.days for r in arm.rechurn] == [90, 365]
    assert arm.rechurn[0].rate == pytest.approx(0.25)
    assert arm.rechurn[1].rate is None
    assert arm.rechurn[1].rate_ci is None
    assert (arm.credited, arm.days_to_return_median, arm.days_to_return_p90) == (3, 12.5, 40.0)


def test_rechurn_rate_and_interval() -> None:
    result = rechurn_result(RechurnCounts(180, matured=16, rechurned=13))
    assert result.rate == pytest.approx(13 / 16)
    assert result.rate_ci is not None
    assert (round(result.rate_ci.low, 4), round(result.rate_ci.high, 4)) == (0.5699, 0.9341)


def test_rechurns_prevented_by_hand() -> None:
    # holdout 20/100 re-churned, contacted 10/100: 0.10 re-churns prevented per case
    result = rechurn_prevented(RechurnCounts(90, 100, 10), RechurnCounts(90, 100, 20))
    assert result.days == 90
    assert result.difference == pytest.approx(0.10)
    # Wilson 20/100 = 0.133367..0.288829, 10/100 = 0.055229..0.174366 (worked by hand);
    # hybrid score: 0.10 -/+ the root of the summed squared distances to the Wilson ends
    low = 0.10 - math.sqrt((0.20 - 0.133367) ** 2 + (0.174366 - 0.10) ** 2)
    high = 0.10 + math.sqrt((0.288829 - 0.20) ** 2 + (0.10 - 0.055229) ** 2)
    assert result.ci is not None
    assert result.ci.low == pytest.approx(low, abs=1e-5)
    assert result.ci.high == pytest.approx(high, abs=1e-5)
    assert (round(result.ci.low, 4), round(result.ci.high, 4)) == (0.0001, 0.1995)
    # pooled 30/200 = 0.15; se = sqrt(0.15 * 0.85 * 2/100) = 0.050498; z = 1.98030
    assert result.p_value == pytest.approx(math.erfc(1.98030 / math.sqrt(2)), abs=1e-5)
    assert round(result.p_value or 0, 4) == 0.0477
    # 0.10 per case times the 100 contacted matured cases
    assert result.prevented == pytest.approx(10.0)
    assert result.prevented_ci == Interval(result.ci.low * 100, result.ci.high * 100)


def test_more_rechurn_when_contacted_is_a_negative_difference() -> None:
    # contacted 3/20, holdout 3/40: contacting "caused" 0.075 re-churns per case
    result = rechurn_prevented(RechurnCounts(180, 20, 3), RechurnCounts(180, 40, 3))
    assert result.difference == pytest.approx(3 / 40 - 3 / 20)
    assert result.prevented == pytest.approx(-0.075 * 20)
    assert result.ci is not None
    assert result.ci.low < -0.075 < result.ci.high
    assert result.ci.low < 0 < result.ci.high
    assert result.ci == newcombe(3, 40, 3, 20)
    assert result.p_value == two_proportion_p_value(3, 40, 3, 20)


def test_no_matured_case_in_an_arm_prevents_nothing_measurable() -> None:
    assert rechurn_prevented(RechurnCounts(90, 0, 0), RechurnCounts(90, 5, 1)) == (
        RechurnPrevented(90)
    )
    assert rechurn_prevented(RechurnCounts(90, 5, 1), RechurnCounts(90, 0, 0)).difference is None
    with pytest.raises(ValueError, match="horizons differ"):
        rechurn_prevented(RechurnCounts(90, 5, 1), RechurnCounts(180, 5, 1))


def test_maturity_cutoff() -> None:
    as_of = datetime(2026, 12, 31, 12, tzinfo=UTC)
    assert maturity_cutoff(as_of, 90) == datetime(2026, 10, 2, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        maturity_cutoff(datetime(2026, 1, 1), 90)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: ArmCounts(10, 11),
        lambda: ArmCounts(10, 5, credited=6),
        lambda: ArmCounts(-1, 0),
        lambda: RechurnCounts(90, 3, 4),
        lambda: EngagementCounts(sent=10, delivered=5, opened=6),
        lambda: EngagementCounts(sent=4, delivered=5),
        lambda: EngagementCounts(sent=-1),
        lambda: Interval(0.5, 0.4),
    ],
)
def test_impossible_counts_are_refused(bad: object) -> None:
    assert callable(bad)
    with pytest.raises(ValueError, match=r"."):
        bad()


def test_engagement_over_delivered() -> None:
    result = engagement(
        EngagementCounts(
            dispatched=105,
            sent=100,
            delivered=80,
            opened=40,
            clicked=10,
            bounced=20,
            complained=1,
            unsubscribed=2,
            failed=3,
            suppressed=2,
        )
    )
    assert result.rate_base == "delivered"
    assert result.open_rate == pytest.approx(0.5)
    assert result.click_rate == pytest.approx(0.125)
    assert result.bounce_rate == pytest.approx(0.2)
    assert result.complaint_rate == pytest.approx(0.01)
    assert result.unsubscribe_rate == pytest.approx(0.02)
    assert result.open_rate_ci == wilson(40, 80)


def test_engagement_over_sent_when_no_delivery_is_reported() -> None:
    result = engagement(EngagementCounts(dispatched=10, sent=8))
    assert result.rate_base == "sent"
    assert result.open_rate == 0.0
    assert result.click_rate == 0.0
    nothing = engagement(EngagementCounts(dispatched=3, failed=3))
    assert nothing.open_rate is None
    assert nothing.bounce_rate is None


def test_rate_of_nothing() -> None:
    assert rate(0, 0) is None
    assert wilson(0, 0) is None
    assert newcombe(1, 2, 0, 0) is None


# -- invariants -------------------------------------------------------------------------------
@st.composite
def proportions(draw: st.DrawFn, max_trials: int = 5000) -> tuple[int, int]:
    trials = draw(st.integers(1, max_trials))
    return draw(st.integers(0, trials)), trials


@settings(max_examples=400, deadline=None)
@given(proportions(), st.sampled_from([1.0, 1.6448536269514722, Z95, 2.5758293035489004]))
def test_wilson_is_inside_zero_one_and_contains_the_rate(p: tuple[int, int], z: float) -> None:
    ci = wilson(*p, z)
    assert ci is not None
    estimate = p[0] / p[1]
    assert 0.0 <= ci.low <= estimate <= ci.high <= 1.0


@settings(max_examples=200, deadline=None)
@given(proportions(max_trials=400))
def test_a_wider_confidence_gives_a_wider_interval(p: tuple[int, int]) -> None:
    narrow, wide = wilson(*p, 1.6448536269514722), wilson(*p, 2.5758293035489004)
    assert narrow is not None
    assert wide is not None
    assert wide.low <= narrow.low + 1e-12
    assert narrow.high <= wide.high + 1e-12


@settings(max_examples=400, deadline=None)
@given(proportions(), proportions())
def test_lift_interval_contains_the_lift_and_swaps_sign(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    result = lift(ArmCounts(a[1], a[0]), ArmCounts(b[1], b[0]))
    assert result.absolute is not None
    assert result.ci is not None
    assert result.p_value is not None
    assert -1.0 <= result.ci.low <= result.absolute <= result.ci.high <= 1.0
    assert 0.0 <= result.p_value <= 1.0
    swapped = newcombe(b[0], b[1], a[0], a[1])
    assert swapped is not None
    assert swapped.low == pytest.approx(-result.ci.high, abs=1e-12)
    assert swapped.high == pytest.approx(-result.ci.low, abs=1e-12)
    assert two_proportion_p_value(b[0], b[1], a[0], a[1]) == pytest.approx(result.p_value)
    contacted = arm_result(ArmCounts(a[1], a[0]))
    assert contacted.rate is not None
    assert 0.0 <= contacted.rate <= 1.0


@settings(max_examples=300, deadline=None)
@given(proportions(max_trials=2000), st.integers(1, 5))
def test_equal_rates_have_no_lift_an_interval_around_zero_and_p_one(
    p: tuple[int, int], k: int
) -> None:
    successes, trials = p
    result = lift(ArmCounts(trials * k, successes * k), ArmCounts(trials, successes))
    assert result.absolute == 0.0
    assert result.ci is not None
    assert result.ci.contains(0.0)
    assert result.p_value == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(proportions(), proportions())
def test_an_interval_excluding_zero_has_the_sign_of_the_lift(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    result = lift(ArmCounts(a[1], a[0]), ArmCounts(b[1], b[0]))
    assert result.ci is not None
    assert result.absolute is not None
    assume(not result.ci.contains(0.0))
    assert (result.ci.low > 0) == (result.absolute > 0)
    # an interval clear of zero goes with a small p-value (the two can disagree only
    # near the 5% boundary)
    assert result.p_value is not None
    assert result.p_value < 0.1


@st.composite
def engagements(draw: st.DrawFn) -> EngagementCounts:
    sent = draw(st.integers(0, 10_000))
    delivered = draw(st.integers(0, sent))
    return EngagementCounts(
        dispatched=sent + draw(st.integers(0, 100)),
        sent=sent,
        delivered=delivered,
        opened=draw(st.integers(0, delivered)),
        clicked=draw(st.integers(0, delivered)),
        bounced=draw(st.integers(0, sent)),
        complained=draw(st.integers(0, sent)),
        unsubscribed=draw(st.integers(0, sent)),
    )


@settings(max_examples=300, deadline=None)
@given(engagements())
def test_engagement_rates_are_in_zero_one(counts: EngagementCounts) -> None:
    result = engagement(counts)
    for value in (
        result.open_rate,
        result.click_rate,
        result.bounce_rate,
        result.complaint_rate,
        result.unsubscribe_rate,
    ):
        assert value is None or 0.0 <= value <= 1.0
    for value, ci in (
        (result.open_rate, result.open_rate_ci),
        (result.click_rate, result.click_rate_ci),
    ):
        assert (value is None) == (ci is None)
        if value is not None and ci is not None:
            assert ci.contains(value)


def test_scaled_interval() -> None:
    scaled = Interval(-0.01, 0.03).scaled(100)
    assert scaled.low == pytest.approx(-1.0)
    assert scaled.high == pytest.approx(3.0)
