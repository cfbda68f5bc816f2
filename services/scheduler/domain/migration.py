"""Moving an open case onto another version of its playbook ("publish a new version of a
live journey"), as a plan the adapters apply in one transaction.

The rules, step by step (a step is identified by its key across versions):

* **Anything that already left is kept as it is.** A step in any state but ``pending`` —
  ``dispatched`` (in flight: the dispatcher has the command), ``sent``, ``failed``,
  ``suppressed``, ``skipped``, or ``cancelled`` — is never changed and never planned again,
  so no step key is ever sent twice, whatever the new version says. The one exception is a
  step an earlier migration cancelled (``cancelled`` with reason :data:`MIGRATED`): it never
  fired, so when a later version brings its key back it is planned again like a new step
  (e.g. rolling back a version that dropped it).
* **A pending step whose key the new version no longer has is cancelled** (reason
  :data:`MIGRATED`, cause ``removed``).
* **A pending step the new version still has takes the new version's timing and content.**
  Its planned time is recomputed exactly as :func:`~.planning.plan_steps` would for this
  case (offset from churn, calendar rule in the customer's timezone, the step's ``when``):
  - the same planned time: the timer keeps its due time (a deferral by quiet hours or the
    frequency cap stays) and only the content moves (template, channel, offer, variant,
    what to do when capped, the horizon) — ``updated``, or ``unchanged`` when nothing moved;
  - another planned time: ``retimed`` to what a case opened now would get, so a time still
    ahead is kept, and a time that has already passed follows the planner's late-churn
    rule (the latest touch of the current window is due now, anything older is cancelled
    with cause ``missed``) — never a burst of past steps;
  - the step no longer applies to this case (its ``when`` stops matching the segment, or
    its time falls outside the horizon): cancelled, cause ``not_planned``.
* **A step of the new version the case does not have yet is planned** with the same rules
  as a fresh case opened now (:func:`~.planning.plan_steps`), late-churn rule included.
  Triggered steps (``feature.released``) are not planned here; the trigger plans them.
* A pending triggered step (already woken) keeps its due time and takes the new content; a
  pending timed step whose key became a triggered one is cancelled (cause ``now_triggered``).
* When the new version's horizon has already passed, every pending step is cancelled
  (cause ``horizon``) and nothing is added; the case's ``expires_at`` moves, so the horizon
  job closes the case.
* The case's holdout assignment is kept (pass ``holdout``): changing versions never moves a
  customer between the holdout and the contacted group, so the lift stays measurable.

Migrating a case that is already on the target version plans nothing (idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, TypeAlias

from services.scheduler.domain.model import ChurnEpisode, CustomerView, PlannedStep, Segment
from services.scheduler.domain.planning import case_expires_at, plan_step, plan_steps
from services.scheduler.domain.playbook import Playbook
from services.scheduler.domain.variants import in_holdout

MIGRATED = "migrated"
"""The ``state_reason`` of a pending step a migration cancelled."""

PENDING = "pending"
CANCELLED = "cancelled"

CancelCause: TypeAlias = Literal["removed", "not_planned", "missed", "horizon", "now_triggered"]


@dataclass(frozen=True, slots=True)
class CaseStep:
    """A stored step of a case: what was planned, its state (``pending``, ``dispatched``,
    ``sent``, ``failed``, ``suppressed``, ``skipped``, ``cancelled``) and why."""

    planned: PlannedStep
    state: str
    state_reason: str | None = None

    @property
    def step_key(self) -> str:
        return self.planned.step_key

    @property
    def pending(self) -> bool:
        return self.state == PENDING

    @property
    def revivable(self) -> bool:
        """Cancelled by an earlier migration, so never fired: a later version may plan it."""
        return self.state == CANCELLED and self.state_reason == MIGRATED


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A pending step the migration cancels, and why (see the module's rules)."""

    step: PlannedStep
    cause: CancelCause

    @property
    def step_key(self) -> str:
        return self.step.step_key


@dataclass(frozen=True, slots=True)
class Change:
    """A pending step before and after the migration (same key)."""

    before: PlannedStep
    after: PlannedStep

    @property
    def step_key(self) -> str:
        return self.after.step_key


@dataclass(frozen=True, slots=True)
class Migration:
    """What moving one case from ``from_version`` to ``to_version`` does to its steps.

    ``added``: new timer rows (or a migration-cancelled row planned again), in due order;
    ``cancelled``: pending steps to cancel with reason :data:`MIGRATED`; ``retimed``: pending
    steps with a new planned time (and possibly new content); ``updated``: pending steps with
    new content and the same due time; ``kept``: keys of steps left as they are because they
    are no longer pending (sent, in flight, skipped, …); ``unchanged``: pending steps the new
    version leaves exactly as they were. ``expires_at`` is the case horizon under the new
    version. Every key of the case is in exactly one of them (a revived key is in ``added``).
    """

    playbook: str
    from_version: int
    to_version: int
    expires_at: datetime
    added: tuple[PlannedStep, ...] = ()
    cancelled: tuple[Cancellation, ...] = ()
    retimed: tuple[Change, ...] = ()
    updated: tuple[Change, ...] = ()
    kept: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def step_changes(self) -> int:
        """How many step rows the migration writes."""
        return len(self.added) + len(self.cancelled) + len(self.retimed) + len(self.updated)


def plan_migration(
    target: Playbook,
    current: Sequence[CaseStep],
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    *,
    segment: Segment,
    from_version: int,
    holdout: bool | None = None,
    fallback_timezone: str = "UTC",
) -> Migration:
    """Plan moving a case with steps ``current`` onto playbook version ``target``.

    ``customer``, ``episode`` and ``segment`` are the case's, as the planner uses them;
    ``holdout`` is the case's holdout assignment (``None``: as the target would assign it).
    Follows the module's rules. Pure: the adapters apply the result.

    Raises:
        ValueError: ``current`` names a step key twice.
    """
    keys = [s.step_key for s in current]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a case cannot hold a step key twice: {sorted(keys)}")

    def assigned(step: PlannedStep) -> PlannedStep:
        return step if holdout is None else replace(step, holdout=holdout)

    expires = case_expires_at(target, episode)
    # what a case opened now would get (the late-churn rule included) ...
    fresh = {
        s.step_key: assigned(s)
        for s in plan_steps(
            target, customer, episode, now, segment=segment, fallback_timezone=fallback_timezone
        )
    }
    # ... and every timed step of the case at its planned time, as a case opened at churn
    schedule = {
        s.step_key: assigned(s)
        for s in plan_steps(
            target,
            customer,
            episode,
            episode.occurred_at,
            segment=segment,
            fallback_timezone=fallback_timezone,
        )
    }
    specs = {step.key: step for step in target.steps}
    horizon_passed = now >= expires

    added_keys: set[str] = set()
    cancelled: list[Cancellation] = []
    retimed: list[Change] = []
    updated: list[Change] = []
    kept: list[str] = []
    unchanged: list[str] = []

    def content_moved(before: PlannedStep, after: PlannedStep) -> None:
        if replace(before, playbook_version=after.playbook_version) == after:
            unchanged.append(before.step_key)
        else:
            updated.append(Change(before, after))

    for existing in current:
        key, before = existing.step_key, existing.planned
        if not existing.pending:
            if existing.revivable and key in fresh:
                added_keys.add(key)
            else:
                kept.append(key)
            continue
        spec = specs.get(key)
        if horizon_passed:
            cancelled.append(Cancellation(before, "horizon"))
        elif spec is None:
            cancelled.append(Cancellation(before, "removed"))
        elif spec.trigger is not None:
            if before.trigger is None:
                cancelled.append(Cancellation(before, "now_triggered"))
            elif before.due_at >= expires:
                cancelled.append(Cancellation(before, "horizon"))
            else:  # woken already: keeps its due time, takes the new content
                after = plan_step(
                    target,
                    customer,
                    episode,
                    spec,
                    due_at=before.due_at,
                    original_due_at=before.original_due_at,
                    holdout=in_holdout(customer.customer_id, target.name, target.holdout)
                    if holdout is None
                    else holdout,
                )
                content_moved(before, replace(after, window=before.window))
        elif key not in schedule:
            cancelled.append(Cancellation(before, "not_planned"))
        elif schedule[key].original_due_at == before.original_due_at and before.due_at < expires:
            # same planned time: a deferral (quiet hours, frequency cap) stays as it was
            after = replace(
                schedule[key],
                due_at=before.due_at,
                original_due_at=before.original_due_at,
                window=before.window,
            )
            content_moved(before, after)
        elif key in fresh:  # a new planned time (or deferred beyond a shorter horizon)
            retimed.append(Change(before, fresh[key]))
        elif schedule[key].original_due_at == before.original_due_at:
            cancelled.append(Cancellation(before, "horizon"))  # deferred past a shorter horizon
        else:
            cancelled.append(Cancellation(before, "missed"))

    present = set(keys)
    added = tuple(step for key, step in fresh.items() if key not in present or key in added_keys)
    return Migration(
        playbook=target.name,
        from_version=from_version,
        to_version=target.version,
        expires_at=expires,
        added=added,
        cancelled=tuple(cancelled),
        retimed=tuple(retimed),
        updated=tuple(updated),
        kept=tuple(kept),
        unchanged=tuple(unchanged),
    )
