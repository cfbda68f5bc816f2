"""Passive users found by winback itself: a per-customer inactivity timer.

Every ``customer.activity`` of a customer who is not churned pushes their row in
``inactivity_timers`` forward to ``last activity + the plan's inactivity period`` (the
handler, one upsert per batch). The step timer loop claims due rows in batches with
``FOR UPDATE SKIP LOCKED`` (:class:`InactivityTimer`, one transaction per batch, a handful of
statements whatever its size) and decides each with the pure
:func:`~services.scheduler.domain.segmentation.passive_verdict`: a silent customer with no
open case gets a passive-user case (lifecycle ``passive_user``, the ``passive_user``
playbook), a churned or erased one or one with an open win-back case loses the timer (their
next activity arms it again), a returner in re-onboarding keeps it until that case ends.

The passive-user case exits on activity: the customer's next ``customer.activity`` closes it
at once (``case.closed``, reason ``activity``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from services.scheduler import store
from services.scheduler.domain import (
    ChurnEpisode,
    Playbook,
    case_expires_at,
    choose_playbook,
    plan_steps,
    segment,
)
from services.scheduler.domain.case import CaseChange, open_case
from services.scheduler.domain.segmentation import InactivityRule, passive_verdict
from services.scheduler.views import customer_view
from shared.messaging.pipeline import Tx
from shared.settings import SchedulerSettings

log = logging.getLogger(__name__)
BUSY_RETRY = timedelta(minutes=1)  # a customer another transaction holds: look again soon


def inactivity_rule(settings: SchedulerSettings) -> InactivityRule:
    """The passive-user rule of the settings (``scheduler.inactivity_days``, per plan
    ``scheduler.inactivity_days_by_plan``, ``scheduler.usage_drop_percent``)."""
    return InactivityRule(
        period=timedelta(days=settings.inactivity_days),
        by_plan={plan: timedelta(days=d) for plan, d in settings.inactivity_days_by_plan.items()},
        usage_drop_percent=settings.usage_drop_percent,
    )


def passive_episode_id(customer_id: str, last_active_at: datetime) -> str:
    """One spell of silence, one episode: the same timer can never open two cases."""
    key = f"winback-inactive|{customer_id}|{last_active_at.isoformat()}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


class InactivityTimer:
    """Claims due inactivity timers and opens the passive-user cases they stand for."""

    def __init__(
        self,
        playbooks: Sequence[Playbook],
        rule: InactivityRule,
        outcomes_topic: str,
        *,
        fallback_timezone: str = "UTC",
        batch_size: int = 500,
    ) -> None:
        self.playbooks = list(playbooks)
        self.rule = rule
        self.outcomes_topic = outcomes_topic  # where case.opened goes
        self.fallback_timezone = fallback_timezone
        self.batch_size = batch_size

    async def claim(self, tx: Tx) -> int:
        """One batch in ``tx``: claim due timers, decide each, open the cases, drop or move
        the timers. Returns how many timers were claimed."""
        conn, now = tx.conn, tx.now
        timers = await store.claim_inactivity_timers(conn, now, self.batch_size)
        if not timers:
            return 0
        people, unknown = await store.lock_free_customers(conn, [t.customer_id for t in timers])
        cases = await store.load_open_cases(conn, list(people))
        drop: list[str] = []
        later: dict[str, datetime] = {}
        opened: list[CaseChange] = []
        for timer in timers:
            cid = timer.customer_id
            row = people.get(cid)
            if row is None:
                if cid in unknown:
                    drop.append(cid)  # nobody to write to
                else:
                    later[cid] = now + BUSY_RETRY  # a batch holds the customer right now
                continue
            current = cases.get(cid)
            verdict = passive_verdict(
                status=row["status"],
                erased=row["erased_at"] is not None,
                open_case_purpose=current.purpose if current is not None else None,
            )
            if verdict == "later" and current is not None:
                later[cid] = max(current.expires_at, now + BUSY_RETRY)
                continue
            drop.append(cid)
            if verdict == "passive":
                change = self._open(row, timer.last_active_at, timer.due_at, now)
                if change is not None:
                    opened.append(change)
        await store.save_cases(tx, self.outcomes_topic, opened)
        await store.drop_inactivity_timers(conn, drop)
        await store.defer_inactivity_timers(conn, later, now)
        return len(timers)

    def _open(
        self, row: dict[str, object], last_active_at: datetime, due_at: datetime, now: datetime
    ) -> CaseChange | None:
        """The passive-user case of a customer silent since ``last_active_at`` (``None``: no
        playbook for them, or the horizon already passed)."""
        cid = str(row["id"])
        view = customer_view(row)
        mrr = row.get("mrr_minor")
        episode = ChurnEpisode(
            episode_id=passive_episode_id(cid, last_active_at),
            kind="user_inactive",
            occurred_at=due_at,  # they count as passive from then on
            reason="unused",
            mrr_at_churn_minor=mrr if isinstance(mrr, int) else None,
        )
        seg = segment(view, episode, now)
        playbook = choose_playbook(self.playbooks, seg)
        if playbook is None:
            log.info("no playbook matches a passive user", extra={"customer_id": cid})
            return None
        expires = case_expires_at(playbook, episode)
        if now >= expires:
            return None
        steps = plan_steps(
            playbook, view, episode, now, segment=seg, fallback_timezone=self.fallback_timezone
        )
        result = open_case(
            case_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-case|{episode.episode_id}")),
            customer_id=cid,
            episode_id=episode.episode_id,
            purpose="winback",
            playbook=playbook,
            segment=seg,
            episode=episode,
            expires_at=expires,
            steps=steps,
            now=now,
        )
        return result if isinstance(result, CaseChange) else None
