"""The one clock. Code asks an injected ``Clock`` for the time; tests pass a ``FrozenClock``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class FrozenClock:
    """A clock that moves only when told to: months of schedule run in milliseconds."""

    current: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> datetime:
        self.current = self.current + delta
        return self.current

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("FrozenClock needs a timezone-aware datetime")
        self.current = when


@dataclass
class AcceleratedClock:
    """Real time sped up by ``factor`` from ``origin``: the demo runs weeks in a minute."""

    factor: float
    origin: datetime = field(default_factory=lambda: datetime.now(UTC))
    _started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def now(self) -> datetime:
        elapsed = datetime.now(UTC) - self._started
        return self.origin + elapsed * self.factor
