"""A process that only runs the outbox relay, for deployments that scale it apart from the
consumers (set ``WINBACK_OUTBOX__RELAY_ENABLED=false`` on those)."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.bootstrap import Core, build_core
from shared.clock import Clock
from shared.http.app import create_app
from shared.messaging.transport import Transport
from shared.settings import Settings


def bootstrap(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    transport: Transport | None = None,
    clock: Clock | None = None,
) -> tuple[Core, FastAPI]:
    relay_settings = settings.model_copy(
        update={"outbox": settings.outbox.model_copy(update={"relay_enabled": True})}
    )
    core = build_core(relay_settings, engine=engine, transport=transport, clock=clock)

    app = create_app(
        "winback outbox relay",
        checks=core.runtime.readiness_checks,
        lifespan=core.runtime.lifespan,
    )
    return core, app
