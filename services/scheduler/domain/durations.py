"""Durations as playbooks write them: ``"3d"``, ``"2w"``, ``"6mo"``, ``"1y"``, ``"12h"``, ``"P3D"``.

Calendar-free on purpose: a month is 30 days and a year 365 days. Time since churn is then
a plain :class:`~datetime.timedelta`, and "which window is this step in" has one answer that
does not depend on the month the customer left in.
"""

from __future__ import annotations

import re
from datetime import timedelta

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)
MONTH = timedelta(days=30)
YEAR = timedelta(days=365)

_UNITS: dict[str, timedelta] = {"h": HOUR, "d": DAY, "w": WEEK, "mo": MONTH, "y": YEAR}
_COMPACT = re.compile(r"^(\d{1,6})(h|d|w|mo|y)$")
_ISO = re.compile(
    r"^P(?=\d|T\d)(?:(\d{1,6})Y)?(?:(\d{1,6})M)?(?:(\d{1,6})W)?(?:(\d{1,6})D)?"
    r"(?:T(?=\d)(?:(\d{1,6})H)?(?:(\d{1,6})M)?)?$"
)

DURATION_HELP = "expected a duration such as '3d', '2w', '6mo', '1y', '12h' or ISO-8601 'P3D'"


def parse_duration(text: str) -> timedelta:
    """Parse a playbook duration.

    Compact forms are one number and one unit (``h``, ``d``, ``w``, ``mo``, ``y``); the
    ISO-8601 subset ``PnYnMnWnDTnHnM`` is accepted too. Months count 30 days, years 365.

    Raises:
        ValueError: the text is not such a duration.
    """
    cleaned = text.strip()
    compact = _COMPACT.match(cleaned.lower())
    if compact:
        return int(compact.group(1)) * _UNITS[compact.group(2)]
    iso = _ISO.match(cleaned.upper())
    if iso:
        years, months, weeks, days, hours, minutes = (int(g) if g else 0 for g in iso.groups())
        return (
            years * YEAR
            + months * MONTH
            + weeks * WEEK
            + days * DAY
            + hours * HOUR
            + timedelta(minutes=minutes)
        )
    raise ValueError(f"{text!r} is not a duration: {DURATION_HELP}")


def format_duration(value: timedelta) -> str:
    """Write ``value`` back in the compact form, in the largest unit that divides it exactly."""
    if value == timedelta(0):
        return "0d"
    for suffix, unit in (("y", YEAR), ("mo", MONTH), ("w", WEEK), ("d", DAY), ("h", HOUR)):
        if value % unit == timedelta(0) and value > timedelta(0):
            return f"{value // unit}{suffix}"
    return str(value)
