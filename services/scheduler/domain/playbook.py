"""The playbook model: which segments a playbook matches and the steps it runs.

Playbooks are declarative (YAML files read by :mod:`.loader`, or built in code with
``Playbook.model_validate``). Validation happens in two layers: the schema (types, allowed
values, ranges) and the rules in :func:`check_playbook` (cross-field checks such as one
timing per step or discounts only for price churners). Both report field paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Any, Literal, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from services.scheduler.domain.durations import format_duration, parse_duration
from services.scheduler.domain.errors import FieldPath, PlaybookError, PlaybookProblem
from services.scheduler.domain.model import (
    DEFAULT_VARIANT,
    Channel,
    ChurnReason,
    EngagementLevel,
    LifecycleType,
    OnCap,
    Segment,
    TenureBand,
    ValueTier,
)
from services.scheduler.domain.windows import DEFAULT_LADDER, WindowLadder

CalendarRule: TypeAlias = Literal["budget_cycle", "quarter_start"]
"""``budget_cycle``: next start of the customer's fiscal year (calendar year if unknown);
``quarter_start``: next start of a quarter of that year."""
Trigger: TypeAlias = Literal["feature.released", "issue.resolved", "competitor.changed"]
"""What wakes a triggered step (``services/scheduler/wake.py``): the episode's feature ships,
a fix names its reason, feature or tags, or the competitor it left for changes."""
ExitEvent: TypeAlias = Literal["reactivated", "activity", "unsubscribed_all"]
StartsOn: TypeAlias = Literal["churned", "returned"]
"""When a playbook's cases open: ``churned`` (a win-back case, timed from the churn) or
``returned`` (a re-onboarding case for a won-back customer, timed from the return)."""
_T = TypeVar("_T")

REQUIRED_EXITS: frozenset[ExitEvent] = frozenset({"reactivated", "unsubscribed_all"})


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration such as '3d', '2w', '6mo', '1y' or 'P3D'")


Duration = Annotated[timedelta, BeforeValidator(_duration)]
Name = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=100)
]
Text = Annotated[str, StringConstraints(strict=True, max_length=2000)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NonEmpty = Field(min_length=1)


class MatchRule(_Frozen):
    """Which segments match. Each listed field narrows the match; an absent field matches
    anything. ``value_tiers`` and ``engagement`` take ``unknown`` for unknown values."""

    lifecycle: Annotated[frozenset[LifecycleType], _NonEmpty] | None = None
    reasons: Annotated[frozenset[ChurnReason], _NonEmpty] | None = None
    value_tiers: Annotated[frozenset[ValueTier], _NonEmpty] | None = None
    engagement: Annotated[frozenset[EngagementLevel], _NonEmpty] | None = None
    tenure: Annotated[frozenset[TenureBand], _NonEmpty] | None = None
    rechurn: Annotated[bool, Field(strict=True)] | None = None

    def matches(self, segment: Segment) -> bool:
        """Whether ``segment`` satisfies every listed condition."""
        return (
            (self.lifecycle is None or segment.lifecycle in self.lifecycle)
            and (self.reasons is None or segment.reason in self.reasons)
            and (self.value_tiers is None or segment.value_tier in self.value_tiers)
            and (self.engagement is None or segment.engagement in self.engagement)
            and (self.tenure is None or segment.tenure in self.tenure)
            and (self.rechurn is None or segment.is_rechurn == self.rechurn)
        )


class Variant(_Frozen):
    """An A/B arm of a step: its weight and what it changes (template and/or offer)."""

    name: Name
    weight: Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]
    template: Name | None = None
    offer: Name | None = None


class Step(_Frozen):
    """One step of a sequence. Its timing is exactly one of:

    * ``offset`` from churn (``"3d"``, ``"2w"``, ``"6mo"``);
    * ``calendar`` rule (optionally ``not_before`` a minimum time after churn);
    * ``trigger`` event (``feature.released``: fires when the episode's feature ships;
      ``issue.resolved``: when a fix names its reason, feature or tags;
      ``competitor.changed``: when the competitor it left for changes).

    ``when`` narrows the step to some segments (e.g. a CRM task for high value only).
    ``inactive_for`` (re-onboarding playbooks only) makes it a monitoring step: when due, it
    goes only once the customer has shown no activity for that long, counted from the return
    at the earliest; while they are active it waits, and it is skipped at the horizon.
    ``without_discount`` names the template sent when the guardrails withhold the step's
    discount; without it such a step is skipped.
    """

    key: Name
    offset: Duration | None = None
    calendar: CalendarRule | None = None
    not_before: Duration | None = None
    trigger: Trigger | None = None
    channel: Channel
    template: Name
    offer: Name | None = None
    is_discount: Annotated[bool, Field(strict=True)] = False
    without_discount: Name | None = None
    variants: tuple[Variant, ...] = ()
    on_cap: OnCap = "defer"
    when: MatchRule | None = None
    inactive_for: Duration | None = None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        """``(variant name, weight)`` pairs; empty when the step has no variants."""
        return tuple((variant.name, variant.weight) for variant in self.variants)

    def resolve(self, variant: str) -> tuple[str, str | None]:
        """``(template, offer)`` of the named variant (the step's own for the default)."""
        for candidate in self.variants:
            if candidate.name == variant:
                return candidate.template or self.template, candidate.offer or self.offer
        if variant == DEFAULT_VARIANT and not self.variants:
            return self.template, self.offer
        raise KeyError(f"step {self.key!r} has no variant {variant!r}")


DEFAULT_ATTRIBUTION_HORIZON = timedelta(days=365)
"""A return up to this long after the churn is recorded against the case (see
:attr:`Playbook.return_horizon`)."""
MAX_ATTRIBUTION_HORIZON = timedelta(days=548)
"""18 months: the sources' slowest returners."""


class WindowSpec(_Frozen):
    """A timing window's name and start (time since churn)."""

    name: Name
    start: Duration


class Playbook(_Frozen):
    """A versioned, declarative win-back playbook.

    ``priority``: higher wins when several playbooks match a segment. ``holdout``: share of
    matched customers who get no message at all (lift measurement). ``horizon`` and
    ``windows`` override the default window ladder. ``exit_on`` lists what closes a case;
    it always includes ``reactivated`` and ``unsubscribed_all``. ``starts_on``: ``churned``
    (default) for win-back playbooks, chosen when a churn is recorded and timed from it;
    ``returned`` for re-onboarding playbooks, chosen when a win-back case closes because the
    customer came back, timed from the return (offsets, windows and horizon count from it).
    """

    name: Name
    version: Annotated[int, Field(strict=True, ge=1)]
    description: Text = ""
    starts_on: StartsOn = "churned"
    priority: Annotated[int, Field(strict=True)] = 0
    holdout: Annotated[float, Field(ge=0, lt=1, strict=True)] = 0.0
    match: MatchRule = MatchRule()
    horizon: Duration | None = None
    windows: Annotated[tuple[WindowSpec, ...], Field(min_length=1)] | None = None
    exit_on: frozenset[ExitEvent] = REQUIRED_EXITS
    attribution_window_days: Annotated[int, Field(strict=True, ge=1, le=548)] = 90
    attribution_horizon: Duration | None = None
    steps: Annotated[tuple[Step, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _rules(self) -> Playbook:
        problems = list(check_playbook(self))
        if problems:
            raise PlaybookError(problems)
        return self

    @cached_property
    def ladder(self) -> WindowLadder:
        """This playbook's timing windows (the default ladder unless overridden)."""
        return _build_ladder(self)

    @property
    def attribution_window(self) -> timedelta:
        """How long after a sent step a reactivation is credited to it."""
        return timedelta(days=self.attribution_window_days)

    @property
    def return_horizon(self) -> timedelta:
        """How long after the churn a return is still recorded against the case, open or
        closed: ``attribution_horizon`` (default 12 months), never shorter than the case
        horizon."""
        chosen = self.attribution_horizon or DEFAULT_ATTRIBUTION_HORIZON
        return max(chosen, self.ladder.horizon)

    @property
    def is_reonboarding(self) -> bool:
        """Whether cases of this playbook open on a return (re-onboarding)."""
        return self.starts_on == "returned"

    @property
    def has_discount(self) -> bool:
        """Whether any step offers a discount."""
        return any(step.is_discount for step in self.steps)

    def exits_on(self, event: ExitEvent) -> bool:
        """Whether ``event`` closes a case run by this playbook."""
        return event in self.exit_on

    def step(self, key: str) -> Step:
        """The step with ``key``."""
        for candidate in self.steps:
            if candidate.key == key:
                return candidate
        raise KeyError(f"playbook {self.name!r} v{self.version} has no step {key!r}")


def _build_ladder(playbook: Playbook) -> WindowLadder:
    if playbook.windows is None:
        if playbook.horizon is None:
            return DEFAULT_LADDER
        return DEFAULT_LADDER.with_horizon(playbook.horizon)
    horizon = playbook.horizon if playbook.horizon is not None else DEFAULT_LADDER.horizon
    return WindowLadder.from_starts([(w.name, w.start) for w in playbook.windows], horizon)


def _narrowed(outer: frozenset[_T] | None, inner: frozenset[_T] | None) -> frozenset[_T] | None:
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer & inner


def check_playbook(playbook: Playbook) -> Iterator[PlaybookProblem]:
    """Yield every rule the playbook breaks (schema errors are pydantic's job).

    Rules: the window ladder is valid; ``exit_on`` keeps the required exits; step keys are
    unique; each step has exactly one timing; offsets and ``not_before`` lie inside the
    horizon; variant names are unique; a discount step has an offer in every variant and is
    restricted (by the playbook's ``match`` and the step's ``when``) to price churners, to
    engagement levels excluding ``low``, and to first-time churners; ``without_discount``
    only on discount steps. A re-onboarding playbook (``starts_on: returned``) never
    offers a discount, has no triggered steps and does not exit on ``activity`` (activity is
    what it watches); ``inactive_for`` is positive and only on re-onboarding playbooks.
    """

    def problem(path: FieldPath, reason: str) -> PlaybookProblem:
        return PlaybookProblem(path=path, reason=reason)

    try:
        horizon = _build_ladder(playbook).horizon
    except ValueError as exc:
        yield problem(("windows",) if playbook.windows is not None else ("horizon",), str(exc))
        horizon = None
    if playbook.attribution_horizon is not None and not (
        timedelta(0) < playbook.attribution_horizon <= MAX_ATTRIBUTION_HORIZON
    ):
        yield problem(
            ("attribution_horizon",),
            f"must be positive and at most {format_duration(MAX_ATTRIBUTION_HORIZON)} (18 months)",
        )
    missing_exits = REQUIRED_EXITS - playbook.exit_on
    if missing_exits:
        yield problem(("exit_on",), f"must include {', '.join(sorted(missing_exits))}")
    returned = playbook.starts_on == "returned"
    if returned and "activity" in playbook.exit_on:
        yield problem(
            ("exit_on",),
            "a re-onboarding playbook (starts_on: returned) cannot exit on activity: "
            "activity is what it watches",
        )

    seen: dict[str, int] = {}
    for index, step in enumerate(playbook.steps):
        at: FieldPath = ("steps", index)
        if step.key in seen:
            yield problem(
                (*at, "key"), f"duplicate step key {step.key!r} (also steps[{seen[step.key]}])"
            )
        seen.setdefault(step.key, index)

        timings = [
            name for name in ("offset", "calendar", "trigger") if getattr(step, name) is not None
        ]
        if len(timings) != 1:
            found = ", ".join(timings) or "none"
            yield problem(at, f"needs exactly one of offset, calendar, trigger (found {found})")
        if step.not_before is not None and step.calendar is None:
            yield problem((*at, "not_before"), "only applies to a calendar step")
        if horizon is not None:
            for name in ("offset", "not_before"):
                value: timedelta | None = getattr(step, name)
                if value is not None and value >= horizon:
                    yield problem(
                        (*at, name),
                        f"{format_duration(value)} is not inside the playbook horizon "
                        f"{format_duration(horizon)}",
                    )

        variant_names: dict[str, int] = {}
        for v_index, variant in enumerate(step.variants):
            if variant.name in variant_names:
                yield problem((*at, "variants", v_index, "name"), "duplicate variant name")
            variant_names.setdefault(variant.name, v_index)

        if step.without_discount is not None and not step.is_discount:
            yield problem((*at, "without_discount"), "only applies to a step with is_discount")
        if step.inactive_for is not None:
            if not returned:
                yield problem(
                    (*at, "inactive_for"),
                    "only applies to a re-onboarding playbook (starts_on: returned)",
                )
            elif step.inactive_for <= timedelta(0):
                yield problem((*at, "inactive_for"), "must be a positive duration")
        if returned:
            if step.is_discount:
                yield problem(
                    (*at, "is_discount"),
                    "re-onboarding (starts_on: returned) never offers a discount",
                )
            if step.trigger is not None:
                yield problem(
                    (*at, "trigger"),
                    "a re-onboarding playbook (starts_on: returned) has no triggered steps",
                )
        elif step.is_discount:
            yield from _discount_problems(playbook, step, at)


def _discount_problems(playbook: Playbook, step: Step, at: FieldPath) -> Iterator[PlaybookProblem]:
    if not step.variants and step.offer is None:
        yield PlaybookProblem((*at, "offer"), "a discount step needs an offer")
    for v_index, variant in enumerate(step.variants):
        if (variant.offer or step.offer) is None:
            yield PlaybookProblem(
                (*at, "variants", v_index, "offer"),
                "every variant of a discount step needs an offer",
            )
    when = step.when
    reasons = _narrowed(playbook.match.reasons, when.reasons if when else None)
    if reasons is None or reasons != {"price"}:
        yield PlaybookProblem(
            (*at, "is_discount"),
            "discounts are only for price churners: restrict match.reasons (or the step's "
            "when.reasons) to [price]",
        )
    engagement = _narrowed(playbook.match.engagement, when.engagement if when else None)
    if engagement is None or "low" in engagement:
        yield PlaybookProblem(
            (*at, "is_discount"),
            "never a discount to low engagement: restrict match.engagement (or the step's "
            "when.engagement) to levels other than low",
        )
    rechurn = when.rechurn if when is not None and when.rechurn is not None else None
    if rechurn is None:
        rechurn = playbook.match.rechurn
    if rechurn is not False:
        yield PlaybookProblem(
            (*at, "is_discount"),
            "no discount loop: set match.rechurn (or the step's when.rechurn) to false",
        )
