"""What the scheduler publishes about cases (topic ``topics.outcomes``, keyed by customer id):
``case.opened``, ``case.closed``, ``case.won_back``, ``case.migrated``.

Fields without a default are always written; fields with a default appear only in some
variants (``case.opened`` of a win-back case carries ``time_since_return_days``, of a
re-onboarding case ``after_case_id``, ``churn_reason`` and ``returned_at``).
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import Field, StringConstraints

from shared.contracts.base import Channel, ChurnReason, Id, Published, Time

Short = Annotated[str, StringConstraints(max_length=200)]
Purpose: TypeAlias = Literal["winback", "reonboarding"]
CloseReason: TypeAlias = Literal[
    "superseded", "returned", "activity", "unsubscribed", "cancelled", "horizon", "erased"
]
LifecycleType: TypeAlias = Literal["passive_user", "churned_customer", "lost_lead", "expired_trial"]
ValueTier: TypeAlias = Literal["high", "medium", "low", "unknown"]
EngagementLevel: TypeAlias = Literal["high", "medium", "low", "unknown"]
TenureBand: TypeAlias = Literal["new", "established", "long_term", "unknown"]
SegmentLabel: TypeAlias = Literal[
    "high_value", "active_user", "feature_gap", "situational", "competitor_switch", "low_engagement"
]
CancelCause: TypeAlias = Literal["removed", "not_planned", "missed", "horizon", "now_triggered"]


class SegmentData(Published):
    """Where the customer sat when the case opened."""

    lifecycle: LifecycleType
    reason: ChurnReason
    value_tier: ValueTier
    engagement: EngagementLevel
    tenure: TenureBand
    is_rechurn: bool
    days_since_churn: int
    labels: list[SegmentLabel] = Field(description="sorted")


class CaseOpened(Published):
    """``case.opened``: a win-back case (at a churn) or a re-onboarding case (at a return)."""

    case_id: Id
    customer_id: Id
    purpose: Purpose
    playbook: Short
    playbook_version: int = Field(ge=1)
    segment: SegmentData
    holdout: bool = Field(description="in the playbook's holdout: nothing is sent")
    is_rechurn: bool
    time_since_return_days: int | None = Field(
        default=None, description="win-back case of a re-churn: days since the last return"
    )
    after_case_id: Id | None = Field(
        default=None, description="re-onboarding: the win-back case that ended in the return"
    )
    churn_reason: ChurnReason | None = Field(
        default=None, description="re-onboarding: the original churn's reason"
    )
    returned_at: Time | None = Field(default=None, description="re-onboarding: the return")
    steps: int = Field(ge=0, description="how many steps were planned")


class CaseClosed(Published):
    """``case.closed``: the case ended; every pending step was cancelled."""

    case_id: Id
    customer_id: Id
    reason: CloseReason
    playbook: Short


class CaseWonBack(Published):
    """``case.won_back``: a return credited to the last step sent within the attribution
    window (what CRM and commission systems need)."""

    case_id: Id
    customer_id: Id
    episode_id: Id
    playbook: Short
    playbook_version: int = Field(ge=1)
    step_key: Short
    channel: Channel
    template: Short
    variant: Short
    offer: Short | None
    crm_owner: Short | None
    mrr_regained_minor: int | None
    mrr_at_churn_minor: int | None
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None
    days_to_return: int
    churned_at: Time
    returned_at: Time


class MigratedStep(Published):
    """A step as a playbook version plans it."""

    step_key: Short
    channel: Channel
    template: Short
    offer: Short | None
    variant: Short
    window: Short
    due_at: Time
    original_due_at: Time


class CancelledStep(Published):
    step_key: Short
    cause: CancelCause
    due_at: Time


class RetimedStep(MigratedStep):
    from_due_at: Time
    changed: list[str] = Field(description="the step fields the new version changed")


class UpdatedStep(MigratedStep):
    changed: list[str] = Field(description="the step fields the new version changed")


class CaseMigrated(Published):
    """``case.migrated``: an open case moved to another version of its playbook."""

    case_id: Id
    customer_id: Id
    playbook: Short
    from_version: int = Field(ge=1)
    to_version: int = Field(ge=1)
    expires_at: Time
    added: list[MigratedStep]
    cancelled: list[CancelledStep]
    retimed: list[RetimedStep]
    updated: list[UpdatedStep]
    kept: list[Short] = Field(description="step keys left as they were (already sent, …)")
    unchanged: list[Short]
