"""A provider event's Unix time out of a datetime's range is no time, not a 500 (found by the
Schemathesis run: a signed SendGrid event with timestamp -9556473237484500992)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.dispatcher.webhooks import _unix


@pytest.mark.parametrize("value", [-9556473237484500992, 10**15, float("inf"), float("nan")])
def test_an_out_of_range_time_is_none(value: float) -> None:
    assert _unix(value) is None


def test_a_time_in_range_is_iso() -> None:
    assert _unix(1_700_000_000) == "2023-11-14T22:13:20+00:00"
    assert _unix("1700000000") is None
    assert _unix(True) is None


@given(st.one_of(st.integers(), st.floats()))
def test_any_number_gives_a_time_or_none(value: float) -> None:
    result = _unix(value)
    assert result is None or "T" in result
