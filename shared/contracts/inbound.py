"""Lifecycle events from billing and product systems: the ``data`` of each inbound type.

Types arrive as ``<prefix>.<name>`` (``com.example.subscription.cancelled``; the prefix is
``ingest.event_type_prefix``) on the inbound topics or ``POST /v1/events``; ingest decodes
them with these models (``services/ingest/events.py``, through ``registry.INBOUND``), so they
are ingest's rules, in one place: unknown fields ignored, whitespace stripped, every string
bounded and free of control characters (free text may hold tab and line breaks), every time
aware and within ``shared.cloudevents.TIME_RANGE``, every amount within a PostgreSQL bigint.
Email is normalised (domain lower-cased), phone to E.164, currency upper-cased, times to UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import AfterValidator, Field, StringConstraints

from shared.cloudevents import control_character, utc_in_range
from shared.contracts.base import ChannelOrAll, Engagement, Received

BIGINT_MAX = 2**63 - 1
"""The largest value of a PostgreSQL bigint (``mrr_minor`` and friends are stored in one)."""
MAX_SHORT_TEXT = 200
MAX_COMMENT = 5000
MAX_DESCRIPTION = 2000
MAX_DAYS = 100_000

# The WHATWG HTML "valid e-mail address" rule (what browsers apply to <input type=email>).
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


Email = Annotated[str | None, AfterValidator(_email), Field(json_schema_extra={"format": "email"})]
Phone = Annotated[
    str | None, AfterValidator(_e164), Field(description="E.164, or anything phonenumbers reads")
]
TimeZone = Annotated[str | None, AfterValidator(_timezone), Field(description="IANA zone name")]
Currency = Annotated[
    str | None, AfterValidator(_currency), Field(description="ISO 4217 code (3 letters)")
]
AwareTime = Annotated[datetime | None, AfterValidator(_aware)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_line)]
ShortText = Annotated[str, StringConstraints(max_length=MAX_SHORT_TEXT), AfterValidator(_line)]
Comment = Annotated[str, StringConstraints(max_length=MAX_COMMENT), AfterValidator(_paragraphs)]
Description = Annotated[
    str, StringConstraints(max_length=MAX_DESCRIPTION), AfterValidator(_paragraphs)
]
Minor = Annotated[int, Field(ge=0, le=BIGINT_MAX)]


class Profile(Received):
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
    fiscal_year_start_month: int | None = Field(
        default=None, ge=1, le=12, description="the month (1-12) the customer's fiscal year starts"
    )

    def fields_set(self) -> dict[str, Any]:
        """The fields the event actually carried (absent ones leave the profile as it is)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k in PROFILE_FIELDS}


PROFILE_FIELDS = frozenset(Profile.model_fields)


class CustomerEvent(Received):
    """What every customer event carries: who, and optionally their profile."""

    customer_id: Id
    customer: Profile = Field(default_factory=Profile)


class SubscriptionCancelled(CustomerEvent):
    """A paying customer cancelled. ``reason`` is raw; ingest normalises it."""

    reason: ShortText | None = None
    comment: Comment | None = None
    feature: ShortText | None = None
    competitor: ShortText | None = None
    mrr_minor: Minor | None = None
    currency: Currency = None


class SubscriptionReactivated(CustomerEvent):
    """A customer (re)started paying: ``subscription.reactivated`` and ``.created``."""

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
    """Product activity of a customer."""


class LeadLost(CustomerEvent):
    reason: ShortText | None = None
    comment: Comment | None = None
    competitor: ShortText | None = None
    feature: ShortText | None = None


class FeatureReleased(Received):
    """A feature shipped (no customer): wakes the cases of customers who asked for it."""

    feature: Id
    name: ShortText | None = None
    description: Description | None = None


Tag = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_line)]
MAX_TAGS = 50


class FeedbackReceived(CustomerEvent):
    """An exit-survey answer: refines the reason of the customer's open churn episode."""

    reason: ShortText | None = None
    comment: Comment | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class IssueResolved(Received):
    """A problem got fixed (no customer): wakes the cases whose reason, feature or tags it
    names ("we fixed what made you leave")."""

    issue: Id
    title: ShortText | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    features: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


CompetitorChange = Literal["price_increase", "outage", "sunset", "other"]


class CompetitorChanged(Received):
    """Something happened at a competitor (no customer): wakes the cases of customers who left
    for it."""

    competitor: Id
    kind: CompetitorChange = "other"
    note: Description | None = None


class ConsentWithdrawn(CustomerEvent):
    # one Literal (not a union of two): an error names the field, not a union member
    channel: ChannelOrAll = "all"


class CustomerUpdated(CustomerEvent):
    """Profile changes only."""


INBOUND: dict[str, type[Received]] = {
    "subscription.cancelled": SubscriptionCancelled,
    "subscription.reactivated": SubscriptionReactivated,
    "subscription.created": SubscriptionReactivated,
    "trial.expired": TrialExpired,
    "user.inactive": UserInactive,
    "user.active": UserActive,
    "lead.lost": LeadLost,
    "feature.released": FeatureReleased,
    "feedback.received": FeedbackReceived,
    "issue.resolved": IssueResolved,
    "competitor.changed": CompetitorChanged,
    "consent.withdrawn": ConsentWithdrawn,
    "customer.updated": CustomerUpdated,
}
"""Inbound type names (without the configurable prefix) → the model of their ``data``."""
