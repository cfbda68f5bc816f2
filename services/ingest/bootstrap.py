"""Wires the ingest service: the handler, the Kafka consumer, the HTTP routes."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest import api
from services.ingest.billing import routes as billing
from services.ingest.erasure import ErasureHandler
from services.ingest.handler import IngestHandler
from shared.bootstrap import Core, build_core
from shared.clock import Clock
from shared.http.app import create_app
from shared.http.auth import require_scope
from shared.http.dead_letters import router as dead_letters_router
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.pipeline import Pipeline
from shared.messaging.transport import Transport
from shared.settings import Settings

CONSUMER = "ingest"
SOURCE = "/winback/ingest"


@dataclass
class IngestService:
    core: Core
    pipeline: Pipeline
    consumer: ConsumerRunner
    app: FastAPI


def bootstrap(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    transport: Transport | None = None,
    clock: Clock | None = None,
    group: str = CONSUMER,
) -> IngestService:
    core = build_core(settings, engine=engine, transport=transport, clock=clock)
    topics = settings.topics
    handler = IngestHandler(
        core.clock,
        settings.ingest.event_type_prefix,
        settings.ingest.max_future_skew_seconds,
        topics.domain,
    )
    limit = settings.kafka.max_record_bytes
    pipeline = Pipeline(core.engine, group, handler, core.clock, topics.dead_letter, SOURCE, limit)
    consumer = ConsumerRunner(
        core.transport.subscription(group, topics.inbound),
        pipeline,
        max_batch=settings.kafka.max_batch,
        poll_timeout_ms=settings.kafka.poll_timeout_ms,
        max_event_bytes=settings.ingest.max_event_bytes,
        linger_ms=settings.kafka.batch_linger_ms,
    )
    erasure = ConsumerRunner(
        core.transport.subscription(f"{group}-erasure", [topics.erasure]),
        Pipeline(
            core.engine,
            f"{group}-erasure",
            ErasureHandler(),
            core.clock,
            topics.dead_letter,
            SOURCE,
            limit,
        ),
        poll_timeout_ms=settings.kafka.poll_timeout_ms,
    )
    core.runtime.consumers += [consumer, erasure]
    core.runtime.topics = [*topics.inbound, topics.domain, topics.erasure, topics.dead_letter]

    app = create_app(
        "winback ingest",
        checks=core.runtime.readiness_checks,
        routers=[
            api.router(
                pipeline,
                settings.ingest.max_event_bytes,
                settings.ingest.http_batch_limit,
                type_prefix=settings.ingest.event_type_prefix,
            ),
            billing.router(pipeline, settings.billing, settings.ingest.event_type_prefix),
            dead_letters_router(
                core.transport, topics.dead_letter, require_scope("read"), require_scope("operate")
            ),
        ],
        lifespan=core.runtime.lifespan,
        api_keys=settings.http.api_keys,
    )
    return IngestService(core, pipeline, consumer, app)
