from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.windows import (
    DEFAULT_LADDER,
    TimingWindow,
    WindowLadder,
    window_for,
)

DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (timedelta(0), "immediate"),
        (6 * DAY + timedelta(hours=23), "immediate"),
        (7 * DAY, "email_series"),
        (29 * DAY, "email_series"),
        (30 * DAY, "special_offer"),
        (89 * DAY, "special_offer"),
        (90 * DAY, "product_update"),
        (180 * DAY, "last_attempt"),
        (364 * DAY, "last_attempt"),
        (365 * DAY, None),
        (1000 * DAY, None),
    ],
)
def test_default_ladder_maps_time_since_churn_to_window(
    elapsed: timedelta, expected: str | None
) -> None:
    window = window_for(elapsed)
    assert (window.name if window else None) == expected


def test_time_before_churn_has_no_window() -> None:
    with pytest.raises(ValueError, match="negative"):
        window_for(-DAY)


def test_ladder_comes_from_configuration_with_a_longer_horizon() -> None:
    ladder = WindowLadder.from_config(
        {
            "windows": [{"name": "early", "start": "0d"}, {"name": "late", "start": "6mo"}],
            "horizon": "18mo",
        }
    )
    assert ladder.horizon == 540 * DAY
    assert window_for(400 * DAY, ladder) == TimingWindow("late", 180 * DAY, 540 * DAY)
    assert window_for(540 * DAY, ladder) is None


def test_shorter_horizon_drops_windows_that_start_after_it() -> None:
    ladder = DEFAULT_LADDER.with_horizon(45 * DAY)
    assert [w.name for w in ladder.windows] == ["immediate", "email_series", "special_offer"]
    assert ladder.horizon == 45 * DAY


@pytest.mark.parametrize(
    ("starts", "horizon", "message"),
    [
        ([("a", DAY)], 10 * DAY, "start at churn"),
        ([("a", timedelta(0)), ("b", 5 * DAY), ("c", 3 * DAY)], 10 * DAY, "end after it starts"),
        ([("a", timedelta(0)), ("a", 5 * DAY)], 10 * DAY, "unique"),
        ([("a", timedelta(0)), ("b", 5 * DAY)], 5 * DAY, "end after it starts"),
    ],
)
def test_invalid_ladders_are_refused(
    starts: list[tuple[str, timedelta]], horizon: timedelta, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WindowLadder.from_starts(starts, horizon)


@settings(max_examples=200, deadline=None)
@given(elapsed=st.timedeltas(min_value=timedelta(0), max_value=400 * DAY))
def test_every_time_before_the_horizon_is_in_exactly_one_window(elapsed: timedelta) -> None:
    containing = [w for w in DEFAULT_LADDER.windows if w.contains(elapsed)]
    if elapsed < DEFAULT_LADDER.horizon:
        assert containing == [window_for(elapsed)]
    else:
        assert containing == []
        assert window_for(elapsed) is None
