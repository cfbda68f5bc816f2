"""Local wall-clock arithmetic in the customer's own timezone, DST gaps and folds included."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def resolve_zone(name: str | None, fallback: str) -> ZoneInfo:
    """The IANA zone ``name``, or ``fallback`` when it is missing or unknown."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo(fallback)


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def first_instant_at(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The first instant (UTC) at which the clock in ``zone`` shows ``day`` ``at`` or later.

    Normally that is the instant the clock shows exactly ``at`` (the earlier one when the
    clocks go back and it shows twice). When the clocks jump over ``at`` (a DST gap), it is
    the instant of the jump.
    """
    naive = datetime.combine(day, at)
    earlier = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    later = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    showing = [instant for instant in (earlier, later) if _wall(instant, zone) == naive]
    if showing:
        return min(showing)
    # In a gap, fold=1 maps before the jump and fold=0 after it: search the jump (whole seconds).
    low, high = int(min(earlier, later).timestamp()), int(max(earlier, later).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(datetime.fromtimestamp(middle, UTC), zone) >= naive:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


@dataclass(frozen=True, slots=True)
class SendWindow:
    """Local times of day in which messages may go out: ``start <= local time < end``.

    Everything outside is quiet hours. The window does not wrap midnight.
    """

    start: time = time(9, 0)
    end: time = time(20, 0)

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("send window times are local wall times; give naive times")
        if not self.start < self.end:
            raise ValueError("a send window must start before it ends (no wrap past midnight)")

    def contains(self, local: time) -> bool:
        """Whether a local wall time is inside the window."""
        return self.start <= local.replace(tzinfo=None, fold=0) < self.end

    def allows(self, instant: datetime, zone: ZoneInfo) -> bool:
        """Whether ``instant`` is inside the window in ``zone``."""
        return self.contains(instant.astimezone(zone).time())

    def next_allowed(self, instant: datetime, zone: ZoneInfo) -> datetime:
        """The earliest instant at or after ``instant`` that is inside the window in ``zone``.

        A moment in quiet hours moves to the window's start that day (before the window) or
        the next day (after it); in a DST gap, to the moment the clocks jump.
        """
        if self.allows(instant, zone):
            return instant
        local = instant.astimezone(zone)
        day = local.date() if local.time() < self.start else local.date() + timedelta(days=1)
        for offset in range(4):
            candidate_day = day + timedelta(days=offset)
            naive = datetime.combine(candidate_day, self.start)
            options = [first_instant_at(candidate_day, self.start, zone)]
            # when the clocks go back over the start, it shows twice: the second may be the one
            options.append(naive.replace(tzinfo=zone, fold=1).astimezone(UTC))
            for candidate in sorted(options):
                if candidate >= instant and self.allows(candidate, zone):
                    return candidate
        raise ValueError(f"no instant in {self} found after {instant} in {zone}")  # unreachable
