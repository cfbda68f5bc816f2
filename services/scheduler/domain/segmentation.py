"""Segmentation: from a customer profile and a churn episode to a :class:`Segment`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

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


# -- passive users: found by winback itself ---------------------------------------------------
NOT_PASSIVE_STATUSES: frozenset[str] = frozenset({"churned", "trial_expired", "lead_lost"})
"""Statuses of people who are not passive users: they left (a win-back case covers them)."""

PassiveVerdict = Literal["passive", "not_passive", "later"]


@dataclass(frozen=True, slots=True)
class InactivityRule:
    """When a customer counts as a passive user.

    ``period``: how long without product activity (``by_plan`` overrides it per plan);
    ``usage_drop_percent``: the usage drop from which an external ``user.inactive`` signal
    counts on its own.
    """

    period: timedelta = timedelta(days=30)
    by_plan: Mapping[str, timedelta] = field(default_factory=dict)
    usage_drop_percent: float = 50.0

    def __post_init__(self) -> None:
        if self.period <= timedelta(0) or any(p <= timedelta(0) for p in self.by_plan.values()):
            raise ValueError("an inactivity period must be positive")
        if not 0 <= self.usage_drop_percent <= 100:
            raise ValueError("usage_drop_percent must be 0..100")

    def period_for(self, plan: str | None) -> timedelta:
        """The inactivity period of a customer on ``plan``."""
        return self.by_plan.get(plan, self.period) if plan is not None else self.period

    def due_at(self, last_active_at: datetime, plan: str | None) -> datetime:
        """When a customer last active at ``last_active_at`` becomes a passive user."""
        return last_active_at + self.period_for(plan)

    def signal_opens(
        self, days_inactive: int | None, usage_drop_percent: float | None, plan: str | None
    ) -> bool:
        """Whether a ``user.inactive`` signal opens a passive-user case: its usage drop reaches
        ``usage_drop_percent``, or its days without activity reach the plan's period; a
        signal with neither figure is the detector's own judgement and counts."""
        if days_inactive is None and usage_drop_percent is None:
            return True
        if usage_drop_percent is not None and usage_drop_percent >= self.usage_drop_percent:
            return True
        return days_inactive is not None and timedelta(days=days_inactive) >= self.period_for(plan)


def passive_verdict(
    *, status: str | None, erased: bool, open_case_purpose: str | None
) -> PassiveVerdict:
    """What a due inactivity timer means for its customer.

    ``passive``: open a passive-user case. ``not_passive``: a churned (or erased) customer, or
    one with an open win-back case (a passive-user case included) — the timer is dropped; the
    next activity arms it again. ``later``: a returner in re-onboarding, which watches for
    silence itself — the timer waits for that case to end.
    """
    if erased or (status is not None and status in NOT_PASSIVE_STATUSES):
        return "not_passive"
    if open_case_purpose == "reonboarding":
        return "later"
    if open_case_purpose is not None:
        return "not_passive"
    return "passive"
