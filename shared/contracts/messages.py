"""What happened to a message, dispatcher → everyone (``message.*``, topic ``topics.outcomes``,
keyed by customer id).

``sent``, ``failed`` and ``suppressed`` come from the sender (and ``suppressed`` also from an
erasure); ``delivered``, ``opened``, ``clicked``, ``bounced``, ``complained`` (and a provider's
``failed``) from provider webhooks, which add ``occurred_at`` and ``provider_event_id``. The
scheduler records each on its step; reports count them.

The dispatcher builds every one with :class:`MessageOutcome` (``services.dispatcher.model.
outcome``, which takes the model from the contract registry by event type), so what it emits is
what this contract declares; ``channel`` is any registered channel (``RegisteredChannel``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from shared.contracts.base import Id, Published
from shared.contracts.dispatch import RegisteredChannel

Short = Annotated[str, StringConstraints(max_length=200)]


class MessageOutcome(Published):
    """The data of every ``message.*`` event."""

    idempotency_key: Short = Field(description="the dispatch command's: <case_id>:<step_key>")
    case_id: Short
    step_key: Short
    step_id: int | None
    customer_id: Id
    channel: RegisteredChannel
    provider: Short | None = Field(description="the provider's label; null: none was called")
    provider_message_id: str | None
    template: Short
    variant: Short | None
    crm_owner: Short | None
    playbook: Short | None
    reason: str | None = Field(
        default=None, description="why it failed or was suppressed (absent when sent)"
    )
    occurred_at: str | None = Field(
        default=None, description="webhook events: the time as the provider reported it"
    )
    provider_event_id: str | None = Field(
        default=None, description="webhook events: the provider's event id"
    )
    confirmed_by: Literal["webhook", "resend", "search"] | None = Field(
        default=None,
        description="message.sent of a send a crash left unknown: what confirmed the provider "
        "had it (its webhook, a resend with the same key it deduplicated, its message search)",
    )
