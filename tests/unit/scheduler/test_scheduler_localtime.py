from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.localtime import SendWindow, first_instant_at, resolve_zone

HELSINKI = ZoneInfo("Europe/Helsinki")
NEW_YORK = ZoneInfo("America/New_York")
SANTIAGO = ZoneInfo("America/Santiago")

ZONES = [
    "UTC",
    "Europe/Helsinki",
    "America/New_York",
    "America/Santiago",  # DST switches at midnight
    "Australia/Lord_Howe",  # 30-minute DST shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "Asia/Kathmandu",  # +05:45, no DST
    "America/St_Johns",  # -03:30 with DST
]


@pytest.mark.parametrize(
    ("zone", "instant", "window", "expected_local"),
    [
        # 03:00 local moves to 09:00 local the same day
        (HELSINKI, datetime(2026, 6, 10, 0, tzinfo=UTC), SendWindow(), datetime(2026, 6, 10, 9)),
        # inside the window: unchanged
        (HELSINKI, datetime(2026, 6, 10, 9, tzinfo=UTC), SendWindow(), datetime(2026, 6, 10, 12)),
        # after the window: 09:00 the next day
        (HELSINKI, datetime(2026, 6, 10, 18, tzinfo=UTC), SendWindow(), datetime(2026, 6, 11, 9)),
        # the end is exclusive
        (HELSINKI, datetime(2026, 6, 10, 17, tzinfo=UTC), SendWindow(), datetime(2026, 6, 11, 9)),
        # the clocks jump 02:00 → 03:00: a 02:30 start becomes the jump, 03:00 EDT
        (
            NEW_YORK,
            datetime(2026, 3, 8, 5, tzinfo=UTC),
            SendWindow(time(2, 30), time(20)),
            datetime(2026, 3, 8, 3),
        ),
        # the clocks jump 00:00 → 01:00 in Santiago: a midnight start becomes 01:00
        (
            SANTIAGO,
            datetime(2025, 9, 7, 2, tzinfo=UTC),
            SendWindow(time(0), time(6)),
            datetime(2025, 9, 7, 1),
        ),
    ],
)
def test_next_allowed_moves_quiet_hours_to_the_window_start(
    zone: ZoneInfo, instant: datetime, window: SendWindow, expected_local: datetime
) -> None:
    result = window.next_allowed(instant, zone)
    assert result.astimezone(zone).replace(tzinfo=None) == expected_local
    assert window.allows(result, zone)


def test_clocks_going_back_over_the_start_use_the_next_occurrence() -> None:
    window = SendWindow(time(1, 30), time(20))
    first = datetime(2026, 11, 1, 5, 10, tzinfo=UTC)  # 01:10 EDT
    second = datetime(2026, 11, 1, 6, 10, tzinfo=UTC)  # 01:10 EST, an hour later
    assert window.next_allowed(first, NEW_YORK) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    assert window.next_allowed(second, NEW_YORK) == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("day", "at", "zone", "expected"),
    [
        (date(2026, 3, 8), time(2, 30), NEW_YORK, datetime(2026, 3, 8, 7, tzinfo=UTC)),
        (date(2026, 3, 8), time(3, 30), NEW_YORK, datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        (date(2026, 11, 1), time(1, 30), NEW_YORK, datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
        (date(2026, 1, 1), time(0), HELSINKI, datetime(2025, 12, 31, 22, tzinfo=UTC)),
    ],
)
def test_first_instant_at_a_wall_time(
    day: date, at: time, zone: ZoneInfo, expected: datetime
) -> None:
    assert first_instant_at(day, at, zone) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Europe/Helsinki", "Europe/Helsinki"),
        (None, "Europe/Oslo"),
        ("", "Europe/Oslo"),
        ("Mars/Base", "Europe/Oslo"),
        ("../etc/passwd", "Europe/Oslo"),
    ],
)
def test_unknown_timezones_fall_back(name: str | None, expected: str) -> None:
    assert resolve_zone(name, "Europe/Oslo") == ZoneInfo(expected)


@pytest.mark.parametrize(("start", "end"), [(time(9), time(9)), (time(20), time(9))])
def test_send_window_must_not_be_empty_or_wrap(start: time, end: time) -> None:
    with pytest.raises(ValueError, match="start before it ends"):
        SendWindow(start, end)


windows = st.tuples(st.integers(0, 22), st.sampled_from([0, 15, 30, 45]), st.integers(1, 12)).map(
    lambda t: SendWindow(time(t[0], t[1]), time(min(t[0] + t[2], 23), 59))
)


@settings(max_examples=120, deadline=None)
@given(
    instant=st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
    ),
    zone_name=st.sampled_from(ZONES),
    window=windows,
)
def test_next_allowed_is_the_earliest_instant_inside_the_local_window(
    instant: datetime, zone_name: str, window: SendWindow
) -> None:
    zone = ZoneInfo(zone_name)
    result = window.next_allowed(instant, zone)
    assert result >= instant
    assert window.allows(result, zone)
    if window.allows(instant, zone):
        assert result == instant
    # nothing earlier is allowed: check every whole minute in between
    probe = instant.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while probe < result:
        assert not window.allows(probe, zone), probe
        probe += timedelta(minutes=1)
