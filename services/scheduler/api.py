"""The status API other services query: a customer's win-back state, case lists and controls,
moving open cases onto a new playbook version, and GDPR erasure. Every route needs a bearer
token; errors are problem+json."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from services.scheduler import store
from services.scheduler.case_migration import InvalidMigration, MigrationRun, UnknownPlaybook
from services.scheduler.commands import Action, CaseClosed, NoSuchCase, NoSuchCustomer
from services.scheduler.commands import control_case as run_control
from services.scheduler.commands import erase_customer as run_erasure
from services.scheduler.deps import ApiSettings, ClockDep, Engine, Migrator, Settings, UnitsOfWork
from services.scheduler.domain import DEFAULT_LADDER, Playbook, WindowLadder, find_playbook
from services.scheduler.queries import cases as queries
from services.scheduler.views import migration_json, returned_at_of
from shared.http.auth import require_scope
from shared.http.problems import Problem
from shared.http.types import INTEGRAL, IsoDateTime

CustomerId = Annotated[str, Path(min_length=1, max_length=200)]
CaseId = Annotated[str, Path(min_length=1, max_length=36)]
PlaybookName = Annotated[str, Path(min_length=1, max_length=100)]


class StepOut(BaseModel):
    step_key: str
    channel: str
    template: str
    offer: str | None
    variant: str
    window: str
    state: str
    state_reason: str | None
    due_at: datetime
    due_at_local: str
    fired_at: datetime | None
    outcome: dict[str, Any]


class CaseOut(BaseModel):
    id: str
    customer_id: str
    purpose: Literal["winback", "reonboarding"] = Field(
        description="winback: the customer left; reonboarding: they came back after one"
    )
    status: str
    close_reason: str | None
    playbook: str
    playbook_version: int
    segment: dict[str, Any]
    episode: dict[str, Any]
    window: str | None
    holdout: bool
    is_rechurn: bool
    churned_at: datetime
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    returned_at: datetime | None
    next_step: StepOut | None = None
    steps: list[StepOut] = Field(default_factory=list)


class WinbackStatus(BaseModel):
    customer_id: str
    timezone: str | None
    consent: dict[str, bool]
    opted_out_all: bool
    suppressed_channels: list[str]
    erased: bool
    open_case: CaseOut | None
    past_cases: list[CaseOut]


class CasePage(BaseModel):
    items: list[CaseOut]
    next_cursor: str | None


class MigrationIn(BaseModel):
    """Move open cases of a playbook from one version to another."""

    model_config = ConfigDict(extra="forbid")

    from_version: Annotated[
        int, Field(strict=True, ge=1, description="the cases' version"), INTEGRAL
    ]
    to_version: Annotated[
        int | None,
        Field(strict=True, ge=1, description="default: the latest loaded version"),
        INTEGRAL,
    ] = None
    dry_run: Annotated[
        bool, Field(strict=True, description="plan and show each case's changes; write nothing")
    ] = False
    limit: Annotated[
        int,
        Field(strict=True, ge=1, le=10_000, description="at most this many cases per call"),
        INTEGRAL,
    ] = 1000


class PlannedStepOut(BaseModel):
    step_key: str
    channel: str
    template: str
    offer: str | None
    variant: str
    window: str
    due_at: datetime
    original_due_at: datetime


class CancelledStepOut(BaseModel):
    step_key: str
    cause: str = Field(description="removed, missed, not_planned, now_triggered or horizon")
    due_at: datetime


class ChangedStepOut(PlannedStepOut):
    changed: list[str] = Field(description="the fields that changed")
    from_due_at: datetime | None = None


class CaseMigrationOut(BaseModel):
    case_id: str
    customer_id: str
    status: str
    expires_at: datetime
    added: list[PlannedStepOut]
    cancelled: list[CancelledStepOut]
    retimed: list[ChangedStepOut]
    updated: list[ChangedStepOut]
    kept: list[str] = Field(description="steps left as they are: sent, in flight, skipped, …")
    unchanged: list[str]


class MigrationOut(BaseModel):
    playbook: str
    from_version: int
    to_version: int
    dry_run: bool
    cases_migrated: int = Field(description="cases moved (a dry run: that would be moved)")
    cases_skipped: int = Field(description="closed or moved meanwhile by another call")
    steps_added: int
    steps_cancelled: int
    steps_retimed: int
    steps_updated: int
    remaining: int = Field(description="open cases still on from_version after this call")
    cases: list[CaseMigrationOut] | None = Field(
        default=None, description="each case's changes (dry run only)"
    )


def _migration_out(run: MigrationRun) -> MigrationOut:
    return MigrationOut(
        playbook=run.playbook,
        from_version=run.from_version,
        to_version=run.to_version,
        dry_run=run.dry_run,
        cases_migrated=len(run.cases),
        cases_skipped=run.skipped,
        steps_added=run.total("added"),
        steps_cancelled=run.total("cancelled"),
        steps_retimed=run.total("retimed"),
        steps_updated=run.total("updated"),
        remaining=run.remaining,
        cases=[
            CaseMigrationOut.model_validate(
                {
                    "case_id": c.case_id,
                    "customer_id": c.customer_id,
                    "status": c.status,
                    **migration_json(c.migration),
                }
            )
            for c in run.cases
        ]
        if run.dry_run
        else None,
    )


def _local(when: datetime, tz: str | None, fallback: str) -> str:
    try:
        zone = ZoneInfo(tz or fallback)
    except Exception:
        zone = ZoneInfo(fallback)
    return when.astimezone(zone).isoformat()


def _ladder_of(playbooks: Sequence[Playbook], name: str, version: int) -> WindowLadder:
    try:
        return find_playbook(playbooks, name, version).ladder
    except KeyError:
        return DEFAULT_LADDER


def _window_of(playbooks: Sequence[Playbook], case: Row[Any], now: datetime) -> str | None:
    ladder = _ladder_of(playbooks, case.playbook, case.playbook_version)
    # a re-onboarding case's windows count from the return, a win-back case's from churn;
    # an event time a little ahead of our clock must not break the status page
    start = returned_at_of(case.episode) or case.churned_at
    window = ladder.window_for(max(now - start, timedelta(0)))
    return window.name if window is not None else None


def _step_out(row: Row[Any], tz: str | None, fallback_timezone: str) -> StepOut:
    return StepOut(
        step_key=row.step_key,
        channel=row.channel,
        template=row.template,
        offer=row.offer,
        variant=row.variant,
        window=row.window,
        state=row.state,
        state_reason=row.state_reason,
        due_at=row.due_at,
        due_at_local=_local(row.due_at, tz, fallback_timezone),
        fired_at=row.fired_at,
        outcome=row.outcome or {},
    )


def _cases_out(found: queries.CaseRows, settings: ApiSettings, now: datetime) -> list[CaseOut]:
    return [_case_out(case, found, settings, now) for case in found.cases]


def _case_out(
    case: Row[Any], found: queries.CaseRows, settings: ApiSettings, now: datetime
) -> CaseOut:
    tz = found.timezones.get(case.customer_id)
    outs = [_step_out(s, tz, settings.fallback_timezone) for s in found.steps_of(case.id)]
    pending = [o for o in outs if o.state == "pending"]
    return CaseOut(
        id=case.id,
        customer_id=case.customer_id,
        purpose=case.purpose,
        status=case.status,
        close_reason=case.close_reason,
        playbook=case.playbook,
        playbook_version=case.playbook_version,
        segment=case.segment,
        episode=case.episode,
        window=_window_of(settings.playbooks, case, now) if case.status != "closed" else None,
        holdout=case.holdout,
        is_rechurn=case.is_rechurn,
        churned_at=case.churned_at,
        opened_at=case.opened_at,
        expires_at=case.expires_at,
        closed_at=case.closed_at,
        returned_at=case.returned_at,
        next_step=min(pending, key=lambda o: o.due_at) if pending else None,
        steps=outs,
    )


def _invalid(field: str, reason: str, detail: str | None = None) -> Problem:
    return Problem(
        422,
        "Invalid parameter",
        detail or f"{field}: {reason}",
        errors=[{"field": field, "reason": reason}],
    )


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at_text, case_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(at_text), case_id
    except Exception:
        raise _invalid("cursor", "malformed", "cursor: not a cursor from this API") from None


def _encode_cursor(last: Row[Any]) -> str:
    return base64.urlsafe_b64encode(f"{last.opened_at.isoformat()}|{last.id}".encode()).decode()


# 401 and 403 (no key, or a key without the route's scope) and 503 are documented for every
# route by shared.http.problems.document_problems
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "not found (problem+json)"},
    422: {"description": "invalid parameter, named (problem+json)"},
}
routes = APIRouter(prefix="/v1", tags=["win-back status"])


def router(auth: Callable[..., Awaitable[None]] | None = None) -> APIRouter:
    """The status API's routes; each declares the API key scope it needs (``require_scope``:
    the keys are the app's, ``create_app(api_keys=...)``), ``auth`` is an extra guard if
    given. They read the engine, clock and settings ``deps.install`` put in the app's state."""
    guarded = APIRouter(dependencies=[Depends(auth)] if auth is not None else [])
    guarded.include_router(routes)
    return guarded


@routes.get(
    "/customers/{customer_id}/winback",
    response_model=WinbackStatus,
    responses=RESPONSES,
    summary="A customer's win-back status",
    operation_id="getCustomerWinback",
    dependencies=[require_scope("read")],
)
async def customer_status(
    customer_id: CustomerId, engine: Engine, clock: ClockDep, settings: Settings
) -> WinbackStatus:
    now = clock.now()
    async with engine.connect() as conn:
        found = await queries.customer_cases(conn, customer_id)
    if found is None:
        raise Problem(404, "Not found", f"no customer {customer_id!r}")
    person = found.person
    outs = _cases_out(found, settings, now)
    return WinbackStatus(
        customer_id=customer_id,
        timezone=found.timezones.get(customer_id),
        consent=dict(person.consent) if person is not None else {},
        opted_out_all=bool(person.opted_out_all) if person is not None else False,
        suppressed_channels=list(person.suppressed_channels or []) if person else [],
        erased=person is not None and person.erased_at is not None,
        open_case=next((o for o in outs if o.status in store.OPEN), None),
        past_cases=[o for o in outs if o.status not in store.OPEN],
    )


@routes.get(
    "/cases",
    response_model=CasePage,
    responses=RESPONSES,
    summary="Cases, filtered, newest first, with cursor pagination",
    dependencies=[require_scope("read")],
)
async def list_cases(
    engine: Engine,
    clock: ClockDep,
    settings: Settings,
    status: Annotated[Literal["open", "paused", "closed"] | None, Query()] = None,
    purpose: Annotated[Literal["winback", "reonboarding"] | None, Query()] = None,
    segment: Annotated[
        str | None, Query(description="lifecycle type, churn reason or segment label")
    ] = None,
    playbook: Annotated[str | None, Query()] = None,
    window: Annotated[str | None, Query(description="timing window name")] = None,
    due_before: Annotated[
        IsoDateTime | None,
        Query(description="only cases with a pending step due before this time"),
    ] = None,
    cursor: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> CasePage:
    now = clock.now()
    in_window = None
    if window:
        try:
            in_window = queries.in_window(settings.playbooks, window, now)
        except queries.UnknownWindow as exc:
            raise _invalid("window", f"one of {', '.join(exc.names)}", str(exc)) from None
    if due_before is not None and due_before.tzinfo is None:
        raise _invalid("due_before", "needs a UTC offset")
    where = queries.CaseFilter(
        status=status,
        purpose=purpose,
        segment=segment,
        playbook=playbook,
        window=in_window,
        due_before=due_before,
        after=_decode_cursor(cursor) if cursor else None,
    )
    async with engine.connect() as conn:
        found, more = await queries.case_page(conn, where, limit)
    return CasePage(
        items=_cases_out(found, settings, now),
        next_cursor=_encode_cursor(found.cases[-1]) if more else None,
    )


def _control_route(action: Action) -> Callable[..., Awaitable[CaseOut]]:
    # a closure, not a default argument: FastAPI would publish that as a query parameter
    async def control(case_id: CaseId, work: UnitsOfWork, settings: Settings) -> CaseOut:
        try:
            found, now = await run_control(work, case_id, action)
        except NoSuchCase:
            raise Problem(404, "Not found", f"no case {case_id!r}") from None
        except CaseClosed as exc:
            raise Problem(409, "Case is closed", str(exc)) from None
        return _case_out(found.cases[0], found, settings, now)

    return control


ACTIONS: tuple[Action, ...] = ("pause", "resume", "cancel")
for _action in ACTIONS:
    routes.add_api_route(
        f"/cases/{{case_id}}/{_action}",
        _control_route(_action),
        methods=["POST"],
        response_model=CaseOut,
        responses={**RESPONSES, 409: {"description": "the case is closed (problem+json)"}},
        summary=f"{_action.capitalize()} a case",
        name=f"{_action}_case",
        dependencies=[require_scope("operate")],
    )


@routes.post(
    "/playbooks/{name}/migrations",
    response_model=MigrationOut,
    responses=RESPONSES,
    summary="Move open cases onto another version of their playbook",
    operation_id="migratePlaybookCases",
    dependencies=[require_scope("operate")],
    description=(
        "Moves at most `limit` open (or paused) cases running `from_version` onto "
        "`to_version` (default: the latest loaded version), one transaction per case: "
        "sent and in-flight steps are kept, pending steps the new version drops are "
        "cancelled (reason `migrated`), changed ones retimed or updated, new ones planned "
        "as for a case opened now. Publishes `case.migrated` per case. `remaining` says how "
        "many cases are left: call again until it is 0."
    ),
)
async def migrate_cases(name: PlaybookName, body: MigrationIn, migrator: Migrator) -> MigrationOut:
    try:
        run = await migrator.run(
            name, body.from_version, body.to_version, dry_run=body.dry_run, limit=body.limit
        )
    except UnknownPlaybook as exc:
        raise Problem(404, "Not found", str(exc)) from None
    except InvalidMigration as exc:
        raise _invalid(exc.field, exc.reason, str(exc)) from None
    return _migration_out(run)


@routes.delete(
    "/customers/{customer_id}",
    status_code=202,
    responses=RESPONSES,
    summary="GDPR erasure: every service removes the person's data",
    operation_id="eraseCustomer",
    dependencies=[require_scope("erase")],
)
async def erase(customer_id: CustomerId, work: UnitsOfWork) -> dict[str, Any]:
    try:
        await run_erasure(work, customer_id)
    except NoSuchCustomer:
        raise Problem(404, "Not found", f"no customer {customer_id!r}") from None
    return {"customer_id": customer_id, "erased": True}
