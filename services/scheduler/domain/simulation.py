"""What would this customer get, and when? A dry run of a churn through the scheduler's rules.

:func:`simulate` answers with the rules the services run, nothing restated: segmentation
(:func:`~.segmentation.segment`), the playbook choice (:func:`~.planning.choose_playbook`),
planning with holdout and variants (:func:`~.planning.plan_steps`) and, for each planned step,
the guardrails (:func:`~.guardrails.decide`) at each moment the step timer would look at it:
when it falls due, and again at each time a deferral names — as the timer does, in due-time
order, with every message the simulation sends counted in the contact history (caps, the
discount period) of the steps after it. Pure: plain data in, plain data out, nothing written.

What it cannot know: activity, returns, unsubscribes and consent changes after ``now`` (a
case closes on a return; the timeline assumes none comes), and when a feature ships (triggered
steps are listed as waiting for it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, TypeAlias

from services.scheduler.domain.guardrails import DEFAULT_POLICY, GuardrailPolicy, decide
from services.scheduler.domain.model import (
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Decision,
    Defer,
    PlannedStep,
    Segment,
    Send,
    Skip,
)
from services.scheduler.domain.planning import (
    case_expires_at,
    choose_playbook,
    latest_versions,
    plan_steps,
    planned_due_at,
)
from services.scheduler.domain.playbook import MatchRule, Playbook, Step
from services.scheduler.domain.segmentation import (
    DEFAULT_THRESHOLDS,
    SegmentationThresholds,
    segment,
)
from services.scheduler.domain.variants import in_holdout

Verdict: TypeAlias = Literal["chosen", "no_match", "outranked", "reonboarding", "older_version"]
Outcome: TypeAlias = Literal["sent", "skipped"]

MAX_LOOKS = 1000
"""A step deferred this often is reported skipped (never reached: every deferral moves on)."""

_SEGMENT_FIELD = {
    "lifecycle": "lifecycle",
    "reasons": "reason",
    "value_tiers": "value_tier",
    "engagement": "engagement",
    "tenure": "tenure",
    "rechurn": "is_rechurn",
}


def unmet_conditions(rule: MatchRule, seg: Segment) -> list[str]:
    """The conditions of ``rule`` that ``seg`` fails, each as ``field: segment value not in
    [allowed]`` (empty when the rule matches). Each condition is checked by the rule itself
    (``MatchRule.matches`` on a rule holding only that condition)."""
    unmet: list[str] = []
    for name, attribute in _SEGMENT_FIELD.items():
        wanted = getattr(rule, name)
        if wanted is None or MatchRule.model_validate({name: wanted}).matches(seg):
            continue
        have = getattr(seg, attribute)
        if isinstance(wanted, bool):
            unmet.append(f"{name}: {str(have).lower()}, wants {str(wanted).lower()}")
        else:
            unmet.append(f"{name}: {have} not in [{', '.join(sorted(wanted))}]")
    return unmet


def describe_rule(rule: MatchRule | None) -> str:
    """A match rule as one line (``everything`` when it lists no condition)."""
    if rule is None:
        return "everything"
    parts: list[str] = []
    for name in _SEGMENT_FIELD:
        wanted = getattr(rule, name)
        if wanted is None:
            continue
        if isinstance(wanted, bool):
            parts.append(f"{name}={str(wanted).lower()}")
        else:
            parts.append(f"{name} in [{', '.join(sorted(wanted))}]")
    return ", ".join(parts) or "everything"


@dataclass(frozen=True, slots=True)
class Consideration:
    """A loaded playbook and why a new win-back case in this segment does or does not run
    it."""

    playbook: Playbook
    verdict: Verdict
    reason: str


@dataclass(frozen=True, slots=True)
class Look:
    """The guardrails' answer when the step timer looks at a step at ``at``."""

    at: datetime
    decision: Decision


@dataclass(frozen=True, slots=True)
class SimulatedStep:
    """A planned step and every look the timer takes at it until it is sent or skipped."""

    planned: PlannedStep
    looks: tuple[Look, ...]

    @property
    def first(self) -> Decision:
        """What the guardrails do when the step falls due."""
        return self.looks[0].decision

    @property
    def final(self) -> Look:
        """The last look: a send or a skip."""
        return self.looks[-1]

    @property
    def outcome(self) -> Outcome:
        return "sent" if isinstance(self.final.decision, Send) else "skipped"

    @property
    def sent(self) -> PlannedStep | None:
        """The step as it goes out (the offer-free fallback when its discount is withheld)."""
        decision = self.final.decision
        return decision.step if isinstance(decision, Send) else None

    @property
    def deferrals(self) -> tuple[Defer, ...]:
        return tuple(look.decision for look in self.looks if isinstance(look.decision, Defer))


@dataclass(frozen=True, slots=True)
class UnplannedStep:
    """A step of the chosen playbook the case would not plan, and why."""

    step: Step
    reason: str
    due_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Simulation:
    """The answer: the segment, the playbooks considered, the one chosen (``None``: no
    playbook matches), holdout, whether a case opens (``no_case``: why not) and the timeline."""

    customer: CustomerView
    episode: ChurnEpisode
    now: datetime
    segment: Segment
    considered: tuple[Consideration, ...]
    playbook: Playbook | None
    holdout: bool
    expires_at: datetime | None
    timeline: tuple[SimulatedStep, ...]
    unplanned: tuple[UnplannedStep, ...]
    no_case: str | None = None

    def between(self, start: datetime | None, end: datetime | None) -> tuple[SimulatedStep, ...]:
        """The timeline's steps planned at or after ``start`` and before ``end``."""
        return tuple(
            s
            for s in self.timeline
            if (start is None or s.planned.due_at >= start)
            and (end is None or s.planned.due_at < end)
        )


def consider(playbooks: Sequence[Playbook], seg: Segment) -> tuple[Consideration, ...]:
    """Every loaded playbook with its verdict for a new win-back case in ``seg``: the one
    :func:`~.planning.choose_playbook` picks, and for each other why not."""
    chosen = choose_playbook(playbooks, seg)
    latest = {(p.name, p.version) for p in latest_versions(playbooks)}
    newest = {p.name: p.version for p in latest_versions(playbooks)}
    found: list[Consideration] = []
    for p in sorted(playbooks, key=lambda p: (-p.priority, p.name, -p.version)):
        if chosen is not None and p is chosen:
            found.append(Consideration(p, "chosen", _chosen_because(p)))
        elif (p.name, p.version) not in latest:
            found.append(
                Consideration(p, "older_version", f"new cases start with version {newest[p.name]}")
            )
        elif p.starts_on != "churned":
            found.append(Consideration(p, "reonboarding", "opens on a return, not on a churn"))
        elif unmet := unmet_conditions(p.match, seg):
            found.append(Consideration(p, "no_match", "; ".join(unmet)))
        else:
            assert chosen is not None  # p matches, so something was chosen
            why = (
                f"priority {p.priority} < {chosen.name}'s {chosen.priority}"
                if p.priority < chosen.priority
                else f"same priority as {chosen.name}, which comes first by name"
            )
            found.append(Consideration(p, "outranked", f"matches, but {why}"))
    return tuple(found)


def _chosen_because(p: Playbook) -> str:
    return f"matches ({describe_rule(p.match)}), priority {p.priority}"


def run_timeline(
    planned: Sequence[PlannedStep],
    *,
    customer: CustomerView,
    seg: Segment,
    history: ContactHistory,
    policy: GuardrailPolicy,
) -> tuple[SimulatedStep, ...]:
    """Fire ``planned`` as the step timer does: take the earliest due step, ask the
    guardrails at its due time; a send joins the contact history, a deferral makes the step
    due again at the time it names (the timer moves its row's ``due_at`` there), a skip ends
    it. Ties go in plan order. Returned in plan order."""
    queue = [(step.due_at, index, step) for index, step in enumerate(planned)]
    heapq.heapify(queue)
    looks: dict[int, list[Look]] = {index: [] for index in range(len(planned))}
    while queue:
        at, index, step = heapq.heappop(queue)
        decision: Decision = decide(
            step, customer=customer, segment=seg, history=history, now=at, policy=policy
        )
        if isinstance(decision, Defer) and len(looks[index]) >= MAX_LOOKS:
            decision = Skip("expired", f"deferred {MAX_LOOKS} times")
        looks[index].append(Look(at, decision))
        if isinstance(decision, Send):
            history = history.with_send(at, discount=decision.step.is_discount)
        elif isinstance(decision, Defer):
            heapq.heappush(queue, (decision.until, index, replace(step, due_at=decision.until)))
    return tuple(SimulatedStep(planned[i], tuple(looks[i])) for i in range(len(planned)))


def simulate(
    playbooks: Sequence[Playbook],
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    *,
    history: ContactHistory | None = None,
    policy: GuardrailPolicy = DEFAULT_POLICY,
    thresholds: SegmentationThresholds = DEFAULT_THRESHOLDS,
) -> Simulation:
    """What a churn recorded at ``now`` opens for ``customer``: segment, playbook, holdout,
    and each step's guardrail decisions (see the module docstring). ``history``: the
    customer's messages sent before ``now`` in other cases (caps and the discount period)."""
    seg = segment(customer, episode, now, thresholds)
    considered = consider(playbooks, seg)
    chosen = choose_playbook(playbooks, seg)
    if chosen is None:
        return Simulation(
            customer,
            episode,
            now,
            seg,
            considered,
            None,
            False,
            None,
            (),
            (),
            "no playbook matches",
        )
    holdout = in_holdout(customer.customer_id, chosen.name, chosen.holdout)
    expires = case_expires_at(chosen, episode)
    if now >= expires:
        why = "the churn is older than the playbook's horizon: the customer is off the list"
        return Simulation(
            customer, episode, now, seg, considered, chosen, holdout, expires, (), (), why
        )
    zone = policy.fallback_timezone
    planned = plan_steps(chosen, customer, episode, now, segment=seg, fallback_timezone=zone)
    timeline = run_timeline(
        planned, customer=customer, seg=seg, history=history or ContactHistory(), policy=policy
    )
    keys = {p.step_key for p in planned}
    unplanned = tuple(
        _unplanned(step, chosen, customer, episode, seg, now, zone)
        for step in chosen.steps
        if step.key not in keys
    )
    return Simulation(
        customer, episode, now, seg, considered, chosen, holdout, expires, timeline, unplanned
    )


def _unplanned(
    step: Step,
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    seg: Segment,
    now: datetime,
    zone: str,
) -> UnplannedStep:
    if step.when is not None and (unmet := unmet_conditions(step.when, seg)):
        return UnplannedStep(step, f"when: {'; '.join(unmet)}")
    if step.trigger == "competitor.changed":
        if episode.competitor is None:
            return UnplannedStep(step, f"on {step.trigger}: the churn names no competitor, never")
        return UnplannedStep(
            step, f"on {step.trigger} of {episode.competitor!r}: sent when it does, in the horizon"
        )
    if step.trigger == "issue.resolved":
        return UnplannedStep(
            step, f"on {step.trigger} naming {episode.reason!r}: sent when fixed, in the horizon"
        )
    if step.trigger is not None:
        if episode.feature is None:
            return UnplannedStep(step, f"on {step.trigger}: the churn names no feature, never")
        return UnplannedStep(
            step, f"on {step.trigger} of {episode.feature!r}: sent when it ships, in the horizon"
        )
    due = planned_due_at(step, episode, customer, zone)
    if due is not None and due >= case_expires_at(playbook, episode):
        return UnplannedStep(step, "horizon: due at or after the case horizon", due)
    if due is not None and due < max(now, episode.occurred_at):
        return UnplannedStep(
            step, "missed: its time had passed when the churn was recorded (late churn)", due
        )
    return UnplannedStep(step, "not planned", due)  # pragma: no cover - every case is above
