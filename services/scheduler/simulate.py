"""``GET /v1/playbooks`` (what is loaded) and ``POST /v1/simulate`` (what would this customer
get, and when?), and the readable table ``winback simulate`` prints.

Simulate reads the customer (their profile, latest churn and messages sent in other cases)
and runs the pure planner (:mod:`services.scheduler.domain.simulation`): nothing is written,
nothing published.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler.deps import ClockDep, Engine, Settings
from services.scheduler.domain import (
    DEFAULT_POLICY,
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Defer,
    GuardrailPolicy,
    Playbook,
    Send,
    Skip,
)
from services.scheduler.domain.model import Channel, ChurnReason, EpisodeKind
from services.scheduler.domain.simulation import SimulatedStep, Simulation, simulate
from services.scheduler.queries.playbooks import MatchOut, PlaybookList, match_out, playbook_list
from services.scheduler.queries.simulation import known_customer
from services.scheduler.views import customer_view
from shared.contracts.inbound import (
    AwareTime,
    Comment,
    Minor,
    ShortText,
    TimeZone,
)
from shared.http.auth import require_scope
from shared.http.problems import Problem
from shared.http.types import INTEGRAL, IsoDate
from shared.localtime import resolve_zone

SIMULATED_ID = "simulated"
_FIRST_DAY, _LAST_DAY = date(1970, 1, 1), date(2199, 12, 30)
Day = Annotated[IsoDate, Field(ge=_FIRST_DAY, le=_LAST_DAY)]
Currency = Annotated[
    str | None,
    Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code (3 letters)"),
    AfterValidator(lambda code: code.upper() if code is not None else None),
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileIn(_In):
    """A customer who need not exist: what the scheduler would know of them."""

    id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="assigns holdout and variants as for that customer id",
        ),
    ] = SIMULATED_ID
    timezone: TimeZone = None
    locale: Annotated[str | None, Field(max_length=35)] = None
    engagement: Literal["high", "medium", "low"] | None = None
    mrr_minor: Annotated[Minor | None, INTEGRAL] = None
    currency: Currency = None
    customer_since: AwareTime = None
    consent: dict[Channel, bool] = Field(
        default_factory=dict, description="per channel: true given, false withdrawn"
    )
    opted_out_all: bool = False
    suppressed_channels: list[Channel] = Field(default_factory=list)
    plan: ShortText | None = None
    crm_owner: ShortText | None = None
    fiscal_year_start_month: Annotated[int | None, Field(strict=True, ge=1, le=12), INTEGRAL] = None


class ChurnIn(_In):
    """A churn as ingest records it (reason already normalised)."""

    kind: EpisodeKind = "subscription_cancelled"
    reason: ChurnReason = "unknown"
    comment: Comment | None = None
    feature: ShortText | None = None
    competitor: ShortText | None = None
    mrr_minor: Annotated[Minor | None, INTEGRAL] = None
    currency: Currency = None
    occurred_at: AwareTime = Field(default=None, description="default: now")
    prior_win_back_at: AwareTime = Field(
        default=None, description="set: they had been won back before (a re-churn)"
    )


class SimulateIn(_In):
    """A known customer (``customer_id``: their profile and latest churn; ``churn`` replaces
    that churn) or an inline ``profile`` with a ``churn``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    customer_id: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    profile: ProfileIn | None = None
    churn: ChurnIn | None = None
    from_: Annotated[
        Day | None, Field(alias="from", description="show steps due on or after this day (UTC)")
    ] = None
    until: Annotated[Day | None, Field(description="show steps due up to this day (UTC)")] = None
    now: AwareTime = Field(
        default=None,
        description="when the churn is recorded (default: for the customer's recorded churn, "
        "when its case opened; otherwise the scheduler's clock)",
    )


class SegmentOut(BaseModel):
    lifecycle: str
    reason: str
    value_tier: str
    engagement: str
    tenure: str
    is_rechurn: bool
    days_since_churn: int
    labels: list[str]


class ProfileOut(BaseModel):
    customer_id: str
    known: bool = Field(description="true: read from the scheduler's records")
    timezone: str = Field(description="the zone local times are in (fallback if unknown)")
    locale: str | None
    engagement: str | None
    mrr_minor: int | None
    currency: str | None
    customer_since: datetime | None
    consent: dict[str, bool]
    opted_out_all: bool
    suppressed_channels: list[str]
    plan: str | None = None
    crm_owner: str | None


class ChurnOut(BaseModel):
    kind: str
    reason: str
    occurred_at: datetime
    occurred_at_local: str
    feature: str | None
    competitor: str | None
    comment: str | None = None
    mrr_minor: int | None
    prior_win_back_at: datetime | None
    source: Literal["recorded", "given"] = Field(
        description="recorded: the customer's latest churn; given: from the request"
    )


class ChosenOut(BaseModel):
    name: str
    version: int
    priority: int
    match: MatchOut
    why: str


class ConsideredOut(BaseModel):
    name: str
    version: int
    priority: int
    verdict: Literal["chosen", "no_match", "outranked", "reonboarding", "older_version"]
    reason: str


class HoldoutOut(BaseModel):
    share: float
    in_holdout: bool = Field(description="true: every step is skipped (lift measurement)")


class DeferralOut(BaseModel):
    at: datetime = Field(description="when the timer looked")
    until: datetime
    until_local: str
    reason: str = Field(description="quiet_hours, frequency_cap, not_due or not_at_risk")


class TimelineStepOut(BaseModel):
    step_key: str
    channel: str
    template: str
    offer: str | None
    is_discount: bool
    variant: str = Field(description="the customer's A/B arm ('default': no variants)")
    variants: list[str] = Field(description="the step's arms")
    window: str
    due_at: datetime
    due_at_local: str
    caught_up: bool = Field(description="its time had passed (late churn): due at once")
    action: Literal["send", "defer", "skip"] = Field(
        description="what the guardrails do when it falls due"
    )
    reason: str | None = Field(description="why deferred or skipped, or the discount withheld")
    deferrals: list[DeferralOut]
    outcome: Literal["sent", "skipped"]
    at: datetime = Field(description="when it is sent, or skipped")
    at_local: str
    sent_template: str | None = Field(description="the template that goes out (null: skipped)")
    sent_offer: str | None


class NotPlannedOut(BaseModel):
    step_key: str
    channel: str
    template: str
    reason: str
    due_at: datetime | None
    due_at_local: str | None


class SimulationOut(BaseModel):
    customer: ProfileOut
    churn: ChurnOut
    now: datetime
    segment: SegmentOut
    playbook: ChosenOut | None = Field(description="null: no playbook matches")
    considered: list[ConsideredOut] = Field(description="every loaded playbook and its verdict")
    holdout: HoldoutOut | None
    opens_case: bool
    no_case_reason: str | None
    expires_at: datetime | None
    expires_at_local: str | None
    range_from: date | None
    range_until: date | None
    timeline: list[TimelineStepOut]
    not_planned: list[NotPlannedOut]


def profile_view(profile: ProfileIn, churn: ChurnIn) -> CustomerView:
    return CustomerView(
        customer_id=profile.id,
        timezone=profile.timezone,
        locale=profile.locale,
        mrr_minor=profile.mrr_minor,
        currency=churn.currency or profile.currency,
        customer_since=profile.customer_since,
        engagement=profile.engagement,
        crm_owner=profile.crm_owner,
        consent=dict(profile.consent),
        opted_out_all=profile.opted_out_all,
        suppressed_channels=frozenset(profile.suppressed_channels),
        fiscal_year_start_month=profile.fiscal_year_start_month,
    )


def churn_episode(
    churn: ChurnIn, customer_id: str, now: datetime, prior: datetime | None
) -> ChurnEpisode:
    """The episode of a churn given in the request (``prior``: the customer's last recorded
    win-back, kept only if it came before this churn, as the scheduler does)."""
    occurred = churn.occurred_at or now
    prior = churn.prior_win_back_at or prior
    return ChurnEpisode(
        episode_id=f"simulated:{customer_id}:{occurred.isoformat()}",
        kind=churn.kind,
        occurred_at=occurred,
        reason=churn.reason,
        feature=churn.feature,
        competitor=churn.competitor,
        mrr_at_churn_minor=churn.mrr_minor,
        prior_win_back_at=prior if prior is not None and prior <= occurred else None,
    )


class InvalidRequest(ValueError):
    """The request names something that cannot be simulated: ``field`` and ``reason``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class UnknownCustomer(LookupError):
    pass


async def run_simulation(
    conn: AsyncConnection | None,
    body: SimulateIn,
    playbooks: Sequence[Playbook],
    policy: GuardrailPolicy,
    clock_now: datetime,
) -> SimulationOut:
    """Answer ``body`` (``conn`` is needed for a ``customer_id``).

    Raises:
        InvalidRequest: neither or both of customer_id and profile, a profile without a
            churn, a customer without a recorded churn and none given, from after until.
        UnknownCustomer: no such customer (or erased).
    """
    if (body.customer_id is None) == (body.profile is None):
        raise InvalidRequest("customer_id", "give either customer_id or profile (with churn)")
    if body.from_ is not None and body.until is not None and body.from_ > body.until:
        raise InvalidRequest("from", "must not be after until")
    now = body.now or clock_now
    source: Literal["recorded", "given"] = "given"
    plan = None
    if body.customer_id is not None:
        assert conn is not None
        known = await known_customer(conn, body.customer_id)
        if known is None:
            raise UnknownCustomer(body.customer_id)
        view = customer_view(known.row._mapping)
        plan = known.row.plan
        if body.churn is not None:
            if body.churn.currency is not None:
                view = _with_currency(view, body.churn.currency)
            episode = churn_episode(body.churn, view.customer_id, now, known.row.last_won_back_at)
        elif known.episode is not None:
            episode, source = known.episode, "recorded"
            now = body.now or known.recorded_at or clock_now
        else:
            raise InvalidRequest("churn", "the customer has no churn on record: give one")
        history = known.history(episode.episode_id, now)
    else:
        assert body.profile is not None
        if body.churn is None:
            raise InvalidRequest("churn", "an inline profile needs a churn")
        view = profile_view(body.profile, body.churn)
        plan = body.profile.plan
        episode = churn_episode(body.churn, view.customer_id, now, None)
        history = ContactHistory()
    result = simulate(playbooks, view, episode, now, history=history, policy=policy)
    return simulation_out(
        result,
        policy,
        known=body.customer_id is not None,
        source=source,
        plan=plan,
        comment=body.churn.comment if body.churn is not None else None,
        start=body.from_,
        end=body.until,
    )


def _with_currency(view: CustomerView, currency: str) -> CustomerView:
    return replace(view, currency=currency)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), UTC)


def _why(decision: Send | Defer | Skip) -> str | None:
    if isinstance(decision, Send):
        if decision.offer_withheld is None:
            return None
        return f"discount withheld ({decision.offer_withheld}): sends {decision.step.template}"
    if isinstance(decision, Defer):
        return decision.reason
    return decision.reason + (f": {decision.detail}" if decision.detail else "")


def _timeline_out(
    step: SimulatedStep, local: Callable[[datetime], str], variants: list[str]
) -> TimelineStepOut:
    planned, first, final = step.planned, step.first, step.final
    sent = step.sent
    return TimelineStepOut(
        step_key=planned.step_key,
        channel=planned.channel,
        template=planned.template,
        offer=planned.offer,
        is_discount=planned.is_discount,
        variant=planned.variant,
        variants=variants,
        window=planned.window,
        due_at=planned.due_at,
        due_at_local=local(planned.due_at),
        caught_up=planned.caught_up,
        action="send"
        if isinstance(first, Send)
        else "defer"
        if isinstance(first, Defer)
        else "skip",
        reason=_why(first) if not isinstance(final.decision, Skip) else _why(final.decision),
        deferrals=[
            DeferralOut(
                at=look.at,
                until=look.decision.until,
                until_local=local(look.decision.until),
                reason=look.decision.reason,
            )
            for look in step.looks
            if isinstance(look.decision, Defer)
        ],
        outcome=step.outcome,
        at=final.at,
        at_local=local(final.at),
        sent_template=sent.template if sent is not None else None,
        sent_offer=sent.offer if sent is not None else None,
    )


def simulation_out(
    result: Simulation,
    policy: GuardrailPolicy = DEFAULT_POLICY,
    *,
    known: bool = False,
    source: Literal["recorded", "given"] = "given",
    plan: str | None = None,
    comment: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> SimulationOut:
    """The API's answer for a simulation; the timeline limited to ``start``..``end`` (days,
    UTC, both included)."""
    customer, episode, seg, chosen = (
        result.customer,
        result.episode,
        result.segment,
        result.playbook,
    )
    zone = resolve_zone(customer.timezone, policy.fallback_timezone)

    def local(at: datetime) -> str:
        return at.astimezone(zone).isoformat()

    variants = {s.key: [v.name for v in s.variants] for s in chosen.steps} if chosen else {}
    shown = result.between(
        _day_start(start) if start is not None else None,
        _day_start(end) + timedelta(days=1) if end is not None else None,
    )
    return SimulationOut(
        customer=ProfileOut(
            customer_id=customer.customer_id,
            known=known,
            timezone=zone.key,
            locale=customer.locale,
            engagement=customer.engagement,
            mrr_minor=customer.mrr_minor,
            currency=customer.currency,
            customer_since=customer.customer_since,
            consent=dict(customer.consent),
            opted_out_all=customer.opted_out_all,
            suppressed_channels=sorted(customer.suppressed_channels),
            plan=plan,
            crm_owner=customer.crm_owner,
        ),
        churn=ChurnOut(
            kind=episode.kind,
            reason=episode.reason,
            occurred_at=episode.occurred_at,
            occurred_at_local=local(episode.occurred_at),
            feature=episode.feature,
            competitor=episode.competitor,
            comment=comment,
            mrr_minor=episode.mrr_at_churn_minor,
            prior_win_back_at=episode.prior_win_back_at,
            source=source,
        ),
        now=result.now,
        segment=SegmentOut(
            lifecycle=seg.lifecycle,
            reason=seg.reason,
            value_tier=seg.value_tier,
            engagement=seg.engagement,
            tenure=seg.tenure,
            is_rechurn=seg.is_rechurn,
            days_since_churn=seg.days_since_churn,
            labels=sorted(seg.labels),
        ),
        playbook=ChosenOut(
            name=chosen.name,
            version=chosen.version,
            priority=chosen.priority,
            match=match_out(chosen.match),
            why=next(c.reason for c in result.considered if c.verdict == "chosen"),
        )
        if chosen is not None
        else None,
        considered=[
            ConsideredOut(
                name=c.playbook.name,
                version=c.playbook.version,
                priority=c.playbook.priority,
                verdict=c.verdict,
                reason=c.reason,
            )
            for c in result.considered
        ],
        holdout=HoldoutOut(share=chosen.holdout, in_holdout=result.holdout)
        if chosen is not None
        else None,
        opens_case=result.no_case is None,
        no_case_reason=result.no_case,
        expires_at=result.expires_at,
        expires_at_local=local(result.expires_at) if result.expires_at is not None else None,
        range_from=start,
        range_until=end,
        timeline=[_timeline_out(s, local, variants.get(s.planned.step_key, [])) for s in shown],
        not_planned=[
            NotPlannedOut(
                step_key=u.step.key,
                channel=u.step.channel,
                template=u.step.template,
                reason=u.reason,
                due_at=u.due_at,
                due_at_local=local(u.due_at) if u.due_at is not None else None,
            )
            for u in result.unplanned
        ],
    )


def _short(at: datetime, zone: ZoneInfo | None = None) -> str:
    shown = at.astimezone(zone) if zone is not None else at.astimezone(UTC)
    return shown.strftime("%Y-%m-%d %H:%M")


_VERDICTS = {
    "outranked": "outranked",
    "no_match": "no match",
    "reonboarding": "re-onboarding (opens on a return)",
    "older_version": "older version",
}


def _considered_lines(considered: Sequence[ConsideredOut]) -> list[str]:
    """The other playbooks, briefly: one line per verdict (a no-match names the failing
    conditions; ``--json`` has each reason in full)."""
    lines: list[str] = []
    for verdict, label in _VERDICTS.items():
        names = []
        for c in considered:
            if c.verdict != verdict:
                continue
            if verdict == "no_match":
                failing = ", ".join(part.split(":")[0] for part in c.reason.split("; "))
                names.append(f"{c.name} ({failing})")
            elif verdict == "outranked":
                names.append(f"{c.name} ({c.reason.removeprefix('matches, but ')})")
            else:
                names.append(c.name)
        if names:
            head = "considered " if not lines else "           "
            lines.append(f"{head}{label}: {', '.join(names)}")
    return lines


def render_table(out: SimulationOut) -> str:
    """The answer as ``winback simulate`` prints it: a few header lines and one row per step."""
    zone = ZoneInfo(out.customer.timezone)
    seg = out.segment
    lines = [
        f"customer   {out.customer.customer_id} ({'known' if out.customer.known else 'inline'})"
        f", timezone {out.customer.timezone}",
        f"churn      {out.churn.kind}, reason {out.churn.reason}, "
        f"at {_short(out.churn.occurred_at)} UTC ({out.churn.source}); simulated at "
        f"{_short(out.now)} UTC",
        f"segment    {seg.lifecycle}, reason {seg.reason}, value {seg.value_tier}, "
        f"engagement {seg.engagement}, tenure {seg.tenure}, rechurn "
        f"{str(seg.is_rechurn).lower()}" + (f" [{', '.join(seg.labels)}]" if seg.labels else ""),
    ]
    if out.playbook is None:
        lines.append("playbook   none matches")
    else:
        pb = out.playbook
        lines.append(f"playbook   {pb.name} v{pb.version}: {pb.why}")
    if out.holdout is not None:
        member = "IN the holdout: nothing is sent" if out.holdout.in_holdout else "not in it"
        lines.append(f"holdout    {out.holdout.share:.0%} share, {member}")
    lines += _considered_lines(out.considered)
    if not out.opens_case:
        lines.append(f"no case     {out.no_case_reason}")
        return "\n".join(lines) + "\n"
    header = ("step", "channel", "template / offer", "variant", "due UTC", "due local", "then")
    rows = [header]
    for step in out.timeline:
        what = step.template + (f" / {step.offer}" if step.offer else "")
        then = step.action if step.reason is None else f"{step.action}: {step.reason}"
        if step.deferrals:
            then += " -> " + (
                f"sent {_short(step.at)} UTC ({_short(step.at, zone)} local)"
                if step.outcome == "sent"
                else f"skipped {_short(step.at)} UTC"
            )
        rows.append(
            (
                step.step_key,
                step.channel,
                what,
                step.variant,
                _short(step.due_at),
                _short(step.due_at, zone),
                then,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines.append("")
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    for left_out in out.not_planned:
        lines.append(f"not planned  {left_out.step_key}: {left_out.reason}")
    if out.expires_at is not None:
        lines.append(f"case ends    {_short(out.expires_at)} UTC (horizon)")
    return "\n".join(lines) + "\n"


def _problem(field: str, reason: str) -> Problem:
    return Problem(
        422, "Invalid parameter", f"{field}: {reason}", errors=[{"field": field, "reason": reason}]
    )


RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such customer (problem+json)"},
    422: {"description": "invalid body, the field named (problem+json)"},
}
routes = APIRouter(prefix="/v1", tags=["playbooks"])


def router() -> APIRouter:
    """``GET /v1/playbooks`` and ``POST /v1/simulate`` (scope ``read``); they read the
    playbooks and guardrail policy ``deps.install`` put in the app's state."""
    guarded = APIRouter()
    guarded.include_router(routes)
    return guarded


@routes.get(
    "/playbooks",
    response_model=PlaybookList,
    summary="The loaded playbooks: what each matches and the steps it runs",
    operation_id="listPlaybooks",
    dependencies=[require_scope("read")],
)
async def list_playbooks(settings: Settings) -> PlaybookList:
    return playbook_list(settings.playbooks)


@routes.post(
    "/simulate",
    response_model=SimulationOut,
    responses=RESPONSES,
    summary="What would this customer get, and when? (a dry run; nothing is written)",
    operation_id="simulateCustomer",
    dependencies=[require_scope("read")],
    description=(
        "Segments the customer, picks the playbook as a churn recorded at `now` would (and "
        "says why the others were not), assigns holdout and variants, and runs the "
        "guardrails over every planned step at the times the step timer would: each step "
        "says send, defer (to when, why) or skip (why), with due times in UTC and in the "
        "customer's local time. `customer_id`: a known customer, their profile, their "
        "latest churn (or `churn`) and their messages in other cases; or an inline `profile` "
        "with a `churn`."
    ),
)
async def simulate_route(
    body: SimulateIn, engine: Engine, clock: ClockDep, settings: Settings
) -> SimulationOut:
    try:
        if body.customer_id is not None:
            async with engine.connect() as conn:
                return await run_simulation(
                    conn, body, settings.playbooks, settings.policy, clock.now()
                )
        return await run_simulation(None, body, settings.playbooks, settings.policy, clock.now())
    except InvalidRequest as exc:
        raise _problem(exc.field, exc.reason) from None
    except UnknownCustomer:
        raise Problem(404, "Not found", f"no customer {body.customer_id!r}") from None
