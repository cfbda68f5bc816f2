"""The status API other services query: a customer's win-back state, case lists and controls,
moving open cases onto a new playbook version, and GDPR erasure. Every route needs a bearer
token; errors are problem+json."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    TIMESTAMP,
    ColumnElement,
    Row,
    and_,
    cast,
    false,
    func,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import store
from services.scheduler.case_migration import (
    CaseMigrator,
    InvalidMigration,
    MigrationRun,
    UnknownPlaybook,
)
from services.scheduler.domain import DEFAULT_LADDER, Playbook, WindowLadder, find_playbook
from services.scheduler.domain.case import Refused
from services.scheduler.views import migration_json, returned_at_of
from shared import domain_events as de
from shared.clock import Clock
from shared.contracts.customer import CustomerErased
from shared.db.tables import case_steps, cases, scheduler_customers
from shared.http.problems import Problem
from shared.http.types import INTEGRAL, IsoDateTime
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES
from shared.messaging.uow import UnitOfWork
from shared.retry import REQUEST

log = logging.getLogger(__name__)

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


def router(
    engine: AsyncEngine,
    clock: Clock,
    playbooks: list[Playbook],
    auth: Any,
    *,
    erasure_topic: str,
    outcomes_topic: str,
    source: str,
    fallback_timezone: str = "UTC",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> APIRouter:
    def unit(name: str) -> UnitOfWork:
        """One unit of work of the API (``max_record_bytes``: kafka.max_record_bytes)."""
        return UnitOfWork(engine, clock, source, max_record_bytes, name=f"scheduler.{name}")

    api = APIRouter(prefix="/v1", tags=["win-back status"], dependencies=[Depends(auth)])
    responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing bearer token (problem+json)"},
        403: {"description": "bad bearer token (problem+json)"},
        404: {"description": "not found (problem+json)"},
        422: {"description": "invalid parameter, named (problem+json)"},
    }

    def ladder_of(name: str, version: int) -> WindowLadder:
        try:
            return find_playbook(playbooks, name, version).ladder
        except KeyError:
            return DEFAULT_LADDER

    def window_of(case: Row[Any], now: datetime) -> str | None:
        ladder = ladder_of(case.playbook, case.playbook_version)
        # a re-onboarding case's windows count from the return, a win-back case's from churn;
        # an event time a little ahead of our clock must not break the status page
        start = returned_at_of(case.episode) or case.churned_at
        window = ladder.window_for(max(now - start, timedelta(0)))
        return window.name if window is not None else None

    def in_window(name: str, now: datetime) -> ColumnElement[bool]:
        """Cases whose ``window`` (see ``window_of``) is ``name`` now, each measured on its
        own playbook's ladder (the default one for a playbook no longer loaded)."""
        ladders: dict[WindowLadder, list[tuple[str, int]]] = {}
        for p in playbooks:
            ladders.setdefault(p.ladder, []).append((p.name, p.version))
        known = [key for keys in ladders.values() for key in keys]
        every = (DEFAULT_LADDER, *ladders)
        names = list(dict.fromkeys(w.name for ladder in every for w in ladder.windows))
        if name not in names:
            raise Problem(
                422,
                "Invalid parameter",
                f"window: must be one of {', '.join(names)}",
                errors=[{"field": "window", "reason": f"one of {', '.join(names)}"}],
            )
        start = func.coalesce(
            cast(cases.c.episode["returned_at"].astext, TIMESTAMP(timezone=True)),
            cases.c.churned_at,
        )
        pairs = tuple_(cases.c.playbook, cases.c.playbook_version)
        choices: list[tuple[WindowLadder, ColumnElement[bool]]] = [
            (ladder, pairs.in_(keys)) for ladder, keys in ladders.items()
        ]
        choices.append((DEFAULT_LADDER, pairs.not_in(known) if known else true()))
        matches: list[ColumnElement[bool]] = []
        for ladder, runs in choices:
            span = next((w for w in ladder.windows if w.name == name), None)
            if span is None:
                continue
            condition = and_(runs, start > now - span.end)
            if span.start > timedelta(0):  # the first window also takes a start a bit ahead
                condition = and_(condition, start <= now - span.start)
            matches.append(condition)
        return or_(*matches) if matches else false()

    def step_out(row: Row[Any], tz: str | None) -> StepOut:
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

    def case_out(case: Row[Any], steps: list[Row[Any]], tz: str | None, now: datetime) -> CaseOut:
        outs = [step_out(s, tz) for s in steps]
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
            window=window_of(case, now) if case.status != "closed" else None,
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

    @api.get(
        "/customers/{customer_id}/winback",
        response_model=WinbackStatus,
        responses=responses,
        summary="A customer's win-back status",
    )
    async def customer_status(customer_id: CustomerId) -> WinbackStatus:
        now = clock.now()
        async with engine.connect() as conn:
            person = await store.customer(conn, customer_id)
            all_cases = (
                await conn.execute(
                    cases.select()
                    .where(cases.c.customer_id == customer_id)
                    .order_by(cases.c.opened_at.desc())
                )
            ).all()
            if person is None and not all_cases:
                raise Problem(404, "Not found", f"no customer {customer_id!r}")
            steps = (
                await conn.execute(
                    case_steps.select()
                    .where(case_steps.c.customer_id == customer_id)
                    .order_by(case_steps.c.due_at, case_steps.c.id)
                )
            ).all()
        tz = person.timezone if person is not None else None
        by_case: dict[str, list[Row[Any]]] = {}
        for s in steps:
            by_case.setdefault(s.case_id, []).append(s)
        outs = [case_out(c, by_case.get(c.id, []), tz, now) for c in all_cases]
        return WinbackStatus(
            customer_id=customer_id,
            timezone=tz,
            consent=dict(person.consent) if person is not None else {},
            opted_out_all=bool(person.opted_out_all) if person is not None else False,
            suppressed_channels=list(person.suppressed_channels or []) if person else [],
            erased=person is not None and person.erased_at is not None,
            open_case=next((o for o in outs if o.status in store.OPEN), None),
            past_cases=[o for o in outs if o.status not in store.OPEN],
        )

    @api.get(
        "/cases",
        response_model=CasePage,
        responses=responses,
        summary="Cases, filtered, newest first, with cursor pagination",
    )
    async def list_cases(
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
        query = select(cases)
        if status:
            query = query.where(cases.c.status == status)
        if purpose:
            query = query.where(cases.c.purpose == purpose)
        if segment:
            query = query.where(
                or_(
                    cases.c.segment["lifecycle"].astext == segment,
                    cases.c.segment["reason"].astext == segment,
                    cases.c.segment["labels"].contains([segment]),
                )
            )
        if playbook:
            query = query.where(cases.c.playbook == playbook)
        if window:
            query = query.where(in_window(window, now))
        if due_before is not None:
            if due_before.tzinfo is None:
                raise Problem(
                    422,
                    "Invalid parameter",
                    "due_before: needs a UTC offset",
                    errors=[{"field": "due_before", "reason": "needs a UTC offset"}],
                )
            query = query.where(
                select(case_steps.c.id)
                .where(
                    case_steps.c.case_id == cases.c.id,
                    case_steps.c.state == "pending",
                    case_steps.c.due_at < due_before,
                )
                .exists()
            )
        if cursor:
            try:
                at_text, case_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
                at = datetime.fromisoformat(at_text)
            except Exception:
                raise Problem(
                    422,
                    "Invalid parameter",
                    "cursor: not a cursor from this API",
                    errors=[{"field": "cursor", "reason": "malformed"}],
                ) from None
            query = query.where(
                or_(cases.c.opened_at < at, and_(cases.c.opened_at == at, cases.c.id < case_id))
            )
        query = query.order_by(cases.c.opened_at.desc(), cases.c.id.desc()).limit(limit + 1)
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            page = rows[:limit]
            tzs = dict(
                (
                    await conn.execute(
                        select(scheduler_customers.c.id, scheduler_customers.c.timezone).where(
                            scheduler_customers.c.id.in_([r.customer_id for r in page])
                        )
                    )
                ).all()
            )
            steps = (
                await conn.execute(
                    case_steps.select()
                    .where(case_steps.c.case_id.in_([r.id for r in page]))
                    .order_by(case_steps.c.due_at)
                )
            ).all()
        by_case: dict[str, list[Row[Any]]] = {}
        for s in steps:
            by_case.setdefault(s.case_id, []).append(s)
        items = [case_out(r, by_case.get(r.id, []), tzs.get(r.customer_id), now) for r in page]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1]
            next_cursor = base64.urlsafe_b64encode(
                f"{last.opened_at.isoformat()}|{last.id}".encode()
            ).decode()
        return CasePage(items=items, next_cursor=next_cursor)

    async def _control(case_id: str, action: str) -> CaseOut:
        once = functools.partial(_control_once, case_id, action)
        return await REQUEST.call(once, f"case {action}", log)

    async def _control_once(case_id: str, action: str) -> CaseOut:
        async with unit(f"{action}_case") as tx:
            conn, now = tx.conn, tx.now
            case = await store.load_case(conn, case_id, lock=True)
            if case is None:
                raise Problem(404, "Not found", f"no case {case_id!r}")
            commands = {"pause": case.pause, "resume": case.resume, "cancel": case.cancel}
            result = commands[action](now)
            if isinstance(result, Refused):
                if result.code == "closed":
                    raise Problem(409, "Case is closed", result.detail)
                # pausing a paused case or resuming an open one: already so, nothing to do
            else:
                await store.save_cases(tx, outcomes_topic, [result])
            row = await store.case_by_id(conn, case_id)
            steps = (
                await conn.execute(
                    case_steps.select()
                    .where(case_steps.c.case_id == case_id)
                    .order_by(case_steps.c.due_at)
                )
            ).all()
            tz = await conn.scalar(
                select(scheduler_customers.c.timezone).where(
                    scheduler_customers.c.id == case.customer_id
                )
            )
        assert row is not None
        return case_out(row, list(steps), tz, now)

    def control_route(action: str) -> Callable[[str], Awaitable[CaseOut]]:
        # a closure, not a default argument: FastAPI would publish that as a query parameter
        async def control(case_id: CaseId) -> CaseOut:
            return await _control(case_id, action)

        return control

    for action in ("pause", "resume", "cancel"):
        api.add_api_route(
            f"/cases/{{case_id}}/{action}",
            control_route(action),
            methods=["POST"],
            response_model=CaseOut,
            responses={**responses, 409: {"description": "the case is closed (problem+json)"}},
            summary=f"{action.capitalize()} a case",
            name=f"{action}_case",
        )

    migrator = CaseMigrator(
        engine,
        clock,
        playbooks,
        outcomes_topic,
        source,
        fallback_timezone=fallback_timezone,
        max_record_bytes=max_record_bytes,
    )

    @api.post(
        "/playbooks/{name}/migrations",
        response_model=MigrationOut,
        responses=responses,
        summary="Move open cases onto another version of their playbook",
        description=(
            "Moves at most `limit` open (or paused) cases running `from_version` onto "
            "`to_version` (default: the latest loaded version), one transaction per case: "
            "sent and in-flight steps are kept, pending steps the new version drops are "
            "cancelled (reason `migrated`), changed ones retimed or updated, new ones planned "
            "as for a case opened now. Publishes `case.migrated` per case. `remaining` says how "
            "many cases are left: call again until it is 0."
        ),
    )
    async def migrate_cases(name: PlaybookName, body: MigrationIn) -> MigrationOut:
        try:
            run = await migrator.run(
                name,
                body.from_version,
                body.to_version,
                dry_run=body.dry_run,
                limit=body.limit,
            )
        except UnknownPlaybook as exc:
            raise Problem(404, "Not found", str(exc)) from None
        except InvalidMigration as exc:
            raise Problem(
                422,
                "Invalid parameter",
                str(exc),
                errors=[{"field": exc.field, "reason": exc.reason}],
            ) from None
        return _migration_out(run)

    @api.delete(
        "/customers/{customer_id}",
        status_code=202,
        responses=responses,
        summary="GDPR erasure: every service removes the person's data",
    )
    async def erase(customer_id: CustomerId) -> dict[str, Any]:
        return await REQUEST.call(functools.partial(_erase, customer_id), "erasure", log)

    async def _erase(customer_id: str) -> dict[str, Any]:
        async with unit("erase_customer") as tx:
            conn, now = tx.conn, tx.now
            person = await store.customer(conn, customer_id)
            if person is None:
                raise Problem(404, "Not found", f"no customer {customer_id!r}")
            hashes = {}
            if person.email:
                hashes["email"] = store.address_hash("email", person.email)
            if person.phone:
                hashes["sms"] = store.address_hash("sms", person.phone)
            case = await store.load_open_case(conn, customer_id)
            if case is not None:
                closed = case.erase(now)
                assert not isinstance(closed, Refused)  # an open case can always be erased
                await store.save_cases(tx, outcomes_topic, [closed])
            await store.erase_customer(conn, customer_id, now)
            tx.emit(
                erasure_topic,
                customer_id,
                de.CUSTOMER_ERASED,
                CustomerErased(
                    customer_id=customer_id, address_hashes=hashes, erased_at=now
                ).to_data(),
                subject=customer_id,
            )
        return {"customer_id": customer_id, "erased": True}

    return api
