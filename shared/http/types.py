"""Parameter and body types that accept exactly what the OpenAPI document says.

Pydantic's lax mode reads ``0.5`` or ``1700000000`` as a date or a date-time (a Unix time)
and refuses ``2.0`` for an integer in strict mode; the document says ``format: date``/
``date-time`` (ISO 8601) and ``type: integer`` (which JSON Schema lets be ``2.0``). These
types close both gaps, so the API answers 422 for what the document rules out and accepts
what it allows."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ISO_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, str | bytes):
            text = value.decode() if isinstance(value, bytes) else value
            if not pattern.match(text.strip()):
                raise ValueError(f"must be an ISO 8601 {what}")
        return value

    return check


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


IsoDate = Annotated[date, BeforeValidator(_iso(_ISO_DATE, "date (YYYY-MM-DD)"))]
"""A date written ``YYYY-MM-DD`` (not a Unix time)."""

IsoDateTime = Annotated[
    datetime, BeforeValidator(_iso(_ISO_DATE_TIME, "date-time (YYYY-MM-DDTHH:MM…)"))
]
"""A date-time in ISO 8601 / RFC 3339 (not a Unix time)."""

INTEGRAL = BeforeValidator(_whole)
"""For a strict integer field: ``2.0`` reads as ``2`` (still never ``"2"``, ``true``, ``2.5``).
Put it last, after the ``Field`` with the bounds, so they stay in the JSON schema:
``Annotated[int, Field(strict=True, ge=1), INTEGRAL]``."""
