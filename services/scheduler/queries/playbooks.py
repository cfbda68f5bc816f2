"""The loaded playbooks as ``GET /v1/playbooks`` lists them: what each matches and the steps
it runs, with each timing in words. Read from the playbooks the scheduler loaded at start-up
(no database)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from services.scheduler.domain import MatchRule, Playbook, Step, format_duration, latest_versions
from services.scheduler.domain.simulation import describe_rule


class MatchOut(BaseModel):
    """A match rule: each listed field narrows the match; an absent (null) one matches
    anything."""

    lifecycle: list[str] | None = None
    reasons: list[str] | None = None
    value_tiers: list[str] | None = None
    engagement: list[str] | None = None
    tenure: list[str] | None = None
    rechurn: bool | None = None
    text: str = Field(description="the rule in one line ('everything' when it lists nothing)")


class VariantOut(BaseModel):
    name: str
    weight: float
    template: str | None = Field(description="null: the step's template")
    offer: str | None = Field(description="null: the step's offer")


class PlaybookStepOut(BaseModel):
    key: str
    timing: str = Field(description="when it is due, in words: '3d after churn', …")
    channel: str
    template: str
    offer: str | None
    is_discount: bool
    without_discount: str | None = Field(
        description="the template sent when the guardrails withhold the discount (null: skip)"
    )
    on_cap: str = Field(description="defer or skip when a frequency cap blocks it")
    when: MatchOut | None = Field(description="the segments the step is for (null: all)")
    variants: list[VariantOut]


class PlaybookOut(BaseModel):
    name: str
    version: int
    latest: bool = Field(description="new cases start with this version (older ones run on)")
    description: str
    priority: int = Field(description="higher wins when several playbooks match")
    starts_on: str = Field(description="churned (win-back) or returned (re-onboarding)")
    holdout: float = Field(description="share of matched customers who get no message")
    match: MatchOut
    horizon: str = Field(description="how long after the churn (or return) the case runs")
    windows: list[str] = Field(description="the timing windows: 'name from start'")
    attribution_window_days: int
    attribution_horizon: str = Field(description="how long after the churn a return counts")
    exit_on: list[str]
    steps: list[PlaybookStepOut]


class PlaybookList(BaseModel):
    items: list[PlaybookOut]


def match_out(rule: MatchRule) -> MatchOut:
    def listed(values: frozenset[str] | None) -> list[str] | None:
        return sorted(values) if values is not None else None

    return MatchOut(
        lifecycle=listed(rule.lifecycle),
        reasons=listed(rule.reasons),
        value_tiers=listed(rule.value_tiers),
        engagement=listed(rule.engagement),
        tenure=listed(rule.tenure),
        rechurn=rule.rechurn,
        text=describe_rule(rule),
    )


_CALENDAR = {"budget_cycle": "next fiscal year start", "quarter_start": "next quarter start"}


def timing(step: Step, starts_on: str = "churned") -> str:
    """A step's timing in words."""
    anchor = "return" if starts_on == "returned" else "churn"
    if step.offset is not None:
        text = f"{format_duration(step.offset)} after {anchor}"
    elif step.calendar is not None:
        text = _CALENDAR[step.calendar]
        if step.not_before is not None:
            text += f", at least {format_duration(step.not_before)} after {anchor}"
    else:
        text = f"on {step.trigger}"
    if step.inactive_for is not None:
        text += f", once inactive for {format_duration(step.inactive_for)}"
    return text


def playbook_out(playbook: Playbook, latest: bool) -> PlaybookOut:
    return PlaybookOut(
        name=playbook.name,
        version=playbook.version,
        latest=latest,
        description=playbook.description,
        priority=playbook.priority,
        starts_on=playbook.starts_on,
        holdout=playbook.holdout,
        match=match_out(playbook.match),
        horizon=format_duration(playbook.ladder.horizon),
        windows=[f"{w.name} from {format_duration(w.start)}" for w in playbook.ladder.windows],
        attribution_window_days=playbook.attribution_window_days,
        attribution_horizon=format_duration(playbook.return_horizon),
        exit_on=sorted(playbook.exit_on),
        steps=[
            PlaybookStepOut(
                key=step.key,
                timing=timing(step, playbook.starts_on),
                channel=step.channel,
                template=step.template,
                offer=step.offer,
                is_discount=step.is_discount,
                without_discount=step.without_discount,
                on_cap=step.on_cap,
                when=match_out(step.when) if step.when is not None else None,
                variants=[
                    VariantOut(name=v.name, weight=v.weight, template=v.template, offer=v.offer)
                    for v in step.variants
                ],
            )
            for step in playbook.steps
        ],
    )


def playbook_list(playbooks: Sequence[Playbook]) -> PlaybookList:
    """Every loaded playbook, highest priority first (then by name and version)."""
    latest = {(p.name, p.version) for p in latest_versions(playbooks)}
    ordered = sorted(playbooks, key=lambda p: (-p.priority, p.name, p.version))
    return PlaybookList(items=[playbook_out(p, (p.name, p.version) in latest) for p in ordered])
