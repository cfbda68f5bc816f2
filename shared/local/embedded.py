"""Embedded defaults for ``winback run``: a local PostgreSQL and a local Kafka broker when the
settings name none."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from shared.settings import Settings

log = logging.getLogger(__name__)


def with_local_infrastructure(settings: Settings, stack: ExitStack) -> Settings:
    """Start what the settings leave empty; return settings that point at it."""
    updates: dict[str, Any] = {}
    if not settings.database.url:
        from shared.local.postgres import start_embedded

        url, server = start_embedded(settings.database.data_dir.resolve(), cleanup="stop")
        stack.callback(lambda: server.cleanup() if hasattr(server, "cleanup") else None)
        log.info("embedded PostgreSQL started", extra={"data_dir": str(settings.database.data_dir)})
        updates["database"] = settings.database.model_copy(update={"url": url})
    if not settings.kafka.bootstrap_servers:
        from shared.local.kafka_broker import LocalKafka

        broker = LocalKafka(settings.kafka.data_dir.resolve()).start()
        stack.callback(broker.stop)
        log.info("local Kafka broker started", extra={"bootstrap": broker.bootstrap_servers})
        updates["kafka"] = settings.kafka.model_copy(
            update={"bootstrap_servers": broker.bootstrap_servers}
        )
    return settings.model_copy(update=updates) if updates else settings
