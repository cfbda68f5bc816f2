"""A win-back case as an aggregate: its state, and every command that changes it.

A case is plain data — the case row and its steps (:class:`Case`) — and each command is a
pure method over it: it takes the current state, an injected ``now`` and the command's data,
and returns a :class:`CaseChange` (the new state, the step changes to write and the domain
events to publish) or a :class:`Refused` naming why the command does not apply. The adapters
(the handler, the API, the horizon timer, playbook migrations) load a case, call one command
and persist what it returns with one function; nothing here does I/O.

The rules:

* A case is ``open``, ``paused`` (kept, but no step fires) or ``closed``. Closed is terminal:
  every command on a closed case is refused (code ``closed``).
* A customer has at most one open (or paused) case: :func:`open_case` refuses while the
  customer's current case is still open (supersede it first).
* Every close cancels every pending step (reason ``case closed: <reason>``) and emits exactly
  one :class:`CaseClosed` with its reason: ``superseded`` (a new churn), ``returned`` (the
  customer came back), ``activity`` (product activity, where the playbook exits on it),
  ``unsubscribed`` (an unsubscribe, or consent withdrawn on every channel), ``cancelled``
  (an operator), ``erased`` (GDPR erasure) or ``horizon`` (the case's time ran out).
* Pausing a paused case or resuming an open one is refused (``paused`` / ``not_paused``):
  the caller decides whether that is an error or an idempotent no-op.
* Every return is recorded against the customer's latest win-back case within its attribution
  horizon (:meth:`Case.record_return`): on an open case it closes it as ``returned``
  (:meth:`Case.customer_returned`); on a closed case (closed at its horizon, unsubscribed,
  consent withdrawn, superseded, cancelled) it sets ``returned_at`` and nothing else. A case
  records at most one return (``already_returned``); an erased case none (``closed``); a
  return before the churn or after ``churned_at + horizon`` is ``outside_horizon``.
* Only a churned customer comes back (:attr:`Case.came_back`: a win-back case of lifecycle
  ``churned_customer`` that recorded a return). They alone are re-onboarded
  (:func:`reonboards`) and count as returners for the re-churn rule. A trial or a lead that
  converts is a new customer, a passive user who is active again never left: their case closes
  as ``returned`` (and the return is attributed) with no follow-up case — never "welcome back".
* A command whose rules say "nothing to do" (a return during re-onboarding, activity the
  playbook does not exit on, consent withdrawn on one channel) returns an unchanged
  :class:`CaseChange` (``changed`` is false).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, TypeAlias

from services.scheduler.domain.migration import (
    MIGRATED,
    CaseStep,
    Change,
    Migration,
    plan_migration,
)
from services.scheduler.domain.model import (
    ChurnEpisode,
    CustomerView,
    LifecycleType,
    PlannedStep,
    Segment,
)
from services.scheduler.domain.planning import reonboarding_anchor
from services.scheduler.domain.playbook import Playbook

CaseStatus: TypeAlias = Literal["open", "paused", "closed"]
Purpose: TypeAlias = Literal["winback", "reonboarding"]
CloseReason: TypeAlias = Literal[
    "superseded", "returned", "activity", "unsubscribed", "cancelled", "erased", "horizon"
]
RefusalCode: TypeAlias = Literal[
    "closed",
    "paused",
    "not_paused",
    "open_case_exists",
    "not_expired",
    "other_playbook",
    "already_returned",
    "outside_horizon",
]

WINBACK: Purpose = "winback"
REONBOARDING: Purpose = "reonboarding"
OPEN_STATUSES: tuple[CaseStatus, ...] = ("open", "paused")
RETURNER_LIFECYCLE: LifecycleType = "churned_customer"
"""The one lifecycle whose return is a comeback (re-onboarding, re-churn watch)."""
PENDING = "pending"
CANCELLED = "cancelled"


def close_step_reason(reason: CloseReason) -> str:
    """The ``state_reason`` of a pending step cancelled because its case closed."""
    return f"case closed: {reason}"


# -- the state ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Case:
    """A case row and its steps.

    ``episode`` is the churn the case is about (for a re-onboarding case: the original churn)
    and ``return_anchor`` the return a re-onboarding case counts from (``None`` for a win-back
    case). ``returned_at`` is set when the customer came back: the win-back case closed as
    ``returned``, or (closed for another reason first) the return was recorded on it later.
    ``steps`` are every step of the case, in due order.
    """

    id: str
    customer_id: str
    episode_id: str
    status: CaseStatus
    purpose: Purpose
    playbook: str
    playbook_version: int
    segment: Segment
    episode: ChurnEpisode
    holdout: bool
    is_rechurn: bool
    churned_at: datetime
    opened_at: datetime
    expires_at: datetime
    feature_key: str | None = None
    close_reason: str | None = None
    closed_at: datetime | None = None
    returned_at: datetime | None = None
    return_anchor: datetime | None = None
    steps: tuple[CaseStep, ...] = ()

    @property
    def is_open(self) -> bool:
        """Open or paused: not closed."""
        return self.status in OPEN_STATUSES

    @property
    def came_back(self) -> bool:
        """Whether a churned customer came back: a win-back case of lifecycle
        ``churned_customer`` that recorded a return (closed as ``returned``, or the return
        recorded on it after it closed). A converted trial or lead, or a passive user active
        again, did not come back: they never left as customers."""
        return (
            self.purpose == WINBACK
            and self.returned_at is not None
            and self.segment.lifecycle == RETURNER_LIFECYCLE
        )

    @property
    def pending_steps(self) -> tuple[CaseStep, ...]:
        return tuple(s for s in self.steps if s.pending)

    @property
    def planning_episode(self) -> ChurnEpisode:
        """The episode the steps are planned from: the churn, or for a re-onboarding case the
        original churn re-timed to the return."""
        if self.return_anchor is None:
            return self.episode
        return reonboarding_anchor(self.episode, self.return_anchor)

    @property
    def time_zero(self) -> datetime:
        """What the playbook's offsets, windows and horizon count from: the churn, or the
        return for a re-onboarding case."""
        return self.return_anchor if self.return_anchor is not None else self.churned_at

    # -- commands ------------------------------------------------------------------------
    def pause(self, now: datetime) -> CaseChange | Refused:
        """Hold the case: its steps stay pending but none fires until it is resumed."""
        if (refused := self._refuse_closed("pause")) is not None:
            return refused
        if self.status == "paused":
            return Refused(self.id, "pause", "paused", f"case {self.id} is already paused")
        return CaseChange(self, replace(self, status="paused"))

    def resume(self, now: datetime) -> CaseChange | Refused:
        """Let a paused case's steps fire again (one that fell due meanwhile fires now)."""
        if (refused := self._refuse_closed("resume")) is not None:
            return refused
        if self.status != "paused":
            return Refused(self.id, "resume", "not_paused", f"case {self.id} is not paused")
        return CaseChange(self, replace(self, status="open"))

    def cancel(self, now: datetime) -> CaseChange | Refused:
        """An operator stops the case."""
        return self.close("cancelled", now, command="cancel")

    def supersede(self, now: datetime) -> CaseChange | Refused:
        """A new churn of the customer replaces this case."""
        return self.close("superseded", now, command="supersede")

    def unsubscribe(self, now: datetime) -> CaseChange | Refused:
        """The customer unsubscribed (from any channel): that is the customer saying stop."""
        return self.close("unsubscribed", now, command="unsubscribe")

    def withdraw_consent(self, channel: str, now: datetime) -> CaseChange | Refused:
        """Consent withdrawn: on every channel (``all``) the case ends; on one channel it goes
        on (the guardrails skip that channel's steps)."""
        if (refused := self._refuse_closed("withdraw_consent")) is not None:
            return refused
        if channel != "all":
            return self._unchanged()
        return self.close("unsubscribed", now, command="withdraw_consent")

    def erase(self, now: datetime) -> CaseChange | Refused:
        """GDPR erasure of the customer."""
        return self.close("erased", now, command="erase")

    def expire(self, now: datetime) -> CaseChange | Refused:
        """Close the case at its horizon (``expires_at``): the customer is off the list."""
        if (refused := self._refuse_closed("expire")) is not None:
            return refused
        if now < self.expires_at:
            return Refused(
                self.id, "expire", "not_expired", f"case {self.id} runs until {self.expires_at}"
            )
        return self.close("horizon", now, command="expire")

    def customer_returned(
        self,
        now: datetime,
        *,
        returned_at: datetime,
        by_activity: bool,
        playbook: Playbook | None,
    ) -> CaseChange | Refused:
        """The customer came back (a reactivation, or activity when ``by_activity``).

        Exit rules: a return during re-onboarding changes nothing; a return seen only as
        activity closes the case when the churn was inactivity, or when the case's
        ``playbook`` exits on activity; any other return closes it as ``returned``.
        """
        if (refused := self._refuse_closed("customer_returned")) is not None:
            return refused
        if self.purpose == REONBOARDING:
            return self._unchanged()
        if not self._counts(by_activity, playbook):
            return self._unchanged()
        return self.close("returned", now, returned_at=returned_at, command="customer_returned")

    def record_return(
        self,
        now: datetime,
        *,
        returned_at: datetime,
        by_activity: bool,
        playbook: Playbook | None,
        horizon: timedelta,
    ) -> CaseChange | Refused:
        """Record the customer's return on this win-back case, open or closed.

        Open (or paused): :meth:`customer_returned` (the case closes as ``returned``). Closed:
        the same exit rules decide whether the return counts (activity counts only for an
        inactivity churn or a playbook that exits on it); it must fall within ``horizon`` of
        the churn (``churned_at <= returned_at <= churned_at + horizon``); then only
        ``returned_at`` is set — the case stays closed for its own reason, no event. A case
        records one return at most; an erased case none.
        """
        if self.returned_at is not None:
            return Refused(
                self.id,
                "record_return",
                "already_returned",
                f"case {self.id} already recorded the return of {self.returned_at}",
            )
        if self.is_open:
            return self.customer_returned(
                now, returned_at=returned_at, by_activity=by_activity, playbook=playbook
            )
        if self.close_reason == "erased":
            return Refused(self.id, "record_return", "closed", f"case {self.id} was erased")
        if self.purpose == REONBOARDING or not self._counts(by_activity, playbook):
            return self._unchanged()
        if not self.churned_at <= returned_at <= self.churned_at + horizon:
            return Refused(
                self.id,
                "record_return",
                "outside_horizon",
                f"case {self.id}: a return at {returned_at} is outside "
                f"{self.churned_at} + {horizon}",
            )
        return CaseChange(self, replace(self, returned_at=returned_at))

    def _counts(self, by_activity: bool, playbook: Playbook | None) -> bool:
        """Whether a return (seen only as activity when ``by_activity``) counts as one."""
        return (
            not by_activity
            or self.episode.kind == "user_inactive"
            or (playbook is not None and playbook.exits_on("activity"))
        )

    def customer_active(self, now: datetime, *, playbook: Playbook | None) -> CaseChange | Refused:
        """Product activity: closes the case (``activity``) when its playbook exits on it."""
        if (refused := self._refuse_closed("customer_active")) is not None:
            return refused
        if playbook is None or not playbook.exits_on("activity"):
            return self._unchanged()
        return self.close("activity", now, command="customer_active")

    def migrate(
        self,
        target: Playbook,
        customer: CustomerView,
        now: datetime,
        *,
        fallback_timezone: str = "UTC",
    ) -> CaseChange | Refused:
        """Move the case onto ``target`` (another version of its playbook), as the pure
        planner :func:`~.migration.plan_migration` decides; emits :class:`CaseMigrated`."""
        if (refused := self._refuse_closed("migrate")) is not None:
            return refused
        if target.name != self.playbook:
            return Refused(
                self.id,
                "migrate",
                "other_playbook",
                f"case {self.id} runs {self.playbook!r}, not {target.name!r}",
            )
        migration = plan_migration(
            target,
            self.steps,
            customer,
            self.planning_episode,
            now,
            segment=self.segment,
            from_version=self.playbook_version,
            holdout=self.holdout,
            fallback_timezone=fallback_timezone,
        )
        return self._migrated(migration)

    def close(
        self,
        reason: CloseReason,
        now: datetime,
        *,
        returned_at: datetime | None = None,
        command: str = "close",
    ) -> CaseChange | Refused:
        """Close the case for ``reason``: every pending step is cancelled, one
        :class:`CaseClosed` is emitted."""
        if (refused := self._refuse_closed(command)) is not None:
            return refused
        step_reason = close_step_reason(reason)
        cancelled = tuple(StepCancelled(s.step_key, step_reason) for s in self.pending_steps)
        after = replace(
            self,
            status="closed",
            close_reason=reason,
            closed_at=now,
            returned_at=returned_at,
            steps=tuple(
                replace(s, state=CANCELLED, state_reason=step_reason) if s.pending else s
                for s in self.steps
            ),
        )
        event = CaseClosed(
            case_id=self.id,
            customer_id=self.customer_id,
            reason=reason,
            purpose=self.purpose,
            playbook=self.playbook,
            playbook_version=self.playbook_version,
            closed_at=now,
            returned_at=returned_at,
        )
        return CaseChange(self, after, cancelled=cancelled, events=(event,))

    # -- helpers -------------------------------------------------------------------------
    def _refuse_closed(self, command: str) -> Refused | None:
        if self.is_open:
            return None
        return Refused(self.id, command, "closed", f"case {self.id} closed: {self.close_reason}")

    def _unchanged(self) -> CaseChange:
        return CaseChange(self, self)

    def _migrated(self, migration: Migration) -> CaseChange:
        by_key = {s.step_key: s for s in self.steps}
        for c in migration.cancelled:
            by_key[c.step_key] = replace(by_key[c.step_key], state=CANCELLED, state_reason=MIGRATED)
        for change in migration.retimed:
            by_key[change.step_key] = CaseStep(change.after, PENDING, None)
        for change in migration.updated:
            old = by_key[change.step_key]
            by_key[change.step_key] = replace(old, planned=change.after)
        for step in migration.added:
            by_key[step.step_key] = CaseStep(step, PENDING, None)
        after = replace(
            self,
            playbook_version=migration.to_version,
            expires_at=migration.expires_at,
            steps=_in_due_order(by_key.values()),
        )
        return CaseChange(
            self,
            after,
            cancelled=tuple(StepCancelled(c.step_key, MIGRATED) for c in migration.cancelled),
            retimed=migration.retimed,
            updated=migration.updated,
            added=migration.added,
            events=(CaseMigrated(self.id, self.customer_id, migration),),
        )


def open_case(
    *,
    case_id: str,
    customer_id: str,
    episode_id: str,
    purpose: Purpose,
    playbook: Playbook,
    segment: Segment,
    episode: ChurnEpisode,
    expires_at: datetime,
    steps: Sequence[PlannedStep],
    now: datetime,
    current: Case | None = None,
    feature_key: str | None = None,
    return_anchor: datetime | None = None,
    after_case_id: str | None = None,
) -> CaseChange | Refused:
    """Open a case with its planned ``steps`` (all pending) and emit :class:`CaseOpened`.

    ``current`` is the customer's latest case: while it is open the new one is refused
    (``open_case_exists``) — supersede it first. A re-onboarding case names the return it
    counts from (``return_anchor``) and the win-back case it follows (``after_case_id``).
    """
    if current is not None and current.is_open:
        return Refused(
            current.id,
            "open",
            "open_case_exists",
            f"customer {customer_id} has the open case {current.id}",
        )
    planned = tuple(sorted(steps, key=lambda s: s.due_at))
    holdout = any(s.holdout for s in planned)
    case = Case(
        id=case_id,
        customer_id=customer_id,
        episode_id=episode_id,
        status="open",
        purpose=purpose,
        playbook=playbook.name,
        playbook_version=playbook.version,
        segment=segment,
        episode=episode,
        holdout=holdout,
        is_rechurn=segment.is_rechurn,
        churned_at=episode.occurred_at,
        opened_at=now,
        expires_at=expires_at,
        feature_key=feature_key,
        return_anchor=return_anchor,
        steps=tuple(CaseStep(s, PENDING) for s in planned),
    )
    prior = episode.prior_win_back_at
    event = CaseOpened(
        case_id=case_id,
        customer_id=customer_id,
        purpose=purpose,
        playbook=playbook.name,
        playbook_version=playbook.version,
        segment=segment,
        holdout=holdout,
        is_rechurn=segment.is_rechurn,
        steps=len(planned),
        time_since_return_days=(episode.occurred_at - prior).days
        if segment.is_rechurn and prior is not None
        else None,
        after_case_id=after_case_id,
        churn_reason=episode.reason if purpose == REONBOARDING else None,
        returned_at=return_anchor,
    )
    return CaseChange(None, case, added=planned, events=(event,))


def reonboards(change: CaseChange) -> bool:
    """Whether the return a :meth:`Case.record_return` change recorded opens a re-onboarding
    case: only when the customer :attr:`~Case.came_back`, and not when the case had closed
    earlier because they unsubscribed (a customer who said stop is not contacted again)."""
    after = change.after
    if not after.came_back:
        return False
    return change.closed or after.close_reason != "unsubscribed"


def _in_due_order(steps: Iterable[CaseStep]) -> tuple[CaseStep, ...]:
    return tuple(sorted(steps, key=lambda s: (s.planned.due_at, s.step_key)))


# -- what a command returns --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepCancelled:
    """A pending step the change cancels, with the ``state_reason`` it gets."""

    step_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class CaseOpened:
    case_id: str
    customer_id: str
    purpose: Purpose
    playbook: str
    playbook_version: int
    segment: Segment
    holdout: bool
    is_rechurn: bool
    steps: int
    time_since_return_days: int | None = None  # a re-churn: days from the last return
    after_case_id: str | None = None  # re-onboarding: the win-back case it follows
    churn_reason: str | None = None  # re-onboarding: why the customer had left
    returned_at: datetime | None = None  # re-onboarding: the return it counts from


@dataclass(frozen=True, slots=True)
class CaseClosed:
    case_id: str
    customer_id: str
    reason: CloseReason
    purpose: Purpose
    playbook: str
    playbook_version: int
    closed_at: datetime
    returned_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CaseMigrated:
    case_id: str
    customer_id: str
    migration: Migration


CaseEvent: TypeAlias = CaseOpened | CaseClosed | CaseMigrated


@dataclass(frozen=True, slots=True)
class CaseChange:
    """What a command did: the case ``before`` (``None`` when it was just opened) and
    ``after``, the step rows to write and the events to publish.

    ``cancelled``: pending steps to cancel (with their reason); ``retimed`` / ``updated``:
    pending steps with a new planned time / new content (a migration); ``added``: new step
    rows (or rows a migration cancelled, planned again).
    """

    before: Case | None
    after: Case
    cancelled: tuple[StepCancelled, ...] = ()
    retimed: tuple[Change, ...] = ()
    updated: tuple[Change, ...] = ()
    added: tuple[PlannedStep, ...] = ()
    events: tuple[CaseEvent, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether there is anything to write or publish."""
        return self.before != self.after or bool(self.events)

    @property
    def closed(self) -> bool:
        """Whether this change closed the case."""
        return self.before is not None and self.before.is_open and not self.after.is_open


@dataclass(frozen=True, slots=True)
class Refused:
    """A command that does not apply to the case in its current state, and why."""

    case_id: str
    command: str
    code: RefusalCode
    detail: str
