"""What the billing mappings share. Pure: no I/O.

- ``Mapped``: one provider event read into one of our inbound events (or ignored);
- ``monthly`` / ``monthly_minor``: a recurring price normalised to a month, in minor units
  (items are summed exactly and rounded once);
- ``zone_for``: a time zone from a phone number or an address country;
- ``conform``: drop the optional fields our inbound contract would refuse, so a customer's odd
  phone number never costs the whole cancellation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from functools import lru_cache
from typing import Any

import phonenumbers
from phonenumbers import timezone as phone_zones
from pydantic import ValidationError

from shared.contracts.inbound import INBOUND, MAX_COMMENT, MAX_SHORT_TEXT

log = logging.getLogger(__name__)


class BillingPayloadError(ValueError):
    """The body is not the provider's webhook shape (answered 400)."""


@dataclass(frozen=True)
class Mapped:
    """One provider event. ``name`` is our inbound type without its prefix
    (``subscription.cancelled``), or ``None`` when we do not act on this type."""

    provider: str
    event_id: str
    provider_type: str
    occurred_at: datetime
    name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


# a month per interval unit: a price every `count` `unit`s is worth amount * PER_MONTH / count
PER_MONTH: Mapping[str, Fraction] = {
    "day": Fraction(365, 12),
    "week": Fraction(365, 7 * 12),
    "month": Fraction(1),
    "year": Fraction(1, 12),
}


def monthly(amount: int, quantity: int, interval: str, count: int = 1) -> Fraction | None:
    """``amount`` (minor units) x ``quantity`` every ``count`` ``interval``s, per month, exactly;
    ``None`` for an interval we do not know or a count below 1."""
    per = PER_MONTH.get(interval)
    if per is None or count < 1 or amount < 0 or quantity < 0:
        return None
    return Fraction(amount * quantity) * per / count


def round_half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2))


def monthly_minor(amount: int, quantity: int, interval: str, count: int = 1) -> int | None:
    """``monthly`` rounded half up to a whole minor unit."""
    exact = monthly(amount, quantity, interval, count)
    return None if exact is None else round_half_up(exact)


def as_int(value: Any) -> int | None:
    """An integer from JSON: an int (not a bool), or a string of digits (Paddle's amounts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def text(value: Any, limit: int = MAX_SHORT_TEXT) -> str | None:
    """A non-empty string, cut to ``limit`` characters; anything else ``None``."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value[:limit] if value else None


def comment(value: Any) -> str | None:
    return text(value, MAX_COMMENT)


def unix_time(value: Any) -> datetime | None:
    seconds = as_int(value)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def iso_time(value: Any) -> datetime | None:
    """An RFC 3339 time with an offset (Paddle's ``occurred_at``)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def phone_e164(raw: Any, country: str | None) -> str | None:
    """A phone number in E.164 (a local number read in ``country``), or ``None``."""
    if not isinstance(raw, str) or not raw.strip() or len(raw) > 64:
        return None
    try:
        number = phonenumbers.parse(raw, (country or "").upper() or None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


@lru_cache(maxsize=512)
def _country_zone(country: str) -> str | None:
    example = phonenumbers.example_number_for_type(country, phonenumbers.PhoneNumberType.FIXED_LINE)
    if example is None:
        return None
    return _one_zone(phone_zones.time_zones_for_geographical_number(example))


def _one_zone(zones: Iterable[str]) -> str | None:
    found = [z for z in zones if z != phone_zones.UNKNOWN_TIMEZONE]
    return found[0] if len(found) == 1 else None


def zone_for(phone: str | None, country: str | None) -> str | None:
    """The customer's time zone where nothing better is known: the zone of their phone
    number's area if it has exactly one, else their address country's main zone (the zone of
    the country's example landline number in libphonenumber: Europe/Helsinki for FI,
    America/New_York for US), else ``None``."""
    if phone:
        try:
            number = phonenumbers.parse(phone, None)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None:
            zone = _one_zone(phone_zones.time_zones_for_geographical_number(number))
            if zone is not None:
                return zone
    if isinstance(country, str) and len(country) == 2 and country.isalpha():
        return _country_zone(country.upper())
    return None


def locale_of(value: Any) -> str | None:
    """A BCP 47-ish locale (``fi``, ``en-GB``, ``pt_BR``), or ``None``."""
    raw = text(value, 35)
    if raw is None:
        return None
    parts = raw.replace("_", "-").split("-")
    if not (2 <= len(parts[0]) <= 3 and parts[0].isalpha()):
        return None
    if not all(2 <= len(p) <= 8 and p.isalnum() for p in parts[1:]):
        return None
    return "-".join(parts)


def conform(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the optional fields the inbound contract of ``name`` refuses (each
    dropped field is logged by name, never its value). A bad ``customer_id`` stays: ingest
    refuses the event, naming it."""
    model = INBOUND[name]
    for _ in range(32):
        try:
            model.model_validate(data)
        except ValidationError as exc:
            loc = tuple(exc.errors()[0]["loc"])
            if not _drop(data, loc):
                return data
            log.warning(
                "a billing event's field is not valid; it is left out",
                extra={"event_type": name, "field": ".".join(str(p) for p in loc)},
            )
            continue
        return data
    return data


def _drop(data: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    if not loc or loc[0] == "customer_id":
        return False
    if loc[0] == "customer" and len(loc) > 1:
        profile = data.get("customer")
        if isinstance(profile, dict) and loc[1] in profile:
            del profile[loc[1]]
            return True
        return False
    if loc[0] in data:
        del data[loc[0]]
        return True
    return False


def own_id(key: str | None, *sources: Any) -> str | None:
    """The merchant's own customer id: the value under ``key`` in the first of ``sources``
    (metadata objects) that has one (a string, or an integer written as one)."""
    if key is None:
        return None
    for source in sources:
        value = obj(source).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        found = text(value)
        if found:
            return found
    return None


def compact(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries that are not ``None``."""
    return {k: v for k, v in values.items() if v is not None}
