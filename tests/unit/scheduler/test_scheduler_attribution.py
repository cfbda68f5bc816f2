from datetime import UTC, datetime, timedelta

import pytest

from services.scheduler.domain.attribution import (
    attribute_reactivation,
    credited_step,
    time_since_return,
)
from services.scheduler.domain.model import Channel, ChurnEpisode, SentStep

DAY = timedelta(days=1)
CHURN = datetime(2026, 1, 10, tzinfo=UTC)
EPISODE = ChurnEpisode(
    "ep-1", "subscription_cancelled", CHURN, reason="price", mrr_at_churn_minor=9_900
)


def sent(key: str, day: int, channel: Channel = "email", owner: str | None = "alice") -> SentStep:
    return SentStep(
        key,
        channel,
        key,
        "default",
        CHURN + day * DAY,
        crm_owner=owner,
        playbook="pb",
        playbook_version=1,
    )


@pytest.mark.parametrize(
    ("steps", "returned_on_day", "credited"),
    [
        ([sent("d0", 0), sent("d7", 7), sent("d14", 14)], 20, "d14"),  # last touch
        ([sent("d0", 0), sent("d7", 7), sent("d14", 14)], 10, "d7"),  # later steps do not count
        ([sent("d0", 0)], 90, "d0"),  # the window's edge is inside
        ([sent("d0", 0)], 91, None),  # past the 90-day attribution window
        ([], 5, None),  # returned on their own (or in the holdout)
        ([sent("old", -5)], 3, None),  # sent before this churn
        ([sent("d3", 3), sent("call", 3, "crm", "bob")], 6, "call"),  # same moment: the CRM task
    ],
)
def test_last_touch_inside_the_attribution_window_gets_the_credit(
    steps: list[SentStep], returned_on_day: int, credited: str | None
) -> None:
    step = credited_step(steps, EPISODE, CHURN + returned_on_day * DAY)
    assert (step.step_key if step else None) == credited


def test_win_back_carries_what_commission_systems_need() -> None:
    steps = [sent("d7", 7), sent("call", 8, "crm", "bob")]
    credit = attribute_reactivation(
        steps, EPISODE, CHURN + 33 * DAY + timedelta(hours=5), mrr_regained_minor=12_900
    )
    assert credit.is_win_back
    assert credit.credited == steps[1]
    assert (credit.crm_owner, credit.days_to_return) == ("bob", 33)
    assert (credit.mrr_regained_minor, credit.mrr_at_churn_minor) == (12_900, 9_900)
    assert credit.episode_id == "ep-1"


def test_a_return_without_a_step_in_the_window_is_not_a_win_back() -> None:
    credit = attribute_reactivation(
        [sent("d0", 0)], EPISODE, CHURN + 40 * DAY, mrr_regained_minor=None, window=30 * DAY
    )
    assert not credit.is_win_back
    assert (credit.credited, credit.crm_owner, credit.days_to_return) == (None, None, 40)


def test_time_since_return_for_a_rechurn() -> None:
    rechurn = ChurnEpisode(
        "ep-2", "subscription_cancelled", CHURN, prior_win_back_at=CHURN - 120 * DAY
    )
    assert time_since_return(rechurn) == 120 * DAY
    assert time_since_return(EPISODE) is None
