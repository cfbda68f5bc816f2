"""The wiring every service shares: settings → engine, transport, clock, relay, runtime.

A service's own ``bootstrap()`` calls ``build_core`` and adds its handlers and routes.
Tests pass their own engine, transport or clock into the same functions.

Nothing here connects to anything: a configuration that can never work (no database URL, one
that does not parse, a broker address that is not ``host:port``) is a ``ConfigError`` at once;
waiting for a database or broker that is down is the runtime's start-up (``shared.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import Clock, SystemClock
from shared.db.engine import make_engine
from shared.errors import ConfigError
from shared.messaging.kafka import KafkaTransport
from shared.messaging.outbox import OutboxRelay
from shared.messaging.retention import Retention
from shared.messaging.transport import Transport
from shared.runtime import Runtime
from shared.settings import Settings


@dataclass
class Core:
    settings: Settings
    engine: AsyncEngine
    transport: Transport
    clock: Clock
    runtime: Runtime


def build_core(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    transport: Transport | None = None,
    clock: Clock | None = None,
) -> Core:
    if engine is None:
        if not settings.database.url:
            raise ConfigError("database.url (WINBACK_DATABASE__URL): no database configured")
        try:
            engine = make_engine(settings.database.url, settings.database.pool_size)
        except ArgumentError as exc:
            raise ConfigError(f"database.url (WINBACK_DATABASE__URL): {exc}") from None
    if transport is None:
        if not settings.kafka.bootstrap_servers:
            raise ConfigError(
                "kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS): no broker configured"
            )
        transport = KafkaTransport(
            settings.kafka.bootstrap_servers,
            settings.kafka.client_id,
            settings.kafka.session_timeout_ms,
            settings.kafka.max_record_bytes,
        )
    clock = clock or SystemClock()
    publisher = transport.publisher()
    relay = OutboxRelay(
        engine,
        publisher,
        clock,
        batch_size=settings.outbox.batch_size,
        idle_poll_seconds=settings.outbox.idle_poll_seconds,
    )
    runtime = Runtime(
        engine=engine,
        transport=transport,
        publisher=publisher,
        clock=clock,
        relay=relay,
        partitions=settings.topics.partitions,
        replication=settings.topics.replication,
        relay_enabled=settings.outbox.relay_enabled,
    )
    # Every service prunes the shared tables: old inbox rows, published outbox rows.
    retention = Retention(
        engine,
        clock,
        keep_inbox=timedelta(days=settings.retention.keep_inbox_days),
        keep_published=timedelta(hours=settings.outbox.keep_published_hours),
        batch_size=settings.retention.batch_size,
        max_batches_per_run=settings.retention.max_batches_per_run,
    )
    runtime.every("retention", settings.retention.interval_seconds, retention)
    return Core(settings, engine, transport, clock, runtime)
