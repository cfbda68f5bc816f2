from datetime import UTC, datetime, timedelta

import pytest

from services.scheduler.domain.model import ChurnEpisode, CustomerView, EpisodeKind, Segment
from services.scheduler.domain.segmentation import (
    SegmentationThresholds,
    ValueTierThresholds,
    segment,
)

CHURN = datetime(2026, 3, 1, 12, tzinfo=UTC)


def episode(**changes: object) -> ChurnEpisode:
    fields: dict[str, object] = {
        "episode_id": "ep-1",
        "kind": "subscription_cancelled",
        "occurred_at": CHURN,
        "reason": "price",
    }
    fields.update(changes)
    return ChurnEpisode(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "lifecycle"),
    [
        ("subscription_cancelled", "churned_customer"),
        ("trial_expired", "expired_trial"),
        ("user_inactive", "passive_user"),
        ("lead_lost", "lost_lead"),
    ],
)
def test_lifecycle_type_follows_episode_kind(kind: EpisodeKind, lifecycle: str) -> None:
    result = segment(CustomerView("c1"), episode(kind=kind), CHURN)
    assert result.lifecycle == lifecycle


@pytest.mark.parametrize(
    ("mrr_at_churn", "profile_mrr", "tier"),
    [
        (None, None, "unknown"),
        (60_000, None, "high"),
        (50_000, None, "high"),
        (49_999, None, "medium"),
        (5_000, None, "medium"),
        (4_999, None, "low"),
        (None, 70_000, "high"),
        (100, 70_000, "low"),  # the MRR at churn wins over the current profile
    ],
)
def test_value_tier_from_mrr_thresholds(
    mrr_at_churn: int | None, profile_mrr: int | None, tier: str
) -> None:
    result = segment(
        CustomerView("c1", mrr_minor=profile_mrr), episode(mrr_at_churn_minor=mrr_at_churn), CHURN
    )
    assert result.value_tier == tier


def test_value_tier_thresholds_can_differ_per_currency() -> None:
    thresholds = SegmentationThresholds(
        value_by_currency={
            "JPY": ValueTierThresholds(high_from_minor=80_000, medium_from_minor=8_000)
        }
    )
    customer = CustomerView("c1", currency="jpy")
    assert (
        segment(customer, episode(mrr_at_churn_minor=60_000), CHURN, thresholds).value_tier
        == "medium"
    )
    euro = CustomerView("c1", currency="EUR")
    assert segment(euro, episode(mrr_at_churn_minor=60_000), CHURN, thresholds).value_tier == "high"


@pytest.mark.parametrize(
    ("since", "band"),
    [
        (None, "unknown"),
        (CHURN - timedelta(days=10), "new"),
        (CHURN - timedelta(days=90), "established"),
        (CHURN - timedelta(days=364), "established"),
        (CHURN - timedelta(days=365), "long_term"),
        (CHURN + timedelta(days=3), "new"),
    ],
)
def test_tenure_band_from_customer_since_to_churn(since: datetime | None, band: str) -> None:
    assert segment(CustomerView("c1", customer_since=since), episode(), CHURN).tenure == band


def test_engagement_rechurn_and_days_since_churn() -> None:
    result = segment(
        CustomerView("c1", engagement="low"),
        episode(prior_win_back_at=CHURN - timedelta(days=100)),
        CHURN + timedelta(days=10, hours=23),
    )
    assert (result.engagement, result.is_rechurn, result.days_since_churn) == ("low", True, 10)
    fresh = segment(CustomerView("c1"), episode(), CHURN - timedelta(days=1))
    assert (fresh.engagement, fresh.is_rechurn, fresh.days_since_churn) == ("unknown", False, 0)


@pytest.mark.parametrize(
    ("segment_value", "labels"),
    [
        (Segment("churned_customer", "price", "high", "high", "new", False), {"high_value"}),
        (
            Segment("churned_customer", "budget", "low", "high", "new", False),
            {"active_user", "situational"},
        ),
        (
            Segment("churned_customer", "missing_feature", "low", "low", "new", False),
            {"feature_gap", "low_engagement"},
        ),
        (
            Segment("churned_customer", "competitor", "medium", "medium", "new", False),
            {"competitor_switch"},
        ),
        (Segment("churned_customer", "unknown", "medium", "high", "new", False), set()),
    ],
)
def test_named_segments_of_the_brief(segment_value: Segment, labels: set[str]) -> None:
    assert segment_value.labels == labels


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        episode(occurred_at=datetime(2026, 1, 1))
