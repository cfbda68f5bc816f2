"""FastAPI dependencies of the scheduler's routes. The service's bootstrap puts what they need
in the app's state (``install``); a route asks for it with one of the ``Annotated`` aliases
below instead of capturing it in a closure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.case_migration import CaseMigrator
from services.scheduler.commands import Work
from services.scheduler.domain import DEFAULT_POLICY, GuardrailPolicy, Playbook
from services.scheduler.domain.results import CostModel
from shared.clock import Clock
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES


@dataclass(frozen=True)
class ApiSettings:
    """The status API's settings, from the service's settings."""

    playbooks: tuple[Playbook, ...]
    erasure_topic: str
    outcomes_topic: str
    source: str
    fallback_timezone: str = "UTC"
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    policy: GuardrailPolicy = DEFAULT_POLICY  # the guardrails simulate runs


def install(
    app: FastAPI,
    engine: AsyncEngine,
    clock: Clock,
    settings: ApiSettings | None = None,
    costs: CostModel | None = None,
) -> None:
    """Put the engine, the clock and (for the status API) its settings in ``app.state``; the
    reports need the engine and the clock, and price cost and ROI with ``costs`` (the default
    ``results`` settings and shipped offers if not given)."""
    app.state.engine = engine
    app.state.clock = clock
    app.state.results_costs = costs
    app.state.scheduler_api = settings
    if settings is not None:
        app.state.scheduler_work = Work(
            engine,
            clock,
            settings.source,
            settings.max_record_bytes,
            settings.outcomes_topic,
            settings.erasure_topic,
        )
        app.state.scheduler_migrator = CaseMigrator(
            engine,
            clock,
            settings.playbooks,
            settings.outcomes_topic,
            settings.source,
            fallback_timezone=settings.fallback_timezone,
            max_record_bytes=settings.max_record_bytes,
        )


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


def _clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.scheduler_api
    return settings


def _work(request: Request) -> Work:
    work: Work = request.app.state.scheduler_work
    return work


def _migrator(request: Request) -> CaseMigrator:
    migrator: CaseMigrator = request.app.state.scheduler_migrator
    return migrator


Engine = Annotated[AsyncEngine, Depends(_engine)]
ClockDep = Annotated[Clock, Depends(_clock)]
Settings = Annotated[ApiSettings, Depends(_settings)]
UnitsOfWork = Annotated[Work, Depends(_work)]
Migrator = Annotated[CaseMigrator, Depends(_migrator)]
