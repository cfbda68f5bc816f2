"""Issue 14, "done when": a ``winback dispatcher`` process SIGKILLed between the provider call
and recording its answer, with the provider accepting — the delivery ends ``sent`` after
reconciliation, and the provider got one send request.

The kill lands in that gap deterministically: the fake provider (Postmark, over real HTTP on
loopback) takes the message — a real, accepted send — and holds its answer
(``Fault.swallow``); the test SIGKILLs the process as soon as the fake has the message, while
the dispatcher still waits for the answer. A dispatcher started again on the same database
and broker finds the row ``sending`` past ``stale_sending_seconds``, makes it ``unknown`` and
confirms it through Postmark's outbound search by our key: ``sent``, ``message.sent`` once.
Real PostgreSQL and Kafka (the session's), the dispatcher a separate OS process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer, Fault
from tests.support.dispatcher import command, delivery_rows, emitted, seed, send_commands
from tests.support.procs import WinbackProcess, as_env
from tests.support.services import eventually

pytestmark = [pytest.mark.integration, pytest.mark.faults]

STALE = 12  # stale_sending_seconds: above the longest send (connect 1 + read 10, one attempt)


@pytest.fixture
def logs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="winback-reconcile-kill-") as tmp:
        yield Path(tmp)


def dispatcher_env(settings: Settings, fake: FakeProviderServer) -> dict[str, str]:
    topics = settings.topics
    config: dict[str, Any] = {
        "environment": "test",
        "log_level": "WARNING",
        "database": {"url": settings.database.url, "pool_size": 4},
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers, "poll_timeout_ms": 100},
        "topics": {
            "domain": topics.domain,
            "dispatch": topics.dispatch,
            "outcomes": topics.outcomes,
            "dead_letter": topics.dead_letter,
            "erasure": topics.erasure,
            "partitions": topics.partitions,
        },
        "http": {"ingest_port": 0, "scheduler_port": 0, "dispatcher_port": 0, "relay_port": 0},
        "dispatcher": {
            "email": {
                "primary": {
                    "kind": "postmark",
                    "base_url": fake.base_url,
                    "api_key": "pm-test-token",
                    "from_address": "hello@acme.example",
                }
            },
            "http": {"connect_timeout": 1, "read_timeout": 10},
            "retry": {"max_attempts": 1, "max_delay": 0.05, "max_retry_after": 0.1},
            "stale_sending_seconds": STALE,
            "unknown_reconcile_seconds": 600,
            "poll_seconds": 0.05,
        },
    }
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WINBACK_") and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    }
    return {**inherited, **as_env(config)}


@pytest.mark.timeout(180)
async def test_a_dispatcher_killed_between_the_provider_call_and_the_record_ends_sent(
    settings: Settings, engine: AsyncEngine, logs: Path
) -> None:
    async with FakeProviderServer() as fake:
        fake.fail_next("postmark", Fault.swallow(120))  # takes the message, never answers
        case = await seed(engine, "cus_killed")
        dispatcher = WinbackProcess(
            "dispatcher", "dispatcher", dispatcher_env(settings, fake), logs, cwd=Path.cwd()
        ).start()
        try:
            await send_commands(settings, command("cus_killed", case))

            async def posts() -> list[Any]:
                assert dispatcher.running, dispatcher.log_tail()
                return [r for r in fake.requests_for("postmark") if r.method == "POST"]

            held = await eventually(posts, lambda found: len(found) == 1, timeout=90, interval=0.02)
            assert len(held) == 1
            assert held[0].accepted  # the provider has the message...
            dispatcher.kill()  # ... and the dispatcher dies waiting for the answer
            (row,) = await delivery_rows(engine)
            assert row.state == "sending"
            assert held[0].idempotency_key == row.idempotency_key == f"{case}:d0_we_miss_you"

            dispatcher.start()

            async def state() -> str:
                assert dispatcher.running, dispatcher.log_tail()
                (current,) = await delivery_rows(engine)
                return str(current.state)

            assert await eventually(state, lambda s: s == "sent", timeout=STALE + 60) == "sent"
        finally:
            dispatcher.stop()
        (row,) = await delivery_rows(engine)
        assert row.provider == "postmark"
        assert row.unknown_since is not None  # it went through unknown, not failed
        requests = fake.requests_for("postmark")
        assert [r.method for r in requests if r.method == "POST"] == ["POST"]  # one send
        assert len(fake.accepted("postmark")) == 1
        assert {r.method for r in requests} == {"POST", "GET"}  # the rest: searches
        (sent,) = await emitted(engine, settings.topics.outcomes, model.MESSAGE_SENT)
        assert sent["data"]["provider_message_id"] == row.provider_message_id
        assert await emitted(engine, settings.topics.outcomes, model.MESSAGE_FAILED) == []
