"""The building blocks of every event contract: two base models (what we publish, what billing
and product systems send us), the time type, and the vocabularies more than one event uses.

Direction decides strictness:

- ``Published`` (every event winback's own services emit): ``extra="forbid"``. A producer
  cannot emit a field the contract does not declare (constructing the model refuses it, and the
  contract tests validate every emitted payload strictly), so the contract and the code cannot
  drift apart. A *consumer* decodes with ``decode(..., tolerant=True)`` (unknown fields are
  dropped, declared ones checked): a producer deployed before its consumers may add a field
  without its events being dead-lettered in the meantime.
- ``Received`` (billing and product lifecycle events from outside): ``extra="ignore"`` and
  surrounding whitespace stripped. Those systems add fields of their own whenever they like;
  refusing them would dead-letter real churn.

Times are timezone-aware and travel as ``datetime.isoformat()`` strings
(``2026-03-02T08:00:00+00:00``), the form every producer has always written; they are parsed
with the same ``datetime.fromisoformat`` the consumers use (a trailing ``Z`` accepted), so a
time the contract accepts is one every consumer can read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
)

from shared.channels import ChannelName, ChannelNameOrAll
from shared.churn import ChurnReason
from shared.errors import InvalidEvent

__all__ = [
    "Channel",
    "ChannelOrAll",
    "ChurnReason",
    "CustomerStatus",
    "Engagement",
    "EpisodeKind",
    "Id",
    "Published",
    "Received",
    "Time",
    "field_of",
    "invalid_payload",
]

Channel: TypeAlias = ChannelName
"""The channels a message can go through (``shared.channels``, the channel registry)."""
ChannelOrAll: TypeAlias = ChannelNameOrAll
"""A channel, or ``all`` (a consent answer or opt-out that covers every channel)."""
Engagement: TypeAlias = Literal["high", "medium", "low"]
CustomerStatus: TypeAlias = Literal[
    "unknown", "active", "inactive", "churned", "trial_expired", "lead_lost"
]
"""One word for a customer's state, as ingest folds it (churn-like lifecycle first)."""
EpisodeKind: TypeAlias = Literal[
    "subscription_cancelled", "trial_expired", "lead_lost", "user_inactive"
]


def _parse_time(value: Any) -> Any:
    """An ISO 8601 string read the way the consumers read it; a ``datetime`` passes as is."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time string")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value[:40]!r}") from None


def _aware(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError("needs a UTC offset")
    return value


Time = Annotated[
    datetime,
    BeforeValidator(_parse_time),
    AfterValidator(_aware),
    PlainSerializer(lambda when: when.isoformat(), return_type=str, when_used="json"),
]
"""An aware time, on the wire as ``isoformat()`` (JSON Schema: string, format date-time)."""

Id = Annotated[str, StringConstraints(min_length=1, max_length=200)]
"""An identifier: a non-empty string of at most 200 characters."""


class Published(BaseModel):
    """The data of an event one of winback's services publishes (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_data(self) -> dict[str, Any]:
        """The event's ``data`` as it goes on the wire: JSON types, and exactly the fields the
        producer set (a field left at its default is not written; ``None`` set explicitly is
        written as ``null``)."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def decode(cls, data: Any, *, tolerant: bool = False) -> Self:
        """Validate ``data``; ``InvalidEvent`` names the first field at fault
        (``data.customer.id``). ``tolerant``: drop fields the contract does not know."""
        try:
            return cls.model_validate(data, extra="ignore" if tolerant else None)
        except ValidationError as exc:
            raise invalid_payload(exc) from None


class Received(BaseModel):
    """The data of an event another system sends us (see the module docstring)."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    def to_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def decode(cls, data: Any, *, tolerant: bool = True) -> Self:
        """Validate ``data``; ``InvalidEvent`` names the first field at fault."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid_payload(exc) from None


def field_of(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the field name our errors use: ``data.customer.email``,
    ``data.features.2``."""
    return ".".join(["data", *(str(part) for part in loc)])


def invalid_payload(exc: ValidationError) -> InvalidEvent:
    """The first validation error as an ``invalid_payload`` naming its field."""
    first = exc.errors()[0]
    return InvalidEvent("invalid_payload", first["msg"], field_of(tuple(first["loc"])))


NonNegative = Annotated[int, Field(ge=0)]
