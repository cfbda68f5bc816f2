"""The dispatch command, scheduler → dispatcher (``dispatch.requested``, topic
``topics.dispatch``, keyed by customer id): everything the dispatcher needs to render and send
one step, and to re-check it at send time.

The scheduler builds the command with this model and the dispatcher's intake
(``services.dispatcher.model.parse_command``) decodes it with the same model (tolerantly: a
field a newer scheduler adds is dropped), so a malformed command dead-letters at decode time
naming the field: required strings within their limits (``idempotency_key`` ≤ 200,
``case_id`` ≤ 36, ``step_key`` ≤ 100, ``template`` ≤ 100, none blank), a registered channel, a
customer with an id, a send window of local ``HH:MM`` times (start before end) in an IANA zone,
an aware ``expires_at``.

``channel`` is any channel of the registry (``shared.channels``): the built-ins, which the JSON
schema lists, and one a deployment registers (README: "Adding a channel").
"""

from __future__ import annotations

import functools
from datetime import time
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from shared import channels
from shared.contracts.base import Channel, ChurnReason, Id, Published, Time
from shared.localtime import SendWindow


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown IANA timezone {value[:64]!r}") from None
    return value


def _registered(value: str) -> str:
    channels.spec(value)  # UnknownChannelError (a ValueError) names the known channels
    return value


def _suppressible(value: str) -> str:
    if value not in channels.address_fields():
        raise ValueError(
            f"{value[:40]!r} is not a channel with a suppressible address "
            f"(known: {', '.join(channels.address_fields())})"
        )
    return value


RegisteredChannel = Annotated[
    str,
    AfterValidator(_registered),
    WithJsonSchema(TypeAdapter(Channel).json_schema()),
]
"""A channel of the registry (``shared.channels.REGISTRY``): a built-in one (the JSON schema
lists those) or one registered since. Every event the dispatcher reads or writes about a
message names its channel with this type, so a registered channel goes end to end."""
AddressChannel = Annotated[
    str,
    AfterValidator(_suppressible),
    WithJsonSchema(
        {"enum": [s.name for s in channels.BUILTIN if s.suppressible and s.address_field]}
        | {"type": "string"}
    ),
]
"""A channel whose recipient is an address that can go on the suppression list (the
registry's ``suppressible`` channels with an ``address_field``: email, SMS)."""

IdempotencyKey = Annotated[
    str, StringConstraints(min_length=1, max_length=200), AfterValidator(_not_blank)
]
CaseId = Annotated[str, StringConstraints(min_length=1, max_length=36), AfterValidator(_not_blank)]
StepKey = Annotated[
    str, StringConstraints(min_length=1, max_length=100), AfterValidator(_not_blank)
]
TemplateName = Annotated[
    str, StringConstraints(min_length=1, max_length=100), AfterValidator(_not_blank)
]
LocalTime = Annotated[
    str,
    StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$"),
    Field(description="local wall time HH:MM"),
]
Short = Annotated[str, StringConstraints(max_length=200)]


class DispatchCustomer(Published):
    """The recipient, from the scheduler's customer view at fire time."""

    id: Id
    email: Annotated[str, StringConstraints(max_length=254)] | None
    phone: Annotated[str, StringConstraints(max_length=64)] | None = Field(description="E.164")
    name: Short | None
    locale: Annotated[str, StringConstraints(max_length=35)] | None
    timezone: Annotated[str, StringConstraints(max_length=64)] | None
    plan: Short | None
    crm_owner: Short | None
    crm_contact_id: Short | None = Field(
        default=None,
        description="the CRM's contact id (HubSpot: the contact the task is associated with); "
        "absent: the dispatcher looks the contact up by email",
    )


class SendWindowSpec(Published):
    """The customer's send window in their zone: the dispatcher holds a late delivery until it
    opens again."""

    start: LocalTime
    end: LocalTime
    timezone: Annotated[str, AfterValidator(_zone), Field(description="IANA zone name")]

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: str, info: ValidationInfo) -> str:
        start = info.data.get("start")
        if start is not None and (problem := _window_problem(start, end)) is not None:
            raise ValueError(problem)
        return end


@functools.lru_cache(maxsize=1024)
def _window_problem(start: str, end: str) -> str | None:
    """Why ``start`` to ``end`` is not a send window, or ``None`` (cached: every command carries
    one of a handful of windows, and the dispatcher decodes each command)."""
    try:
        SendWindow(time.fromisoformat(start), time.fromisoformat(end))
    except ValueError as exc:
        return str(exc)
    return None


class DispatchCommand(Published):
    """``dispatch.requested``: send one step of a case now."""

    idempotency_key: IdempotencyKey = Field(description="<case_id>:<step_key>")
    case_id: CaseId
    step_id: int = Field(ge=1)
    step_key: StepKey
    playbook: Short
    playbook_version: int = Field(ge=1)
    channel: RegisteredChannel
    template: TemplateName
    offer: Short | None
    is_discount: bool
    variant: Short | None
    valid_until: Time | None = Field(description="until when the offer holds (with an offer)")
    customer: DispatchCustomer
    reason: ChurnReason | None = Field(description="the churn's normalised reason")
    features: list[Short] = Field(description="the released feature a triggered step names")
    feature_description: Annotated[str, StringConstraints(max_length=2000)] | None
    competitor: Short | None = Field(
        default=None, description="competitor.changed: the competitor the customer left for"
    )
    requested_at: Time
    send_window: SendWindowSpec | None = Field(
        default=None,
        description="null: the channel has no quiet hours (absent in commands queued before "
        "quiet hours were sent along: sent at once)",
    )
    expires_at: Time | None = Field(
        default=None,
        description="the case horizon: never sent at or after it (the scheduler always writes "
        "it; absent in commands queued before it was sent along)",
    )
