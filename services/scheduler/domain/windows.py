"""The timing-window ladder: time since churn → the kind of contact that fits.

The ladder is configuration (:data:`DEFAULT_WINDOW_CONFIG`), not code: the sources disagree
at the edges, so a playbook may bring its own windows and horizon. Windows are contiguous,
each starts where the previous one ends (start inclusive, end exclusive); the last one ends
at the horizon, beyond which the customer is removed from the list (no window).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from services.scheduler.domain.durations import parse_duration

DEFAULT_WINDOW_CONFIG: Mapping[str, object] = {
    "windows": [
        {"name": "immediate", "start": "0d"},  # 0-7 days: regret / impulsive cancellations
        {"name": "email_series", "start": "7d"},  # 1-4 weeks
        {"name": "special_offer", "start": "1mo"},  # 1-3 months
        {"name": "product_update", "start": "3mo"},  # 3-6 months
        {"name": "last_attempt", "start": "6mo"},  # 6-12 months
    ],
    "horizon": "1y",  # > 12 months: remove from the list
}


@dataclass(frozen=True, slots=True)
class TimingWindow:
    """One rung of the ladder: ``start <= time since churn < end``."""

    name: str
    start: timedelta
    end: timedelta

    def contains(self, elapsed: timedelta) -> bool:
        """Whether ``elapsed`` time since churn falls in this window."""
        return self.start <= elapsed < self.end


@dataclass(frozen=True, slots=True)
class WindowLadder:
    """Contiguous timing windows from churn (0) to the horizon."""

    windows: tuple[TimingWindow, ...]

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a window ladder needs at least one window")
        if self.windows[0].start != timedelta(0):
            raise ValueError("the first window must start at churn (0d)")
        names = [w.name for w in self.windows]
        if len(set(names)) != len(names):
            raise ValueError(f"window names must be unique, got {names}")
        for before, after in zip(self.windows, self.windows[1:], strict=False):
            if before.end != after.start:
                raise ValueError(f"window {after.name!r} must start where {before.name!r} ends")
        for window in self.windows:
            if window.end <= window.start:
                raise ValueError(f"window {window.name!r} must end after it starts")

    @property
    def horizon(self) -> timedelta:
        """Time since churn from which the customer is off the list."""
        return self.windows[-1].end

    @classmethod
    def from_starts(
        cls, starts: Sequence[tuple[str, timedelta]], horizon: timedelta
    ) -> WindowLadder:
        """Build a ladder from ``(name, start)`` pairs in order and the horizon."""
        ends = [start for _, start in starts[1:]] + [horizon]
        return cls(
            tuple(
                TimingWindow(name, start, end)
                for (name, start), end in zip(starts, ends, strict=True)
            )
        )

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> WindowLadder:
        """Build a ladder from plain configuration shaped like :data:`DEFAULT_WINDOW_CONFIG`."""
        windows = config.get("windows")
        horizon = config.get("horizon")
        if not isinstance(windows, list) or not isinstance(horizon, str):
            raise ValueError("window config needs a 'windows' list and a 'horizon' duration")
        starts: list[tuple[str, timedelta]] = []
        for entry in windows:
            if not isinstance(entry, Mapping):
                raise ValueError(f"window entry {entry!r} must be a mapping")
            name, start = entry.get("name"), entry.get("start")
            if not isinstance(name, str) or not isinstance(start, str):
                raise ValueError(f"window entry {entry!r} needs a 'name' and a 'start'")
            starts.append((name, parse_duration(start)))
        return cls.from_starts(starts, parse_duration(horizon))

    def with_horizon(self, horizon: timedelta) -> WindowLadder:
        """The same windows up to another horizon: windows starting at or after it are
        dropped; the last kept window is stretched or cut to end at it."""
        kept = [(w.name, w.start) for w in self.windows if w.start < horizon]
        if not kept:
            raise ValueError("the horizon must be after churn")
        return WindowLadder.from_starts(kept, horizon)

    def window_for(self, time_since_churn: timedelta) -> TimingWindow | None:
        """The window ``time_since_churn`` falls in; ``None`` at or beyond the horizon.

        Raises:
            ValueError: ``time_since_churn`` is negative (before the churn).
        """
        if time_since_churn < timedelta(0):
            raise ValueError("time since churn cannot be negative")
        for window in self.windows:
            if window.contains(time_since_churn):
                return window
        return None


DEFAULT_LADDER = WindowLadder.from_config(DEFAULT_WINDOW_CONFIG)


def window_for(
    time_since_churn: timedelta, ladder: WindowLadder = DEFAULT_LADDER
) -> TimingWindow | None:
    """The window of ``time_since_churn`` on ``ladder``; ``None`` means remove from the list."""
    return ladder.window_for(time_since_churn)
