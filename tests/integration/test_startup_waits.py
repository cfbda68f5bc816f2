"""A service started while the broker or the database is down waits for it instead of exiting.

``winback ingest`` runs as an OS process against a broker (``LocalKafka``) or a PostgreSQL
(``pgserver``) of the test's own, killed before the process starts: the process stays alive,
``/health`` answers, ``/ready`` answers 503 problem+json naming the dependency; once the
dependency is started again ``/ready`` answers 200 and events over HTTP and over Kafka are
consumed into the database. SIGTERM during the wait ends the process at once and cleanly. A
configuration that can never work still fails fast with one line and exit code 2, and
``winback migrate`` exits 69 when the database does not answer (or waits ``--wait`` seconds).

Below them, the runtime and the Kafka transport on their own: the classification that makes
the difference (an unreachable broker is transient, a refusal is a ``ConfigError``), and a
runtime whose start-up waits in the background and stops at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import FrozenClock
from shared.db import migrate
from shared.db.engine import make_engine, with_database
from shared.db.tables import churn_episodes
from shared.errors import ConfigError, TransientError
from shared.local import postgres
from shared.local.kafka_broker import LocalKafka
from shared.messaging.kafka import KafkaTransport, parse_bootstrap
from shared.messaging.memory import MemoryBus
from shared.messaging.outbox import OutboxRelay
from shared.retry import RetryPolicy, is_transient
from shared.runtime import NotStarted, Runtime
from shared.settings import DEV_SECRET
from tests.support.http import free_port
from tests.support.kafka import cloudevent, produce, structured
from tests.support.procs import WinbackProcess, as_env, winback_executable
from tests.support.services import eventually

pytestmark = pytest.mark.integration

AUTH = {"authorization": f"Bearer {DEV_SECRET}"}
WAITING = "start-up: creating the topics failed; retrying"  # the throttled retry line


# --- infrastructure of the test's own ----------------------------------------------------------


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(tmp_path_factory.mktemp("startup-kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def own_pg() -> Iterator[tuple[str, Any]]:
    """An embedded PostgreSQL of this module's own (crashed and started again here), migrated.
    Not under ``tmp_path``: a pytest session starting on the machine makes /tmp/pytest-of-<user>
    private again, and PostgreSQL (run as the ``pgserver`` user when we are root) must keep
    reaching its data directory when it is started again."""
    with tempfile.TemporaryDirectory(prefix="winback-startup-pg-") as tmp:
        url, server = postgres.start_embedded(Path(tmp), cleanup="delete")
        try:
            migrate.upgrade(url)
            yield url, server
        finally:
            server.cleanup()


@pytest.fixture
def pg_down(own_pg: tuple[str, Any]) -> Iterator[tuple[str, Any]]:
    """``own_pg`` crashed (``pg_ctl stop -m immediate``); running again after the test."""
    url, server = own_pg
    postgres.crash(server)
    try:
        yield url, server
    finally:
        postgres.restart(server)


# --- the process -------------------------------------------------------------------------------


def ingest_env(db_url: str, servers: str, port: int) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    settings: dict[str, Any] = {
        "environment": "test",
        "log_level": "WARNING",
        "log_repeat_interval_seconds": 2,
        "database": {"url": db_url, "pool_size": 2},
        "kafka": {
            "bootstrap_servers": servers,
            "poll_timeout_ms": 100,
            "session_timeout_ms": 6000,
        },
        "topics": {
            "inbound": f"billing-{suffix}",
            "domain": f"domain-{suffix}",
            "dispatch": f"dispatch-{suffix}",
            "outcomes": f"outcomes-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "erasure": f"erasure-{suffix}",
            "partitions": 1,
        },
        "http": {"ingest_port": port},
        "outbox": {"idle_poll_seconds": 0.05},
    }
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WINBACK_") and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    }
    return {**inherited, **as_env(settings)}


@pytest.fixture
async def ingest_process(tmp_path: Path) -> AsyncIterator[Any]:
    """Start ``winback ingest`` processes (``await start(db_url, servers)``); each is stopped
    with SIGTERM after the test."""
    started: list[WinbackProcess] = []

    async def start(db_url: str, servers: str) -> tuple[WinbackProcess, httpx.AsyncClient]:
        port = free_port()
        proc = WinbackProcess(
            f"ingest-{len(started)}",
            "ingest",
            ingest_env(db_url, servers, port),
            tmp_path,
            tmp_path,
        )
        started.append(proc.start())
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)
        clients.append(http)
        return proc, http

    clients: list[httpx.AsyncClient] = []
    try:
        yield start
    finally:
        for http in clients:
            await http.aclose()
        for proc in started:
            await asyncio.to_thread(proc.stop)


async def answer(http: httpx.AsyncClient, path: str) -> httpx.Response | None:
    """The answer, or ``None`` while nothing listens yet."""
    try:
        return await http.get(path)
    except httpx.TransportError:
        return None


def not_ready_for(response: httpx.Response | None, dependency: str) -> bool:
    return (
        response is not None
        and response.status_code == 503
        and dependency in {e["field"] for e in response.json().get("errors", [])}
    )


def start_up_waiting_for(response: httpx.Response | None, dependency: str) -> bool:
    """503 naming ``dependency`` because start-up is waiting for it (before start-up reaches
    that step, the probe may name it from its own check: ``unreachable``). The reason is a
    fixed text: what start-up saw goes to the log, not to the caller."""
    return not_ready_for(response, dependency) and (
        problem_of(response, dependency) == f"start-up is waiting for {dependency}"
    )


def is_ready(response: httpx.Response | None) -> bool:
    return response is not None and response.status_code == 200


def cancellation(customer: str) -> dict[str, Any]:
    return cloudevent(
        "subscription.cancelled",
        {"customer_id": customer, "reason": "too_expensive", "customer": {"timezone": "UTC"}},
    )


async def episodes_of(engine: AsyncEngine, customers: list[str]) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).where(churn_episodes.c.customer_id.in_(customers))
        return int(await conn.scalar(query) or 0)


async def both_ways_consumed(
    http: httpx.AsyncClient, engine: AsyncEngine, servers: str, inbound: str
) -> None:
    """An event over HTTP and one over Kafka, both stored: the API and the consumer work."""
    by_http, by_kafka = f"http-{uuid.uuid4().hex[:6]}", f"kafka-{uuid.uuid4().hex[:6]}"
    posted = await http.post("/v1/events", json=cancellation(by_http))
    assert posted.status_code == 202, posted.text
    await produce(servers, inbound, [(by_kafka.encode(), *structured(cancellation(by_kafka)))])
    stored = await eventually(
        lambda: episodes_of(engine, [by_http, by_kafka]), lambda n: n == 2, timeout=90
    )
    assert stored == 2


def problem_of(response: httpx.Response | None, dependency: str) -> str:
    assert response is not None
    assert response.headers["content-type"] == "application/problem+json"
    [reason] = [e["reason"] for e in response.json()["errors"] if e["field"] == dependency]
    return str(reason)


# --- the broker down at start ------------------------------------------------------------------


async def test_sigterm_while_waiting_for_the_broker_stops_the_process_cleanly(
    own_broker: LocalKafka, migrated_url: str, ingest_process: Any
) -> None:
    own_broker.kill()
    proc, http = await ingest_process(migrated_url, own_broker.bootstrap_servers)
    waiting = await eventually(
        lambda: answer(http, "/ready"), lambda r: not_ready_for(r, "kafka"), timeout=90
    )
    assert not_ready_for(waiting, "kafka"), waiting and waiting.text
    assert proc.proc is not None
    proc.proc.terminate()
    # it ends on its own after the signal (the bound only keeps a hung process from hanging
    # the suite; SIGKILL is never sent)
    code = await asyncio.to_thread(proc.proc.wait, 60)
    assert code == 0, proc.log_tail()
    assert "Traceback" not in proc.log_tail(20_000)


async def test_ingest_started_while_the_broker_is_down_waits_then_consumes(
    own_broker: LocalKafka, migrated_url: str, engine: AsyncEngine, ingest_process: Any
) -> None:
    own_broker.kill()
    proc, http = await ingest_process(migrated_url, own_broker.bootstrap_servers)
    waiting = await eventually(
        lambda: answer(http, "/ready"), lambda r: start_up_waiting_for(r, "kafka"), timeout=90
    )
    assert start_up_waiting_for(waiting, "kafka"), waiting and waiting.text
    # the wait is logged: the retry line (through the throttle), no traceback
    logged = await eventually(
        lambda: asyncio.to_thread(proc.log_tail, 50_000), lambda text: WAITING in text
    )
    assert WAITING in logged
    assert "Traceback" not in logged
    health = await http.get("/health")
    assert health.status_code == 200
    assert proc.running, proc.log_tail()

    await asyncio.to_thread(own_broker.restart)
    ready = await eventually(lambda: answer(http, "/ready"), is_ready, timeout=120)
    assert is_ready(ready), ready and ready.text
    inbound = proc.env["WINBACK_TOPICS__INBOUND"]
    await both_ways_consumed(http, engine, own_broker.bootstrap_servers, inbound)
    assert proc.running
    assert proc.starts == 1


# --- the database down at start ----------------------------------------------------------------


async def test_ingest_started_while_the_database_is_down_waits_then_consumes(
    pg_down: tuple[str, Any], kafka_bootstrap: str, ingest_process: Any
) -> None:
    url, server = pg_down
    proc, http = await ingest_process(url, kafka_bootstrap)
    waiting = await eventually(
        lambda: answer(http, "/ready"), lambda r: start_up_waiting_for(r, "database"), timeout=90
    )
    assert start_up_waiting_for(waiting, "database"), waiting and waiting.text
    assert proc.running, proc.log_tail()

    await asyncio.to_thread(postgres.restart, server)
    ready = await eventually(lambda: answer(http, "/ready"), is_ready, timeout=120)
    assert is_ready(ready), ready and ready.text
    engine = make_engine(url, pool_size=1)
    try:
        await both_ways_consumed(http, engine, kafka_bootstrap, proc.env["WINBACK_TOPICS__INBOUND"])
    finally:
        await engine.dispose()
    assert proc.running
    assert "Traceback" not in proc.log_tail(50_000)


# --- what can never work fails fast; winback migrate ----------------------------------------


def run_winback(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [winback_executable(), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn(args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [winback_executable(), *args], env=dict(env), cwd=cwd, stdout=out, stderr=out
        )


def plain_lines(text: str) -> list[str]:
    """What the command printed itself (not its JSON log lines)."""
    return [line for line in text.splitlines() if line and not line.startswith("{")]


def test_a_bootstrap_address_that_cannot_parse_fails_at_once_with_one_line(
    migrated_url: str, tmp_path: Path
) -> None:
    env = ingest_env(migrated_url, "127.0.0.1:notaport", free_port())
    done = run_winback(["ingest"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert plain_lines(done.stderr) == [
        "winback: kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS): "
        "'127.0.0.1:notaport' is not host:port"
    ]


def test_a_database_that_refuses_us_ends_start_up_with_one_line(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The server answers and refuses (no such database): no waiting — the process stops."""
    env = ingest_env(with_database(pg_url, "winback_no_such_db"), kafka_bootstrap, free_port())
    done = run_winback(["ingest"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = plain_lines(done.stderr)
    assert line.startswith("winback: database.url (WINBACK_DATABASE__URL): the database refused")
    assert "winback_no_such_db" in line
    assert "Traceback" not in done.stderr


def test_migrate_with_the_database_down_exits_69_with_one_line(
    pg_down: tuple[str, Any], tmp_path: Path
) -> None:
    url, _ = pg_down
    env = ingest_env(url, "127.0.0.1:9092", free_port())
    done = run_winback(["migrate"], env, tmp_path)
    assert done.returncode == 69, done.stderr
    [line] = plain_lines(done.stderr)
    assert line.startswith("winback: the database did not answer (postgresql+asyncpg://")
    assert "Traceback" not in done.stderr


async def test_migrate_wait_waits_for_the_database(
    pg_down: tuple[str, Any], tmp_path: Path
) -> None:
    url, server = pg_down
    env = ingest_env(url, "127.0.0.1:9092", free_port())
    log = tmp_path / "migrate.log"
    proc = spawn(["migrate", "--wait", "300"], env, tmp_path, log)
    try:
        waiting = await eventually(
            lambda: asyncio.to_thread(log.read_text),
            lambda text: "reaching the database failed; retrying" in text,
            timeout=60,
        )
        assert "reaching the database failed; retrying" in waiting
        assert proc.poll() is None, log.read_text()
        await asyncio.to_thread(postgres.restart, server)
        code = await asyncio.to_thread(proc.wait, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()
    assert "migrations done" in log.read_text()


# --- the runtime and the transport on their own ------------------------------------------------


def test_bootstrap_addresses_are_checked_before_any_connection() -> None:
    assert parse_bootstrap("kafka-0.kafka:9092,[::1]:9093,broker") == [
        ("kafka-0.kafka", 9092),
        ("::1", 9093),
        ("broker", 9092),
    ]
    for wrong in ("127.0.0.1:notaport", "a:1:2", "host:0", "host:70000", "bad host:1", ""):
        with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
            KafkaTransport(wrong)


async def test_an_unreachable_broker_is_transient() -> None:
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransientError) as caught:
        await KafkaTransport(closed).ensure_topics(["t"], 1)
    assert is_transient(caught.value)
    assert "KafkaConnectionError" in str(caught.value)
    publisher = KafkaTransport(closed).publisher()
    with pytest.raises(TransientError):
        await publisher.start()
    await publisher.stop()


async def test_a_replication_factor_the_cluster_cannot_have_is_a_config_error(
    kafka_bootstrap: str,
) -> None:
    """The broker answers and refuses the topic: waiting would never help."""
    topic = f"startup-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match="InvalidReplicationFactorError") as caught:
        await KafkaTransport(kafka_bootstrap).ensure_topics([topic], 1, replication=7)
    assert not is_transient(caught.value)


QUICK = RetryPolicy(first_delay=0.01, max_delay=0.05)


@pytest.fixture
async def dead_db_runtime() -> AsyncIterator[Runtime]:
    """A runtime on the in-process bus whose database is a closed port."""
    bus = MemoryBus(clock=FrozenClock())
    engine = make_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none", 1)
    publisher = bus.publisher()
    runtime = Runtime(
        engine=engine,
        transport=bus,
        publisher=publisher,
        clock=FrozenClock(),
        relay=OutboxRelay(engine, publisher, FrozenClock()),
        gauge_seconds=3600,
        startup=QUICK,
    )
    try:
        yield runtime
    finally:
        await runtime.stop()
        await engine.dispose()
        bus.close()


async def test_the_lifespan_returns_at_once_and_start_up_waits_for_the_database(
    dead_db_runtime: Runtime,
) -> None:
    runtime = dead_db_runtime
    ran: list[str] = []

    async def part() -> None:
        ran.append("part")

    runtime.extra_parts.append(("part", part, lambda: None))
    async with runtime.lifespan():
        seen = await eventually(
            lambda: error_of(runtime.check_database), lambda e: "Refused" in str(e)
        )
        assert isinstance(seen, NotStarted)
        assert str(seen).startswith("start-up is waiting for database: ConnectionRefusedError")
        assert runtime.waiting_for == "database"
        await runtime.check_kafka()  # the bus answers: only the database is named
    # leaving the lifespan ended the waiting; no part ever ran, and nothing failed
    assert ran == []
    assert runtime.failure is None


async def error_of(check: Callable[[], Awaitable[None]]) -> BaseException | None:
    try:
        await check()
    except Exception as exc:
        return exc
    return None
