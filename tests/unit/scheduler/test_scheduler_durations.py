from datetime import timedelta

import pytest

from services.scheduler.domain.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0d", timedelta(0)),
        ("3d", timedelta(days=3)),
        ("12h", timedelta(hours=12)),
        ("2w", timedelta(days=14)),
        ("6mo", timedelta(days=180)),
        ("1y", timedelta(days=365)),
        (" 7D ", timedelta(days=7)),
        ("P3D", timedelta(days=3)),
        ("P2W", timedelta(days=14)),
        ("P1M", timedelta(days=30)),
        ("P1Y2M3DT4H5M", timedelta(days=365 + 60 + 3, hours=4, minutes=5)),
        ("PT12H", timedelta(hours=12)),
    ],
)
def test_parses_compact_and_iso_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "3", "d", "-3d", "3 days", "3m", "1.5d", "P", "PT", "P1DT"])
def test_rejects_text_that_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0d"),
        (timedelta(days=365), "1y"),
        (timedelta(days=540), "18mo"),
        (timedelta(days=14), "2w"),
        (timedelta(days=45), "45d"),
        (timedelta(hours=5), "5h"),
    ],
)
def test_formats_in_the_largest_exact_unit(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value
