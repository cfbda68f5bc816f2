"""The inbound event types and their payloads, validated field by field.

Types arrive as ``<prefix>.<name>`` where the prefix is configurable reverse DNS
(``com.example.subscription.cancelled``). A payload that fails validation raises
``InvalidEvent`` naming the field.
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
    ValidationError,
)

from shared.cloudevents import CloudEvent
from shared.errors import InvalidEvent

Channel = Literal["email", "sms", "crm", "webhook"]
Engagement = Literal["high", "medium", "low"]


# The WHATWG HTML "valid e-mail address" rule (what browsers apply to <input type=email>):
# a fast, well-defined syntax check. Whether the address exists is the provider's answer;
# a hard bounce suppresses it.
_EMAIL = re.compile(
    r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)


def _email(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 254 or not _EMAIL.match(value):
        raise ValueError("not a valid email address")
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def _e164(value: str | None) -> str | None:
    if value is None:
        return None
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
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


def _currency(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) != 3 or not value.isalpha():
        raise ValueError("must be a 3-letter ISO 4217 code")
    return value.upper()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a UTC offset")
    return value


Email = Annotated[str | None, AfterValidator(_email)]
Phone = Annotated[str | None, AfterValidator(_e164)]
TimeZone = Annotated[str | None, AfterValidator(_timezone)]
Currency = Annotated[str | None, AfterValidator(_currency)]
AwareTime = Annotated[datetime | None, AfterValidator(_aware)]
Id = Annotated[str, Field(min_length=1, max_length=200)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)


class Profile(_Payload):
    """Profile fields any customer event may carry; absent means unchanged."""

    email: Email = None
    phone: Phone = None
    name: str | None = Field(default=None, max_length=200)
    locale: str | None = Field(
        default=None, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"
    )
    timezone: TimeZone = None
    plan: str | None = Field(default=None, max_length=200)
    mrr_minor: int | None = Field(default=None, ge=0)
    currency: Currency = None
    customer_since: AwareTime = None
    engagement: Engagement | None = None
    crm_owner: str | None = Field(default=None, max_length=200)

    def fields_set(self) -> dict[str, Any]:
        """The fields the event actually carried (absent ones leave the profile as it is)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k in _PROFILE_FIELDS}


_PROFILE_FIELDS = frozenset(Profile.model_fields)


class CustomerEvent(_Payload):
    customer_id: Id
    customer: Profile = Field(default_factory=Profile)


class SubscriptionCancelled(CustomerEvent):
    reason: str | None = Field(default=None, max_length=200)
    comment: str | None = Field(default=None, max_length=5000)
    feature: str | None = Field(default=None, max_length=200)
    competitor: str | None = Field(default=None, max_length=200)
    mrr_minor: int | None = Field(default=None, ge=0)
    currency: Currency = None


class SubscriptionReactivated(CustomerEvent):
    plan: str | None = Field(default=None, max_length=200)
    mrr_minor: int | None = Field(default=None, ge=0)
    currency: Currency = None


class TrialExpired(CustomerEvent):
    reason: str | None = Field(default=None, max_length=200)
    comment: str | None = Field(default=None, max_length=5000)
    feature: str | None = Field(default=None, max_length=200)


class UserInactive(CustomerEvent):
    days_inactive: int | None = Field(default=None, ge=0)
    usage_drop_percent: float | None = Field(default=None, ge=0, le=100)


class UserActive(CustomerEvent):
    pass


class LeadLost(CustomerEvent):
    reason: str | None = Field(default=None, max_length=200)
    comment: str | None = Field(default=None, max_length=5000)
    competitor: str | None = Field(default=None, max_length=200)
    feature: str | None = Field(default=None, max_length=200)


class FeatureReleased(_Payload):
    feature: Id
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)


class ConsentWithdrawn(CustomerEvent):
    channel: Channel | Literal["all"] = "all"


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
        field = "data." + ".".join(str(p) for p in first["loc"])
        raise InvalidEvent("invalid_payload", first["msg"], field) from None
    return Inbound(name=name, payload=payload, occurred_at=occurred_at)
