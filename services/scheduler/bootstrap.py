"""Wires the scheduler: playbooks (validated at start-up), the event handler, the step timer,
the status API and the gauges."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import api, deps, metrics, reports, simulate
from services.scheduler.domain import Playbook, load_playbooks
from services.scheduler.handler import SchedulerHandler
from services.scheduler.inactivity import InactivityTimer, inactivity_rule
from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared.bootstrap import Core, build_core
from shared.clock import Clock
from shared.content import catalog_for
from shared.http.app import create_app
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.pipeline import Pipeline
from shared.messaging.transport import Transport
from shared.settings import Settings

CONSUMER = "scheduler"
SOURCE = "/winback/scheduler"
log = logging.getLogger(__name__)


@dataclass
class SchedulerService:
    core: Core
    playbooks: list[Playbook]
    pipeline: Pipeline
    consumer: ConsumerRunner
    firer: StepFirer
    app: FastAPI


def load(settings: Settings) -> list[Playbook]:
    """The playbooks, held to the content's catalogue (``content_dir``, or the shipped one); a
    file with errors stops start-up naming the file, line and field."""
    return load_playbooks(
        settings.scheduler.playbooks_dir, catalog=catalog_for(settings.content_dir)
    )


def bootstrap(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    transport: Transport | None = None,
    clock: Clock | None = None,
    playbooks: list[Playbook] | None = None,
    group: str = CONSUMER,
) -> SchedulerService:
    playbooks = playbooks if playbooks is not None else load(settings)
    core = build_core(settings, engine=engine, transport=transport, clock=clock)
    topics = settings.topics
    rule = inactivity_rule(settings.scheduler)
    handler = SchedulerHandler(
        playbooks,
        topics.outcomes,
        settings.scheduler.fallback_timezone,
        inactivity=rule,
        fiscal_year_start_month=settings.scheduler.fiscal_year_start_month,
    )
    pipeline = Pipeline(
        core.engine,
        group,
        handler,
        core.clock,
        topics.dead_letter,
        SOURCE,
        settings.kafka.max_record_bytes,
    )
    consumer = ConsumerRunner(
        core.transport.subscription(group, [topics.domain, topics.outcomes]),
        pipeline,
        max_batch=settings.kafka.max_batch,
        poll_timeout_ms=settings.kafka.poll_timeout_ms,
        linger_ms=settings.kafka.batch_linger_ms,
    )
    firer = StepFirer(
        core.engine,
        core.clock,
        policy(settings.scheduler),
        topics.dispatch,
        SOURCE,
        batch_size=settings.scheduler.claim_batch,
        poll_seconds=settings.scheduler.poll_seconds,
        offer_valid=timedelta(days=settings.scheduler.offer_valid_days),
        outcomes_topic=topics.outcomes,
        max_record_bytes=settings.kafka.max_record_bytes,
        inactivity=InactivityTimer(
            playbooks,
            rule,
            topics.outcomes,
            fallback_timezone=settings.scheduler.fallback_timezone,
            batch_size=settings.scheduler.claim_batch,
        ),
    )
    core.runtime.consumers.append(consumer)
    core.runtime.extra_parts += [
        ("step-timer", firer.run, firer.stop),
    ]
    core.runtime.every(
        "scheduler-gauges", 10, lambda: metrics.refresh(core.engine, core.clock.now())
    )
    core.runtime.topics = [
        topics.domain,
        topics.outcomes,
        topics.dispatch,
        topics.erasure,
        topics.dead_letter,
    ]

    app = create_app(
        "winback scheduler",
        checks=core.runtime.readiness_checks,
        routers=[api.router(), reports.router(), simulate.router()],  # each declares its scope
        lifespan=core.runtime.lifespan,
        api_keys=settings.http.api_keys,
    )
    deps.install(
        app,
        core.engine,
        core.clock,
        deps.ApiSettings(
            playbooks=tuple(playbooks),
            erasure_topic=topics.erasure,
            outcomes_topic=topics.outcomes,
            source=SOURCE,
            fallback_timezone=settings.scheduler.fallback_timezone,
            max_record_bytes=settings.kafka.max_record_bytes,
            policy=policy(settings.scheduler),
        ),
        costs=reports.cost_model(settings.results, catalog_for(settings.content_dir).offers),
    )
    return SchedulerService(core, playbooks, pipeline, consumer, firer, app)
