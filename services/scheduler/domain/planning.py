"""Choosing a playbook for a segment and planning its steps as due times.

Late-churn rule (a churn recorded after some steps were already due): the case starts at
the window that matches the time since churn. Of the steps whose planned time has passed,
only the latest *touch* inside the current window is kept — the step(s) the playbook put at
that one latest past moment, e.g. an email plus a CRM task — and it is due now; all other
past steps are dropped. So a late case never gets a burst of old steps, and a case recorded
on time (its day-0 step a few seconds late) behaves as expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.scheduler.domain.model import ChurnEpisode, CustomerView, PlannedStep, Segment
from services.scheduler.domain.playbook import CalendarRule, Playbook, StartsOn, Step
from services.scheduler.domain.variants import assign_variant, in_holdout
from shared.localtime import first_instant_at, resolve_zone

FEATURE_RELEASED = "feature.released"


def latest_versions(playbooks: Iterable[Playbook]) -> list[Playbook]:
    """The highest version of each playbook name: the ones new cases may start with."""
    latest: dict[str, Playbook] = {}
    for playbook in playbooks:
        current = latest.get(playbook.name)
        if current is None or playbook.version > current.version:
            latest[playbook.name] = playbook
    return list(latest.values())


def choose_playbook(
    playbooks: Iterable[Playbook], segment: Segment, starts_on: StartsOn = "churned"
) -> Playbook | None:
    """The playbook a new case in ``segment`` starts with, or ``None`` if none matches.

    ``starts_on`` says which kind of case opens: ``churned`` (a win-back case when a churn is
    recorded) only ever picks win-back playbooks, ``returned`` (a re-onboarding case when a
    won-back customer returns) only re-onboarding playbooks. Only the latest version of each
    playbook competes (older versions keep running the cases that started with them).
    Highest ``priority`` wins; ties go to the name first in alphabetical order, so the
    choice never depends on file order.
    """
    candidates = [
        p
        for p in latest_versions(playbooks)
        if p.starts_on == starts_on and p.match.matches(segment)
    ]
    return min(candidates, key=lambda p: (-p.priority, p.name), default=None)


def find_playbook(playbooks: Iterable[Playbook], name: str, version: int) -> Playbook:
    """The exact playbook version an existing case runs.

    Raises:
        KeyError: no such name and version.
    """
    for playbook in playbooks:
        if playbook.name == name and playbook.version == version:
            return playbook
    raise KeyError(f"no playbook {name!r} version {version}")


def reonboarding_anchor(episode: ChurnEpisode, returned_at: datetime) -> ChurnEpisode:
    """The episode a re-onboarding case plans with: the original churn (its reason, feature,
    competitor, MRR — what went wrong the first time) timed from the return, so offsets,
    windows and the horizon count from ``returned_at``."""
    return replace(episode, occurred_at=returned_at)


def plan_reonboarding(
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    returned_at: datetime,
    now: datetime,
    *,
    segment: Segment,
    fallback_timezone: str = "UTC",
) -> list[PlannedStep]:
    """Plan a re-onboarding case for a customer who came back at ``returned_at`` after
    ``episode``: exactly :func:`plan_steps` with the return as time zero (a return recorded
    late follows the late-churn rule from the return), holdout and variants included.
    """
    if not playbook.is_reonboarding:
        raise ValueError(f"playbook {playbook.name!r} is not a re-onboarding playbook")
    return plan_steps(
        playbook,
        customer,
        reonboarding_anchor(episode, returned_at),
        now,
        segment=segment,
        fallback_timezone=fallback_timezone,
    )


def case_expires_at(playbook: Playbook, episode: ChurnEpisode) -> datetime:
    """The end of the case horizon: churn time plus the playbook's horizon."""
    return episode.occurred_at + playbook.ladder.horizon


def next_calendar_boundary(
    rule: CalendarRule, after: datetime, zone: ZoneInfo, fiscal_year_start_month: int = 1
) -> datetime:
    """The first start (local midnight) of a fiscal year (``budget_cycle``) or fiscal quarter
    (``quarter_start``) strictly after ``after``, in UTC."""
    every = 12 if rule == "budget_cycle" else 3
    local = after.astimezone(zone)
    year, month = local.year, local.month
    for _ in range(14):
        if (month - fiscal_year_start_month) % every == 0:
            boundary = first_instant_at(date(year, month, 1), time(0), zone)
            if boundary > after:
                return boundary
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    raise AssertionError("a fiscal year always has a start within 13 months")  # unreachable


@dataclass(frozen=True, slots=True)
class _Candidate:
    index: int
    step: Step
    due_at: datetime


def _due_at(
    step: Step, episode: ChurnEpisode, zone: ZoneInfo, customer: CustomerView
) -> datetime | None:
    churn = episode.occurred_at
    if step.offset is not None:
        return churn + step.offset
    if step.calendar is not None:
        after = churn + (step.not_before or timedelta(0))
        return next_calendar_boundary(
            step.calendar, after, zone, customer.fiscal_year_start_month or 1
        )
    return None  # triggered steps have no planned time


def planned_due_at(
    step: Step, episode: ChurnEpisode, customer: CustomerView, fallback_timezone: str = "UTC"
) -> datetime | None:
    """When :func:`plan_steps` puts ``step`` before the late-churn rule and the horizon
    (``None`` for a triggered step): what a simulation shows for a step it left out."""
    return _due_at(step, episode, resolve_zone(customer.timezone, fallback_timezone), customer)


def plan_step(
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    step: Step,
    *,
    due_at: datetime,
    original_due_at: datetime,
    holdout: bool,
) -> PlannedStep:
    """One step of ``playbook`` as a timer row due at ``due_at``: the customer's variant, its
    template and offer, the window ``due_at`` falls in and the case horizon.

    ``due_at`` must lie inside the horizon (churn <= due_at < churn + horizon).
    """
    variant = assign_variant(customer.customer_id, step.key, step.weights)
    template, offer = step.resolve(variant)
    window = playbook.ladder.window_for(max(due_at - episode.occurred_at, timedelta(0)))
    assert window is not None, "steps beyond the horizon are filtered before"
    return PlannedStep(
        playbook=playbook.name,
        playbook_version=playbook.version,
        step_key=step.key,
        channel=step.channel,
        template=template,
        offer=offer,
        is_discount=step.is_discount,
        due_at=due_at,
        original_due_at=original_due_at,
        variant=variant,
        window=window.name,
        on_cap=step.on_cap,
        holdout=holdout,
        expires_at=case_expires_at(playbook, episode),
        discount_fallback_template=step.without_discount,
        trigger=step.trigger,
        inactive_for=step.inactive_for,
    )


def plan_steps(
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    *,
    segment: Segment,
    fallback_timezone: str = "UTC",
) -> list[PlannedStep]:
    """Plan the timed steps of a new case, sorted by due time (then playbook order).

    * offset steps are due at churn + offset; calendar steps at the next boundary in the
      customer's timezone (``fallback_timezone`` when unknown) strictly after churn +
      ``not_before``; triggered steps are not planned here (see :func:`plan_triggered`);
    * steps whose ``when`` does not match ``segment`` are left out;
    * nothing is due before churn or at/after the horizon; no steps at all once the
      horizon has passed;
    * a late-recorded churn follows the module's late-churn rule (one touch caught up);
    * holdout customers get their steps planned with ``holdout=True`` (the guardrails skip
      them), so the case records what the holdout did not receive.
    """
    churn = episode.occurred_at
    expires = case_expires_at(playbook, episode)
    if now >= expires:
        return []
    effective_now = max(now, churn)
    ladder = playbook.ladder
    zone = resolve_zone(customer.timezone, fallback_timezone)

    candidates: list[_Candidate] = []
    for index, step in enumerate(playbook.steps):
        if step.when is not None and not step.when.matches(segment):
            continue
        due = _due_at(step, episode, zone, customer)
        if due is None or due < churn or due >= expires:
            continue
        candidates.append(_Candidate(index, step, due))

    current = ladder.window_for(effective_now - churn)
    past_here = [
        c
        for c in candidates
        if c.due_at < effective_now and ladder.window_for(c.due_at - churn) == current
    ]
    latest_past = max((c.due_at for c in past_here), default=None)
    kept = [c for c in candidates if c.due_at >= effective_now or c.due_at == latest_past]

    holdout = in_holdout(customer.customer_id, playbook.name, playbook.holdout)
    planned = [
        plan_step(
            playbook,
            customer,
            episode,
            c.step,
            due_at=max(c.due_at, effective_now),
            original_due_at=c.due_at,
            holdout=holdout,
        )
        for c in sorted(kept, key=lambda c: (max(c.due_at, effective_now), c.index))
    ]
    return planned


def normalise_feature(name: str) -> str:
    """Feature names compare case-, space-, ``_``- and ``-``-insensitively."""
    return " ".join(name.casefold().replace("_", " ").replace("-", " ").split())


def plan_triggered(
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    *,
    feature: str,
    segment: Segment,
    already_planned: Sequence[str] = (),
) -> list[PlannedStep]:
    """Steps a ``feature.released`` event for ``feature`` wakes in this case, due ``now``.

    They fire however long ago the customer left, as long as the case horizon has not
    passed, and only when the released feature is the one the episode names (compared with
    :func:`normalise_feature`). Steps whose key is in ``already_planned`` are left out, so a
    second release event for the same feature sends nothing twice.
    """
    if episode.feature is None or normalise_feature(feature) != normalise_feature(episode.feature):
        return []
    churn = episode.occurred_at
    if now >= case_expires_at(playbook, episode):
        return []
    due = max(now, churn)
    holdout = in_holdout(customer.customer_id, playbook.name, playbook.holdout)
    return [
        plan_step(
            playbook, customer, episode, step, due_at=due, original_due_at=due, holdout=holdout
        )
        for step in playbook.steps
        if step.trigger == FEATURE_RELEASED
        and step.key not in already_planned
        and (step.when is None or step.when.matches(segment))
    ]
