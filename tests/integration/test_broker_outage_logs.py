"""A broker outage writes a few log lines per interval, not one per reconnect attempt.

The test has a broker of its own (``LocalKafka``) and runs the ingest service on it as
``winback ingest`` does — uvicorn on loopback, the runtime started by the app's lifespan
(two consumers, the outbox relay's producer, the gauges) and ``shared.logging.configure`` —
then SIGKILLs the broker, keeps it down until the throttle has closed a few intervals of
repeats, restarts it on the same port and data directory, and counts: every aiokafka record
is either written or counted in a summary line, the lines written stay within a handful per
interval, and events that came in during and after the outage are consumed and published."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared import logging as winback_logging
from shared.db.tables import churn_episodes
from shared.local.kafka_broker import LocalKafka
from shared.settings import DEV_SECRET, Settings, load_settings
from tests.support.http import serve
from tests.support.kafka import cloudevent, produce, read_all, structured
from tests.support.services import eventually

pytestmark = pytest.mark.integration

INTERVAL = 3.0  # seconds; the services' default is 10
LINES_PER_INTERVAL = 10  # what the outage may write per interval, all Kafka clients together


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(tmp_path_factory.mktemp("outage-kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class _Raw(logging.Handler):
    """Counts the Kafka clients' records before any throttling (summaries excluded)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("aiokafka") and not getattr(record, "throttle_summary", False):
            self.count += 1


class Captured:
    def __init__(
        self, stream: io.StringIO, raw: _Raw, throttle: winback_logging.RepeatThrottle
    ) -> None:
        self.stream = stream
        self.raw = raw
        self.throttle = throttle

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]


@pytest.fixture
def service_logging() -> Iterator[Captured]:
    """The logging ``winback ingest`` sets up, written to a buffer instead of stderr."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiokafka").level)
    winback_logging.configure("INFO", "winback-ingest", repeat_interval=INTERVAL)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    throttle = next(f for f in handler.filters if isinstance(f, winback_logging.RepeatThrottle))
    raw = _Raw()
    root.addHandler(raw)
    try:
        yield Captured(stream, raw, throttle)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("aiokafka").setLevel(saved[2])


@pytest.fixture
def outage_settings(migrated_url: str, own_broker: LocalKafka) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        environment="test",
        database={"url": migrated_url},
        kafka={
            "bootstrap_servers": own_broker.bootstrap_servers,
            "poll_timeout_ms": 100,
            "session_timeout_ms": 10_000,
        },
        topics={
            "inbound": [f"billing-{suffix}"],
            "domain": f"domain-{suffix}",
            "dispatch": f"dispatch-{suffix}",
            "outcomes": f"outcomes-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "partitions": 2,
        },
        outbox={"idle_poll_seconds": 0.05},
    )


async def episodes(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(churn_episodes)) or 0)


def cancellation(customer: str) -> dict[str, Any]:
    return cloudevent(
        "subscription.cancelled",
        {"customer_id": customer, "reason": "too_expensive", "customer": {"timezone": "UTC"}},
    )


def is_kafka(line: dict[str, Any]) -> bool:
    return str(line.get("name", "")).startswith("aiokafka")


def summaries_of_busiest_kind(lines: list[dict[str, Any]]) -> int:
    """How many intervals of repeats the throttle has closed for the most repeated line."""
    kinds = Counter(str(line["message"]).split(" s: ", 1)[1] for line in lines if "repeats" in line)
    return max(kinds.values(), default=0)


async def test_a_broker_outage_logs_a_few_lines_per_interval_and_the_service_recovers(
    own_broker: LocalKafka,
    outage_settings: Settings,
    engine: AsyncEngine,
    service_logging: Captured,
) -> None:
    settings = outage_settings
    servers = settings.kafka.bootstrap_servers
    inbound = settings.topics.inbound[0]
    service = bootstrap(settings, engine=engine)
    loop = asyncio.get_running_loop()
    async with (
        serve(service.app) as url,
        httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEV_SECRET}"}) as http,
    ):
        await service.core.runtime.wait_consuming()
        await produce(servers, inbound, [(b"before", *structured(cancellation("before")))])
        assert await eventually(lambda: episodes(engine), lambda n: n >= 1) == 1

        # whatever the start-up left pending is written now: the window below is the outage's
        service_logging.throttle.flush(force=True)
        start = len(service_logging.lines())
        raw_before = service_logging.raw.count
        port = own_broker.broker_port
        assert own_broker.process is not None
        own_broker.process.kill()
        own_broker.process.wait()
        killed_at = loop.time()

        async def outage_lines() -> list[dict[str, Any]]:
            return [line for line in service_logging.lines()[start:] if is_kafka(line)]

        seen = await eventually(outage_lines, lambda lines: len(lines) >= 1, timeout=60)
        assert seen, "no aiokafka line while the broker is down"
        # an event over HTTP while the broker is down: stored, its domain event waits in the
        # outbox while the relay's producer retries
        during = await http.post("/v1/events", json=cancellation("during"))
        assert during.status_code == 202, during.text
        # the broker stays down until the throttle has closed three intervals of repeats
        closed = await eventually(
            outage_lines, lambda lines: summaries_of_busiest_kind(lines) >= 3, timeout=120
        )
        assert summaries_of_busiest_kind(closed) >= 3

        own_broker.start()
        assert own_broker.broker_port == port
        await produce(servers, inbound, [(b"after", *structured(cancellation("after")))])
        assert await eventually(lambda: episodes(engine), lambda n: n >= 3, timeout=120) == 3
        published = await read_all(servers, settings.topics.domain, expect=3, timeout=90)
        assert sorted(r.key for r in published) == [b"after", b"before", b"during"]
        elapsed = loop.time() - killed_at

    service_logging.throttle.flush(force=True)
    lines = [line for line in service_logging.lines()[start:] if is_kafka(line)]
    raw = service_logging.raw.count - raw_before
    firsts = [line for line in lines if "repeats" not in line]
    summaries = [line for line in lines if "repeats" in line]
    # every record the Kafka clients made is accounted for: written, or counted in a summary
    assert len(firsts) + sum(int(s["repeats"]) for s in summaries) == raw
    assert len(lines) < raw
    # and what was written is a handful of lines per interval, not one per retry
    intervals = math.ceil(elapsed / INTERVAL) + 1
    assert len(lines) <= LINES_PER_INTERVAL * intervals, "\n".join(
        f"{line['name']} {line['level']} {line['message'][:160]}" for line in lines
    )
    for summary in summaries:
        assert summary["message"].startswith(f"{summary['repeats']} similar aiokafka ")
        assert f"in the last {INTERVAL:g} s: " in summary["message"]
