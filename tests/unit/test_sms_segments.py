"""SMS segment counting (3GPP TS 23.038): GSM-7 160/153, UCS-2 70/67, extension characters
two septets each."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.sms import GSM7_BASIC, GSM7_EXTENSION, segments


def test_gsm7_boundaries() -> None:
    assert segments("").segments == 0
    assert (segments("a" * 160).encoding, segments("a" * 160).segments) == ("GSM-7", 1)
    assert segments("a" * 161).segments == 2
    assert segments("a" * 306).segments == 2  # 2 x 153
    assert segments("a" * 307).segments == 3


def test_extension_characters_take_two_septets() -> None:
    counted = segments("€" * 80)
    assert (counted.encoding, counted.units, counted.segments) == ("GSM-7", 160, 1)
    assert segments("€" * 81).segments == 2


def test_anything_outside_gsm7_makes_the_text_ucs2() -> None:
    assert (segments("a" * 69 + "ő").encoding, segments("a" * 69 + "ő").segments) == ("UCS-2", 1)
    assert segments("a" * 70 + "ő").segments == 2
    assert segments("🎉").units == 2  # a surrogate pair is two UTF-16 code units
    assert segments("a" * 134).segments == 1
    assert segments("ő" * 134).segments == 2  # 2 x 67


@given(st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=1000))
def test_gsm7_texts_fit_the_segments_they_are_counted_in(text: str) -> None:
    counted = segments(text)
    assert counted.encoding == "GSM-7"
    if counted.segments == 1:
        assert counted.units <= 160
    elif counted.segments > 1:
        assert 153 * (counted.segments - 1) < counted.units <= 153 * counted.segments


@given(st.text(max_size=400), st.text(max_size=50))
def test_a_longer_text_never_takes_fewer_segments(text: str, more: str) -> None:
    # a GSM-7 segment holds at most 153 characters and at least 76 (all from the extension
    # table); a UCS-2 one 67: turning UCS-2 never lowers the count
    assert segments(text + more).segments >= segments(text).segments
