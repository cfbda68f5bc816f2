"""Segmentation: from a customer profile and a churn episode to a :class:`Segment`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from services.scheduler.domain.model import (
    ChurnEpisode,
    CustomerView,
    EpisodeKind,
    LifecycleType,
    Segment,
    TenureBand,
    ValueTier,
)

LIFECYCLE_BY_KIND: Mapping[EpisodeKind, LifecycleType] = {
    "subscription_cancelled": "churned_customer",
    "trial_expired": "expired_trial",
    "user_inactive": "passive_user",
    "lead_lost": "lost_lead",
}


@dataclass(frozen=True, slots=True)
class ValueTierThresholds:
    """MRR (minor units) from which a customer is ``high`` or ``medium`` value; below is ``low``."""

    high_from_minor: int
    medium_from_minor: int

    def __post_init__(self) -> None:
        if not 0 <= self.medium_from_minor <= self.high_from_minor:
            raise ValueError("need 0 <= medium_from_minor <= high_from_minor")

    def tier(self, mrr_minor: int) -> ValueTier:
        """The tier of a monthly recurring revenue in minor units."""
        if mrr_minor >= self.high_from_minor:
            return "high"
        if mrr_minor >= self.medium_from_minor:
            return "medium"
        return "low"


@dataclass(frozen=True, slots=True)
class SegmentationThresholds:
    """Configuration of segmentation.

    ``value`` applies to any currency not listed in ``value_by_currency`` (minor units
    differ per currency, so e.g. JPY deserves its own entry). Tenure is measured from
    ``customer_since`` to the churn: below ``established_after`` it is ``new``, below
    ``long_term_after`` ``established``, otherwise ``long_term``.
    """

    value: ValueTierThresholds = ValueTierThresholds(
        high_from_minor=50_000, medium_from_minor=5_000
    )
    value_by_currency: Mapping[str, ValueTierThresholds] = field(default_factory=dict)
    established_after: timedelta = timedelta(days=90)
    long_term_after: timedelta = timedelta(days=365)

    def __post_init__(self) -> None:
        if not timedelta(0) <= self.established_after <= self.long_term_after:
            raise ValueError("need 0 <= established_after <= long_term_after")

    def value_tier(self, mrr_minor: int | None, currency: str | None) -> ValueTier:
        """The value tier of an MRR in ``currency`` (``unknown`` without an MRR)."""
        if mrr_minor is None:
            return "unknown"
        thresholds = self.value_by_currency.get((currency or "").upper(), self.value)
        return thresholds.tier(mrr_minor)

    def tenure_band(self, tenure: timedelta | None) -> TenureBand:
        """The tenure band of a customer relationship length (``unknown`` without one)."""
        if tenure is None:
            return "unknown"
        if tenure < self.established_after:
            return "new"
        if tenure < self.long_term_after:
            return "established"
        return "long_term"


DEFAULT_THRESHOLDS = SegmentationThresholds()


def segment(
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    thresholds: SegmentationThresholds = DEFAULT_THRESHOLDS,
) -> Segment:
    """Segment a churned customer.

    * lifecycle type from the episode kind (:data:`LIFECYCLE_BY_KIND`);
    * value tier from the MRR at churn, else the profile's current MRR;
    * engagement before churn from the profile (``unknown`` when not known);
    * tenure from ``customer_since`` to the churn (a negative span counts as zero);
    * re-churn when the episode says the customer had been won back before;
    * ``days_since_churn`` in whole days at ``now`` (zero if ``now`` precedes the churn).
    """
    mrr = episode.mrr_at_churn_minor
    if mrr is None:
        mrr = customer.mrr_minor
    tenure = None
    if customer.customer_since is not None:
        tenure = max(episode.occurred_at - customer.customer_since, timedelta(0))
    elapsed = max(now - episode.occurred_at, timedelta(0))
    return Segment(
        lifecycle=LIFECYCLE_BY_KIND[episode.kind],
        reason=episode.reason,
        value_tier=thresholds.value_tier(mrr, customer.currency),
        engagement=customer.engagement or "unknown",
        tenure=thresholds.tenure_band(tenure),
        is_rechurn=episode.prior_win_back_at is not None,
        days_since_churn=elapsed // timedelta(days=1),
    )


def is_returner(previous_status: str | None, *, came_back: bool) -> bool:
    """Whether a return makes the customer a returner, so that their next churn is a re-churn
    (``Segment.is_rechurn``: never a discount again, whatever the discount period).

    Any churned customer who came back is one — won back by a message or back on their own,
    within a case's attribution horizon or long after it: the status before the return says
    so (``churned``: a cancelled subscription), or the win-back case that recorded the return
    (``came_back``, :attr:`~services.scheduler.domain.case.Case.came_back`). A trial or a lead
    that converts, or a passive user active again, is not.
    """
    return came_back or previous_status == "churned"
