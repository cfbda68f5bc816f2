"""The dispatch command, scheduler → dispatcher (``dispatch.requested``, topic
``topics.dispatch``, keyed by customer id): everything the dispatcher needs to render and send
one step, and to re-check it at send time.

Every command this model accepts is one the dispatcher's intake
(``services.dispatcher.model.parse_command``) accepts: the same required strings and length
limits (``idempotency_key`` ≤ 200, ``case_id`` ≤ 36, ``step_key`` ≤ 100, ``template`` ≤ 100, none
blank), the same channels, a customer with an id, a send window that parses the way the
dispatcher parses it (local ``HH:MM`` times, start before end, an IANA zone) and an aware
``expires_at``. The model is stricter where the scheduler always writes more (types of the
other fields, ``features`` a list); ``tests/unit/test_contracts_dispatch.py`` holds the two
together.
"""

from __future__ import annotations

from datetime import time
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, StringConstraints, ValidationInfo, field_validator

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
        if start is not None:
            SendWindow(time.fromisoformat(start), time.fromisoformat(end))
        return end


class DispatchCommand(Published):
    """``dispatch.requested``: send one step of a case now."""

    idempotency_key: IdempotencyKey = Field(description="<case_id>:<step_key>")
    case_id: CaseId
    step_id: int = Field(ge=1)
    step_key: StepKey
    playbook: Short
    playbook_version: int = Field(ge=1)
    channel: Channel
    template: TemplateName
    offer: Short | None
    is_discount: bool
    variant: Short | None
    valid_until: Time | None = Field(description="until when the offer holds (with an offer)")
    customer: DispatchCustomer
    reason: ChurnReason | None = Field(description="the churn's normalised reason")
    features: list[Short] = Field(description="the released feature a triggered step names")
    feature_description: Annotated[str, StringConstraints(max_length=2000)] | None
    requested_at: Time
    send_window: SendWindowSpec | None = Field(description="null: the channel has no quiet hours")
    expires_at: Time = Field(description="the case horizon: never sent at or after it")
