"""Crediting a return to the step that won the customer back (last touch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.scheduler.domain.model import ChurnEpisode, SentStep

DEFAULT_ATTRIBUTION_WINDOW = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class WinBackCredit:
    """The outcome of a reactivation, as CRM and commission systems need it.

    ``credited`` is ``None`` when no sent step lies inside the attribution window (the
    customer returned on their own, or was in the holdout): a return, not a win-back.
    """

    episode_id: str
    credited: SentStep | None
    reactivated_at: datetime
    time_to_return: timedelta
    mrr_regained_minor: int | None
    mrr_at_churn_minor: int | None

    @property
    def is_win_back(self) -> bool:
        """Whether the return is credited to a win-back step."""
        return self.credited is not None

    @property
    def days_to_return(self) -> int:
        """Whole days from churn to return."""
        return self.time_to_return // timedelta(days=1)

    @property
    def crm_owner(self) -> str | None:
        """Who gets the credit: the CRM owner recorded on the credited step."""
        return self.credited.crm_owner if self.credited is not None else None


def credited_step(
    sent: Sequence[SentStep],
    episode: ChurnEpisode,
    reactivated_at: datetime,
    window: timedelta = DEFAULT_ATTRIBUTION_WINDOW,
) -> SentStep | None:
    """Last touch: the latest step sent after the churn, at or before the reactivation and
    no more than ``window`` before it. Among steps sent at the same moment the CRM task
    (personal outreach) wins, then the later one in ``sent``."""
    best: tuple[datetime, bool, int] | None = None
    chosen: SentStep | None = None
    for position, step in enumerate(sent):
        if not episode.occurred_at <= step.sent_at <= reactivated_at:
            continue
        if reactivated_at - step.sent_at > window:
            continue
        rank = (step.sent_at, step.channel == "crm", position)
        if best is None or rank > best:
            best, chosen = rank, step
    return chosen


def attribute_reactivation(
    sent: Sequence[SentStep],
    episode: ChurnEpisode,
    reactivated_at: datetime,
    *,
    mrr_regained_minor: int | None,
    window: timedelta = DEFAULT_ATTRIBUTION_WINDOW,
) -> WinBackCredit:
    """Record a customer's return after ``episode``: the credited step (see
    :func:`credited_step`), days from churn to return, and the MRR they came back with."""
    return WinBackCredit(
        episode_id=episode.episode_id,
        credited=credited_step(sent, episode, reactivated_at, window),
        reactivated_at=reactivated_at,
        time_to_return=max(reactivated_at - episode.occurred_at, timedelta(0)),
        mrr_regained_minor=mrr_regained_minor,
        mrr_at_churn_minor=episode.mrr_at_churn_minor,
    )


def time_since_return(episode: ChurnEpisode) -> timedelta | None:
    """For a re-churn: how long the won-back customer stayed before leaving again."""
    if episode.prior_win_back_at is None:
        return None
    return episode.occurred_at - episode.prior_win_back_at
