from __future__ import annotations

import pytest

from services.ingest.reasons import REASONS, normalise_reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("too_expensive", "price"),
        ("missing_features", "missing_feature"),
        ("switched_service", "competitor"),
        ("unused", "unused"),
        ("customer_service", "poor_experience"),
        ("too_complex", "poor_experience"),
        ("low_quality", "poor_experience"),
        ("other", "unknown"),
        ("Budget cut for next year", "budget"),
        ("It was too expensive for us", "price"),
        ("We moved to a competitor", "competitor"),
        ("Project ended", "situational"),
        ("Onboarding was confusing", "poor_experience"),
        ("", "unknown"),
        (None, "unknown"),
        ("qwerty", "unknown"),
    ],
)
def test_reasons_normalise_to_one_of_eight_words(raw: str | None, expected: str) -> None:
    assert normalise_reason(raw) == expected
    assert normalise_reason(raw) in REASONS
