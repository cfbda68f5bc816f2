"""Embedded defaults for ``winback run``: a local PostgreSQL when the settings name no
database, and (on request) a local Kafka broker when they name none."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from shared.settings import Settings

log = logging.getLogger(__name__)


def with_local_database(settings: Settings, stack: ExitStack) -> Settings:
    """Start the embedded PostgreSQL if no database is configured; data survives restarts."""
    if settings.database.url:
        return settings
    from shared.local.postgres import start_embedded

    url, server = start_embedded(settings.database.data_dir.resolve(), cleanup="stop")
    stack.callback(server.cleanup)
    log.info("database: embedded PostgreSQL, data in %s", settings.database.data_dir)
    return settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": url})}
    )


def with_local_broker(settings: Settings, stack: ExitStack) -> Settings:
    """Start a local Kafka broker (KRaft) if none is configured."""
    if settings.kafka.bootstrap_servers:
        return settings
    from shared.local.kafka_broker import LocalKafka

    broker = LocalKafka(settings.kafka.data_dir.resolve()).start()
    stack.callback(broker.stop)
    log.info("kafka: local broker at %s", broker.bootstrap_servers)
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"bootstrap_servers": broker.bootstrap_servers}
            )
        }
    )
