"""The inbound event types and their payloads, validated field by field.

Types arrive as ``<prefix>.<name>`` where the prefix is configurable reverse DNS
(``com.example.subscription.cancelled``). A payload that fails validation raises
``InvalidEvent`` naming the field — and nothing else: whatever the payload, what passes fits
the columns it is stored in (``shared/db/tables.py``): every string has a maximum length and no
control character (free text — ``comment``, ``description`` — may hold tab and line breaks),
every time lies in ``shared.cloudevents.TIME_RANGE``, every integer fits a PostgreSQL bigint.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from shared.channels import ChannelName, ChannelNameOrAll
from shared.cloudevents import CloudEvent, control_character, utc_in_range
from shared.errors import InvalidEvent

BIGINT_MAX = 2**63 - 1
"""The largest value of a PostgreSQL bigint (``mrr_minor`` and friends are stored in one)."""
MAX_SHORT_TEXT = 200
MAX_COMMENT = 5000
MAX_DESCRIPTION = 2000
MAX_DAYS = 100_000

Channel = ChannelName  # the channel registry (shared.channels)
Engagement = Literal["high", "medium", "low"]


# The WHATWG HTML "valid e-mail address" rule (what browsers apply to <input type=email>):
# a fast, well-defined syntax check. Whether the address exists is the provider's answer;
# a hard bounce suppresses it.
_EMAIL = re.compile(
    r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)


def _line(value: str) -> str:
    bad = control_character(value)
    if bad is not None:
        raise ValueError(f"control character {bad} is not allowed")
    return value


def _paragraphs(value: str) -> str:
    bad = control_character(value, multiline=True)
    if bad is not None:
        raise ValueError(f"control character {bad} is not allowed")
    return value


def _email(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        raise ValueError("not a valid email address")
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def _e164(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or control_character(value) is not None:
        raise ValueError("not a phone number in international form")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number in international form: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _timezone(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or control_character(value) is not None:
        raise ValueError("not an IANA timezone name")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


def _currency(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) != 3 or not (value.isascii() and value.isalpha()):
        raise ValueError("must be a 3-letter ISO 4217 code")
    return value.upper()


def _aware(value: datetime | None) -> datetime | None:
    """An aware time within ``TIME_RANGE``, in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("needs a UTC offset")
    return utc_in_range(value)


Email = Annotated[str | None, AfterValidator(_email)]
Phone = Annotated[str | None, AfterValidator(_e164)]
TimeZone = Annotated[str | None, AfterValidator(_timezone)]
Currency = Annotated[str | None, AfterValidator(_currency)]
AwareTime = Annotated[datetime | None, AfterValidator(_aware)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_line)]
ShortText = Annotated[str, StringConstraints(max_length=MAX_SHORT_TEXT), AfterValidator(_line)]
Comment = Annotated[str, StringConstraints(max_length=MAX_COMMENT), AfterValidator(_paragraphs)]
Description = Annotated[
    str, StringConstraints(max_length=MAX_DESCRIPTION), AfterValidator(_paragraphs)
]
Minor = Annotated[int, Field(ge=0, le=BIGINT_MAX)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)


class Profile(_Payload):
    """Profile fields any customer event may carry; absent means unchanged."""

    email: Email = None
    phone: Phone = None
    name: ShortText | None = None
    locale: str | None = Field(
        default=None, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"
    )
    timezone: TimeZone = None
    plan: ShortText | None = None
    mrr_minor: Minor | None = None
    currency: Currency = None
    customer_since: AwareTime = None
    engagement: Engagement | None = None
    crm_owner: ShortText | None = None

    def fields_set(self) -> dict[str, Any]:
        """The fields the event actually carried (absent ones leave the profile as it is)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k in _PROFILE_FIELDS}


_PROFILE_FIELDS = frozenset(Profile.model_fields)


class CustomerEvent(_Payload):
    customer_id: Id
    customer: Profile = Field(default_factory=Profile)


class SubscriptionCancelled(CustomerEvent):
    reason: ShortText | None = None
    comment: Comment | None = None
    feature: ShortText | None = None
    competitor: ShortText | None = None
    mrr_minor: Minor | None = None
    currency: Currency = None


class SubscriptionReactivated(CustomerEvent):
    plan: ShortText | None = None
    mrr_minor: Minor | None = None
    currency: Currency = None


class TrialExpired(CustomerEvent):
    reason: ShortText | None = None
    comment: Comment | None = None
    feature: ShortText | None = None


class UserInactive(CustomerEvent):
    days_inactive: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    usage_drop_percent: float | None = Field(default=None, ge=0, le=100)


class UserActive(CustomerEvent):
    pass


class LeadLost(CustomerEvent):
    reason: ShortText | None = None
    comment: Comment | None = None
    competitor: ShortText | None = None
    feature: ShortText | None = None


class FeatureReleased(_Payload):
    feature: Id
    name: ShortText | None = None
    description: Description | None = None


class ConsentWithdrawn(CustomerEvent):
    # one Literal (not a union of two): an error names the field, not a union member
    channel: ChannelNameOrAll = "all"


class CustomerUpdated(CustomerEvent):
    pass


PAYLOADS: dict[str, type[_Payload]] = {
    "subscription.cancelled": SubscriptionCancelled,
    "subscription.reactivated": SubscriptionReactivated,
    "subscription.created": SubscriptionReactivated,
    "trial.expired": TrialExpired,
    "user.inactive": UserInactive,
    "user.active": UserActive,
    "lead.lost": LeadLost,
    "feature.released": FeatureReleased,
    "consent.withdrawn": ConsentWithdrawn,
    "customer.updated": CustomerUpdated,
}


class Inbound(BaseModel):
    """A validated inbound event: its short name, payload and event time."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    payload: Any
    occurred_at: datetime


def decode(event: CloudEvent, prefix: str, now: datetime, max_future_skew_s: int) -> Inbound:
    """Validate an inbound CloudEvent's type, time and payload. Pure."""
    head = prefix.rstrip(".") + "."
    if not event.type.startswith(head) or event.type[len(head) :] not in PAYLOADS:
        raise InvalidEvent(
            "unknown_type", f"{event.type!r} is not an event type ingest accepts", "type"
        )
    name = event.type[len(head) :]
    occurred_at = event.time or now
    if (occurred_at - now).total_seconds() > max_future_skew_s:
        raise InvalidEvent(
            "future_time", f"event time {occurred_at.isoformat()} is in the future", "time"
        )
    if event.data is None:
        raise InvalidEvent("invalid_payload", "the event carries no data", "data")
    if not isinstance(event.data, dict):
        raise InvalidEvent("invalid_payload", "data must be a JSON object", "data")
    try:
        payload = PAYLOADS[name].model_validate(event.data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["data", *(str(p) for p in first["loc"])])
        raise InvalidEvent("invalid_payload", first["msg"], field) from None
    return Inbound(name=name, payload=payload, occurred_at=occurred_at)
