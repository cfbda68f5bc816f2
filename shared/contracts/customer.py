"""What ingest publishes about customers (topic ``topics.domain``, keyed by customer id; a
feature release by its feature id) and the customer-wide events: ``customer.erased`` (the
scheduler, topic ``topics.erasure``) and ``customer.unsubscribed`` (the dispatcher, topic
``topics.outcomes``).

Fields without a default are always written by the producer (``None`` shown as ``null``);
fields with a default appear only in some variants of the event.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from shared.contracts.base import (
    Channel,
    ChannelOrAll,
    ChurnReason,
    CustomerStatus,
    Engagement,
    EpisodeKind,
    Id,
    Published,
    Time,
)
from shared.contracts.dispatch import AddressChannel, RegisteredChannel

Short = Annotated[str, StringConstraints(max_length=200)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class CustomerSnapshot(Published):
    """The customer's profile and state as ingest folded it; every field is written (``null``
    when unknown). The scheduler stores it as its own customer view."""

    id: Id
    email: Annotated[str, StringConstraints(max_length=254)] | None
    phone: Annotated[str, StringConstraints(max_length=64)] | None = Field(description="E.164")
    name: Short | None
    locale: Annotated[str, StringConstraints(max_length=35)] | None
    timezone: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        description="IANA zone name"
    )
    plan: Short | None
    mrr_minor: int | None = Field(ge=0, description="monthly recurring revenue, minor units")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None
    customer_since: Time | None
    engagement: Engagement | None
    crm_owner: Short | None
    fiscal_year_start_month: int | None = Field(
        default=None,
        ge=1,
        le=12,
        description="the month (1-12) the customer's fiscal year starts (absent: not known)",
    )
    status: CustomerStatus
    consent: dict[Channel, bool] = Field(
        description="per channel: true given, false withdrawn; absent: no answer recorded"
    )
    opted_out_all: bool


class ChurnEpisodeData(Published):
    """A churn episode as published: no free-text comment (it may hold personal data)."""

    id: Id
    kind: EpisodeKind
    reason: ChurnReason = Field(description="normalised reason")
    reason_raw: Short | None = Field(description="the reason as the billing system gave it")
    feature: Short | None
    competitor: Short | None
    occurred_at: Time
    mrr_at_churn_minor: int | None = Field(ge=0)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None
    tenure_days: int | None = Field(ge=0)
    days_inactive: int | None = Field(
        default=None, ge=0, description="user_inactive: days without activity, as detected"
    )
    usage_drop_percent: float | None = Field(
        default=None, ge=0, le=100, description="user_inactive: how far usage dropped, as detected"
    )


class ChurnRecorded(Published):
    """``churn.recorded``: a churn episode opened (it supersedes older open ones)."""

    customer: CustomerSnapshot
    episode: ChurnEpisodeData
    superseded: list[Id] = Field(description="ids of the open episodes this one ended")


class CustomerReturned(Published):
    """``customer.returned``: a churned or inactive customer came back."""

    customer: CustomerSnapshot
    kind: Literal["reactivated", "activity"] = Field(
        description="a reactivated subscription, or product activity after inactivity"
    )
    returned_at: Time
    previous_status: CustomerStatus
    ended_episodes: list[Id]
    mrr_minor: int | None = Field(ge=0)


class CustomerActivity(Published):
    """``customer.activity``: product activity (for a churned customer every signal, for
    everyone else the first of each clock hour)."""

    customer_id: Id
    at: Time
    status: CustomerStatus = Field(description="the customer's status before this activity")


class ProfileUpdated(Published):
    """``customer.updated``: the profile changed."""

    customer: CustomerSnapshot


class ConsentChanged(Published):
    """``consent.changed``: consent withdrawn on a channel (or ``all``: every channel)."""

    customer_id: Id
    channel: ChannelOrAll
    granted: bool
    at: Time
    customer: CustomerSnapshot


class FeatureAnnounced(Published):
    """``feature.released`` (keyed by the feature id): wakes the cases waiting for it."""

    feature: Id
    name: Short | None
    description: Annotated[str, StringConstraints(max_length=2000)] | None
    released_at: Time


Tag = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class FeedbackRecorded(Published):
    """``feedback.received``: an exit-survey answer; the scheduler refines the open case's
    reason with it (and may move the case to the playbook of that reason). No free-text
    comment (it may hold personal data: ingest keeps it on the episode)."""

    customer_id: Id
    reason: ChurnReason = Field(description="the answer's reason, normalised")
    reason_raw: Short | None = Field(description="the reason as the survey gave it")
    tags: list[Tag]
    episode_id: Id | None = Field(description="the open churn episode it refines (none open: null)")
    received_at: Time


class IssueAnnounced(Published):
    """``issue.resolved`` (keyed by the issue id): wakes the open cases whose reason, feature or
    tags it names."""

    issue: Id
    title: Short | None
    tags: list[Tag]
    features: list[Tag]
    resolved_at: Time


class CompetitorNews(Published):
    """``competitor.changed`` (keyed by the competitor): wakes the open cases of customers
    who left for that competitor."""

    competitor: Short
    kind: Literal["price_increase", "outage", "sunset", "other"]
    note: Annotated[str, StringConstraints(max_length=2000)] | None
    changed_at: Time


class CustomerErased(Published):
    """``customer.erased`` (GDPR): every service removes the person's contact points, names
    and free text; the dispatcher keeps the address hashes on its suppression list."""

    customer_id: Id
    address_hashes: dict[AddressChannel, Sha256] = Field(
        description="SHA-256 (hex) of each normalised address, per channel with a suppressible "
        "address (the channel registry's)"
    )
    erased_at: Time


class CustomerUnsubscribed(Published):
    """``customer.unsubscribed``: the person asked for no more messages.

    Three producers, one event: the unsubscribe link (``method``, ``unsubscribed_at``), a
    provider's report through a webhook, and a Twilio STOP at send time (both of these carry
    the message's outcome fields, the webhook also ``occurred_at`` and ``provider_event_id``).
    The scheduler closes the open case and records the opt-out on the step when named."""

    customer_id: Id
    channel: RegisteredChannel
    method: Literal["one_click", "page"] | None = None
    unsubscribed_at: Time | None = None
    idempotency_key: Short | None = None
    case_id: Short | None = None
    step_key: Short | None = None
    step_id: int | None = None
    provider: Short | None = None
    provider_message_id: str | None = None
    template: Short | None = None
    variant: Short | None = None
    crm_owner: Short | None = None
    playbook: Short | None = None
    reason: str | None = None
    occurred_at: str | None = Field(default=None, description="as the provider reported it")
    provider_event_id: str | None = None
