"""Plain data the scheduler's domain core reads and returns.

Inputs (``CustomerView``, ``ChurnEpisode``, ``ContactHistory``, ``SentStep``) are snapshots
the adapters build from the database; outputs (``Segment``, ``PlannedStep`` and the
``Send`` / ``Defer`` / ``Skip`` decisions) are values the adapters persist or act on.
All datetimes are timezone-aware; constructors refuse naive ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeAlias, get_args

from shared.channels import ChannelName
from shared.churn import CHURN_REASONS as CHURN_REASONS
from shared.churn import ChurnReason as ChurnReason

Channel: TypeAlias = ChannelName
"""A built-in channel (``shared.channels``, the channel registry, is the one table)."""
CHANNELS: tuple[Channel, ...] = get_args(ChannelName)

Engagement: TypeAlias = Literal["high", "medium", "low"]
EpisodeKind: TypeAlias = Literal[
    "subscription_cancelled", "trial_expired", "user_inactive", "lead_lost"
]
LifecycleType: TypeAlias = Literal["passive_user", "churned_customer", "lost_lead", "expired_trial"]
ValueTier: TypeAlias = Literal["high", "medium", "low", "unknown"]
EngagementLevel: TypeAlias = Literal["high", "medium", "low", "unknown"]
TenureBand: TypeAlias = Literal["new", "established", "long_term", "unknown"]
OnCap: TypeAlias = Literal["defer", "skip"]
SegmentLabel: TypeAlias = Literal[
    "high_value", "active_user", "feature_gap", "situational", "competitor_switch", "low_engagement"
]

DEFAULT_VARIANT = "default"
"""The variant name of a step that declares no variants."""


def _require_aware(owner: str, name: str, value: datetime | None) -> None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{owner}.{name} must be timezone-aware, got {value!r}")


@dataclass(frozen=True, slots=True)
class CustomerView:
    """What the scheduler knows about a customer when it plans or decides.

    ``consent`` maps a channel to the customer's answer: ``True`` given, ``False`` withdrawn;
    a channel missing from it has no recorded answer (see ``GuardrailPolicy.consent_by_default``).
    ``fiscal_year_start_month`` (1-12) anchors the ``budget_cycle`` calendar rule; ``None``
    means the calendar year. ``last_active_at`` is the latest product activity recorded for
    the customer (``None``: none recorded), which re-onboarding's monitoring steps watch.
    """

    customer_id: str
    timezone: str | None = None
    locale: str | None = None
    mrr_minor: int | None = None
    currency: str | None = None
    customer_since: datetime | None = None
    engagement: Engagement | None = None
    crm_owner: str | None = None
    consent: Mapping[Channel, bool] = field(default_factory=dict)
    opted_out_all: bool = False
    suppressed_channels: frozenset[Channel] = frozenset()
    fiscal_year_start_month: int | None = None
    last_active_at: datetime | None = None

    def __post_init__(self) -> None:
        _require_aware("CustomerView", "customer_since", self.customer_since)
        _require_aware("CustomerView", "last_active_at", self.last_active_at)
        month = self.fiscal_year_start_month
        if month is not None and not 1 <= month <= 12:
            raise ValueError(f"fiscal_year_start_month must be 1..12, got {month}")


@dataclass(frozen=True, slots=True)
class ChurnEpisode:
    """One departure: the event that opens a win-back case.

    ``prior_win_back_at`` is set when the customer had been won back before and has now
    churned again (a re-churn).
    """

    episode_id: str
    kind: EpisodeKind
    occurred_at: datetime
    reason: ChurnReason = "unknown"
    feature: str | None = None
    competitor: str | None = None
    mrr_at_churn_minor: int | None = None
    prior_win_back_at: datetime | None = None

    def __post_init__(self) -> None:
        _require_aware("ChurnEpisode", "occurred_at", self.occurred_at)
        _require_aware("ChurnEpisode", "prior_win_back_at", self.prior_win_back_at)


@dataclass(frozen=True, slots=True)
class Segment:
    """Where a churned customer sits, computed once when the case opens.

    ``days_since_churn`` is a snapshot taken at segmentation time; playbook matching does
    not use it (timing is the window ladder's job).
    """

    lifecycle: LifecycleType
    reason: ChurnReason
    value_tier: ValueTier
    engagement: EngagementLevel
    tenure: TenureBand
    is_rechurn: bool
    days_since_churn: int = 0

    @property
    def labels(self) -> frozenset[SegmentLabel]:
        """The named segments of the brief this segment belongs to (for reporting)."""
        labels: set[SegmentLabel] = set()
        if self.value_tier == "high":
            labels.add("high_value")
        if self.engagement == "low":
            labels.add("low_engagement")
        if self.engagement == "high" and self.reason not in (
            "price",
            "unused",
            "poor_experience",
            "unknown",
        ):
            labels.add("active_user")
        if self.reason == "missing_feature":
            labels.add("feature_gap")
        if self.reason in ("situational", "budget"):
            labels.add("situational")
        if self.reason == "competitor":
            labels.add("competitor_switch")
        return frozenset(labels)


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A step of a case's playbook with its due time, ready to be stored as a timer row.

    ``due_at`` is when the step should fire (UTC); ``original_due_at`` is when the playbook
    put it. They differ only for a step caught up after a late-recorded churn
    (``caught_up``). ``template`` and ``offer`` are the assigned variant's. ``expires_at`` is
    the end of the case horizon: nothing is sent at or after it.
    ``discount_fallback_template`` is the template to send instead when the guardrails
    withhold the step's discount; ``None`` means the step is skipped then.
    ``inactive_for`` makes the step a monitoring step: it goes only once the customer has
    shown no activity for that long (see :func:`~.guardrails.decide`).
    """

    playbook: str
    playbook_version: int
    step_key: str
    channel: Channel
    template: str
    offer: str | None
    is_discount: bool
    due_at: datetime
    original_due_at: datetime
    variant: str
    window: str
    on_cap: OnCap
    holdout: bool
    expires_at: datetime
    discount_fallback_template: str | None = None
    trigger: str | None = None
    inactive_for: timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("due_at", "original_due_at", "expires_at"):
            _require_aware("PlannedStep", name, getattr(self, name))

    @property
    def caught_up(self) -> bool:
        """True when the step was moved to "now" because its planned time had passed."""
        return self.due_at != self.original_due_at


def _sorted_aware(owner: str, name: str, values: Sequence[datetime]) -> tuple[datetime, ...]:
    for value in values:
        _require_aware(owner, name, value)
    return tuple(sorted(values))


@dataclass(frozen=True, slots=True)
class ContactHistory:
    """A customer's past contacts across every case and channel.

    ``sent_at``: when each win-back message (any channel) went out; ``discounts_at``: when
    each discount offer went out (those are in ``sent_at`` too). Only contacts at or before
    the decision time are expected; both are stored sorted.
    """

    sent_at: tuple[datetime, ...] = ()
    discounts_at: tuple[datetime, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "sent_at", _sorted_aware("ContactHistory", "sent_at", self.sent_at)
        )
        object.__setattr__(
            self, "discounts_at", _sorted_aware("ContactHistory", "discounts_at", self.discounts_at)
        )

    def with_send(self, at: datetime, *, discount: bool = False) -> ContactHistory:
        """A copy with one more message sent at ``at``."""
        return ContactHistory(
            sent_at=(*self.sent_at, at),
            discounts_at=(*self.discounts_at, at) if discount else self.discounts_at,
        )


@dataclass(frozen=True, slots=True)
class SentStep:
    """A step that was actually sent, as attribution needs it."""

    step_key: str
    channel: Channel
    template: str
    variant: str
    sent_at: datetime
    crm_owner: str | None = None
    playbook: str | None = None
    playbook_version: int | None = None
    offer: str | None = None

    def __post_init__(self) -> None:
        _require_aware("SentStep", "sent_at", self.sent_at)


SkipReason: TypeAlias = Literal[
    "holdout",
    "opted_out",
    "expired",
    "channel_suppressed",
    "no_consent",
    "discount_not_allowed",
    "frequency_cap",
    "not_at_risk",
]
DeferReason: TypeAlias = Literal["not_due", "frequency_cap", "quiet_hours", "not_at_risk"]
DiscountBlock: TypeAlias = Literal[
    "not_price_reason", "low_engagement", "rechurn", "discount_period"
]


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``step`` now. When the discount was withheld, ``step`` is the offer-free copy
    (fallback template, no offer) and ``offer_withheld`` says why."""

    step: PlannedStep
    offer_withheld: DiscountBlock | None = None


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: try again at ``until`` (UTC), the earliest time the guardrails allow."""

    until: datetime
    reason: DeferReason


@dataclass(frozen=True, slots=True)
class Skip:
    """Never send this step. ``detail`` refines the reason (e.g. which discount rule)."""

    reason: SkipReason
    detail: str | None = None


Decision: TypeAlias = Send | Defer | Skip
