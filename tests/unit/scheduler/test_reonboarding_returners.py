"""Re-onboarding and the re-churn rule are for churned customers who came back (pure domain):
a converted trial or lead, or a passive user active again, is recorded as a return but gets no
"welcome back" and is no returner; any churned customer back — credited or not — is one."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.domain.case import Case, CaseChange, Refused, open_case, reonboards
from services.scheduler.domain.model import ChurnEpisode, CustomerView, LifecycleType, Segment
from services.scheduler.domain.planning import case_expires_at, plan_steps
from services.scheduler.domain.playbook import Playbook
from services.scheduler.domain.segmentation import LIFECYCLE_BY_KIND, is_returner

DAY = timedelta(days=1)
T0 = datetime(2026, 2, 2, 10, tzinfo=UTC)
HORIZON = timedelta(days=365)
KIND_OF: dict[LifecycleType, str] = {v: k for k, v in LIFECYCLE_BY_KIND.items()}
PLAYBOOK = Playbook.model_validate(
    {
        "name": "pb",
        "version": 1,
        "horizon": "60d",
        "exit_on": ["reactivated", "unsubscribed_all", "activity"],
        "steps": [{"key": "d0", "offset": "0d", "channel": "email", "template": "we_miss_you"}],
    }
)


def winback_case(lifecycle: LifecycleType) -> Case:
    ep = ChurnEpisode(f"ep-{lifecycle}", KIND_OF[lifecycle], T0)  # type: ignore[arg-type]
    seg = Segment(lifecycle, "price", "medium", "high", "established", False)
    result = open_case(
        case_id=f"case-{lifecycle}",
        customer_id="cust-1",
        episode_id=ep.episode_id,
        purpose="winback",
        playbook=PLAYBOOK,
        segment=seg,
        episode=ep,
        expires_at=case_expires_at(PLAYBOOK, ep),
        steps=plan_steps(PLAYBOOK, CustomerView("cust-1"), ep, T0, segment=seg),
        now=T0,
    )
    assert isinstance(result, CaseChange)
    return result.after


def returned(case: Case, at: datetime, by_activity: bool = False) -> CaseChange:
    result = case.record_return(
        at, returned_at=at, by_activity=by_activity, playbook=PLAYBOOK, horizon=HORIZON
    )
    assert isinstance(result, CaseChange), result
    return result


def test_only_a_churned_customer_who_returns_is_re_onboarded() -> None:
    churned = returned(winback_case("churned_customer"), T0 + DAY)
    assert churned.closed
    assert churned.after.close_reason == "returned"
    assert churned.after.came_back
    assert reonboards(churned)


@pytest.mark.parametrize("lifecycle", ["expired_trial", "lost_lead", "passive_user"])
def test_a_conversion_or_a_passive_user_active_again_closes_as_returned_without_follow_up(
    lifecycle: LifecycleType,
) -> None:
    change = returned(winback_case(lifecycle), T0 + DAY, by_activity=lifecycle == "passive_user")
    # the return is recorded (attribution counts it) ...
    assert change.closed
    assert change.after.close_reason == "returned"
    assert change.after.returned_at == T0 + DAY
    # ... but it is no comeback: no "welcome back", no returner
    assert not change.after.came_back
    assert not reonboards(change)
    assert not is_returner("trial_expired", came_back=change.after.came_back)


def test_a_churned_customer_who_unsubscribed_is_not_re_onboarded_but_is_a_returner() -> None:
    stopped = winback_case("churned_customer").unsubscribe(T0 + DAY)
    assert isinstance(stopped, CaseChange)
    late = returned(stopped.after, T0 + 30 * DAY)
    assert late.after.came_back
    assert not reonboards(late)
    assert is_returner(None, came_back=late.after.came_back)


def test_a_churned_customer_whose_case_ran_out_is_re_onboarded_on_a_late_return() -> None:
    expired = winback_case("churned_customer").expire(T0 + 60 * DAY)
    assert isinstance(expired, CaseChange)
    late = returned(expired.after, T0 + 200 * DAY)
    assert not late.closed
    assert late.after.close_reason == "horizon"
    assert reonboards(late)


@pytest.mark.parametrize(
    ("previous", "came_back", "expected"),
    [
        ("churned", False, True),  # back on their own, no case recorded it
        (None, True, True),
        ("trial_expired", False, False),
        ("lead_lost", False, False),
        ("inactive", False, False),
        ("active", False, False),
    ],
)
def test_who_is_a_returner_for_the_rechurn_rule(
    previous: str | None, came_back: bool, expected: bool
) -> None:
    assert is_returner(previous, came_back=came_back) is expected


LIFECYCLES: list[LifecycleType] = ["churned_customer", "expired_trial", "lost_lead", "passive_user"]


@given(
    lifecycle=st.sampled_from(LIFECYCLES),
    close_first=st.sampled_from([None, "expire", "unsubscribe", "cancel", "supersede"]),
    by_activity=st.booleans(),
    days=st.integers(min_value=1, max_value=300),
)
def test_re_onboarding_follows_exactly_the_comebacks_of_churned_customers(
    lifecycle: LifecycleType, close_first: str | None, by_activity: bool, days: int
) -> None:
    case = winback_case(lifecycle)
    if close_first == "expire":
        first: Any = case.expire(case.expires_at)
    elif close_first is not None:
        first = getattr(case, close_first)(T0 + DAY / 2)
    else:
        first = None
    if first is not None:
        assert isinstance(first, CaseChange)
        case = first.after
    at = max(T0 + days * DAY, case.closed_at or T0)
    result = case.record_return(
        at, returned_at=at, by_activity=by_activity, playbook=PLAYBOOK, horizon=HORIZON
    )
    if isinstance(result, Refused):
        return
    recorded = result.after.returned_at is not None
    expected = recorded and lifecycle == "churned_customer" and case.close_reason != "unsubscribed"
    assert reonboards(result) is expected
    assert result.after.came_back is (recorded and lifecycle == "churned_customer")
    # every re-onboarded customer is a returner for the re-churn rule
    if reonboards(result):
        assert is_returner(None, came_back=result.after.came_back)
    # a re-onboarding case itself never re-onboards
    assert not reonboards(replace(result, after=replace(result.after, purpose="reonboarding")))
