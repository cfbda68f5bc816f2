"""When winback counts a customer as a passive user (pure): the inactivity period per plan, an
external ``user.inactive`` judged by its usage drop or days, and what a due timer means."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.domain.segmentation import (
    NOT_PASSIVE_STATUSES,
    InactivityRule,
    passive_verdict,
)
from services.scheduler.inactivity import inactivity_rule, passive_episode_id
from shared.settings import SchedulerSettings

T0 = datetime(2026, 3, 2, 8, tzinfo=UTC)
RULE = InactivityRule(
    period=timedelta(days=30), by_plan={"enterprise": timedelta(days=14)}, usage_drop_percent=60
)


def test_the_period_is_the_plans_own_or_the_default() -> None:
    assert RULE.due_at(T0, "enterprise") == T0 + timedelta(days=14)
    assert RULE.due_at(T0, "pro") == T0 + timedelta(days=30)
    assert RULE.due_at(T0, None) == T0 + timedelta(days=30)


def test_the_settings_make_the_rule() -> None:
    rule = inactivity_rule(
        SchedulerSettings(
            inactivity_days=45, inactivity_days_by_plan={"team": 10}, usage_drop_percent=70
        )
    )
    assert rule == InactivityRule(timedelta(days=45), {"team": timedelta(days=10)}, 70)
    assert inactivity_rule(SchedulerSettings()).period == timedelta(days=30)


@pytest.mark.parametrize("bad", [{"inactivity_days": 0}, {"usage_drop_percent": 101}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SchedulerSettings(**bad)


@pytest.mark.parametrize(
    ("days", "drop", "plan", "opens"),
    [
        (None, None, None, True),  # the detector's own judgement
        (None, 60.0, None, True),
        (None, 59.9, None, False),
        (30, None, "pro", True),
        (29, None, "pro", False),
        (14, None, "enterprise", True),
        (5, 85.0, "pro", True),  # a marked usage drop counts however recent the last login
        (5, 10.0, "pro", False),
    ],
)
def test_a_user_inactive_signal_opens_a_case_on_a_marked_drop_or_enough_days(
    days: int | None, drop: float | None, plan: str | None, opens: bool
) -> None:
    assert RULE.signal_opens(days, drop, plan) is opens


def test_what_a_due_timer_means() -> None:
    assert passive_verdict(status="active", erased=False, open_case_purpose=None) == "passive"
    assert passive_verdict(status="inactive", erased=False, open_case_purpose=None) == "passive"
    for status in NOT_PASSIVE_STATUSES:
        assert passive_verdict(status=status, erased=False, open_case_purpose=None) == (
            "not_passive"
        )
    assert passive_verdict(status="active", erased=True, open_case_purpose=None) == "not_passive"
    assert passive_verdict(status="active", erased=False, open_case_purpose="winback") == (
        "not_passive"
    )
    assert passive_verdict(status="active", erased=False, open_case_purpose="reonboarding") == (
        "later"
    )


def test_a_rule_with_a_period_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        InactivityRule(period=timedelta(0))


TIMES = st.datetimes(max_value=datetime(9000, 1, 1), timezones=st.just(UTC))


@given(
    a=TIMES,
    b=TIMES,
    plan=st.sampled_from([None, "pro", "enterprise"]),
)
def test_a_later_activity_never_brings_the_timer_forward_and_names_its_own_spell(
    a: datetime, b: datetime, plan: str | None
) -> None:
    early, late = min(a, b), max(a, b)
    assert RULE.due_at(early, plan) <= RULE.due_at(late, plan)
    assert RULE.due_at(late, plan) - late == RULE.period_for(plan)
    assert (passive_episode_id("c", early) == passive_episode_id("c", late)) is (early == late)
