"""Session-wide real infrastructure for the integration tests.

- PostgreSQL: ``DATABASE_URL`` if set, else a PostgreSQL 16 from ``pgserver`` in a temporary
  directory. The schema comes from the Alembic migrations.
- Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else one KRaft broker started from the jars Maven
  fetched. If it does not come up, the failure shows its log.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import make_engine, normalise_url, with_database
from shared.settings import Settings, load_settings


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield normalise_url(url)
        return
    from shared.local.postgres import start_embedded

    with tempfile.TemporaryDirectory(prefix="winback-pg-") as tmp:
        url, server = start_embedded(Path(tmp), cleanup="delete")
        yield url
        server.cleanup()


@pytest.fixture(scope="session")
def migrated_url(pg_url: str) -> str:
    """A database of its own for this test session, migrated to head."""
    import asyncio

    from shared.db import migrate

    name = f"winback_test_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        engine = make_engine(pg_url, pool_size=1)
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()

    asyncio.run(create())
    url = with_database(pg_url, name)
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def new_database(pg_url: str) -> object:
    """A factory of empty databases (for migration tests)."""

    async def make() -> str:
        name = f"winback_empty_{uuid.uuid4().hex[:8]}"
        engine = make_engine(pg_url, pool_size=1)
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()
        return with_database(pg_url, name)

    return make


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        yield servers
        return
    from shared.local.kafka_broker import LocalKafka

    with tempfile.TemporaryDirectory(prefix="winback-kafka-") as tmp:
        broker = LocalKafka(Path(tmp))
        broker.start()  # raises BrokerStartError with the broker's log tail
        try:
            yield broker.bootstrap_servers
        finally:
            broker.stop()


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """The migrated database, emptied before each test."""
    eng = make_engine(migrated_url, pool_size=5)
    async with eng.begin() as conn:
        tables = (
            await conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'alembic_version'"
                )
            )
        ).scalars()
        names = ", ".join(f'"{t}"' for t in tables)
        if names:
            await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    yield eng
    await eng.dispose()


@pytest.fixture
def settings(migrated_url: str, kafka_bootstrap: str) -> Settings:
    """Settings with topic names of this test's own, so tests never see each other's records."""
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        environment="test",
        database={"url": migrated_url},
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "poll_timeout_ms": 100,
            "session_timeout_ms": 10_000,
        },
        topics={
            "inbound": [f"billing-{suffix}", f"product-{suffix}"],
            "domain": f"domain-{suffix}",
            "dispatch": f"dispatch-{suffix}",
            "outcomes": f"outcomes-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "erasure": f"erasure-{suffix}",
            "partitions": 3,
        },
        outbox={"idle_poll_seconds": 0.02},
    )


STRIPE_MOCK_VERSION = "v0.203.0"


def stripe_mock_binary() -> str:
    """``stripe-mock`` on PATH or where ``go install`` puts it (``scripts/ci-tools`` installs
    it); a missing binary fails the tests that need it, naming how to install it."""
    import shutil
    import subprocess

    found = shutil.which("stripe-mock")
    if found:
        return found
    dirs = []
    for var, sub in (("GOBIN", ""), ("GOPATH", "bin")):
        try:
            value = subprocess.run(
                ["go", "env", var], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            value = ""
        if value:
            dirs.append(Path(value.split(os.pathsep)[0]) / sub)
    dirs.append(Path.home() / "go" / "bin")
    candidates = [d / "stripe-mock" for d in dirs]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "stripe-mock is not installed: run scripts/ci-tools (or `go install "
        f"github.com/stripe/stripe-mock@{STRIPE_MOCK_VERSION}`)"
    )


@pytest.fixture(scope="session")
def stripe_mock() -> Iterator[str]:
    """Stripe's official mock server (its OpenAPI fixtures), started for the session on a free
    loopback port: the base URL, e.g. ``http://127.0.0.1:41234``."""
    import re
    import subprocess
    import time

    with tempfile.TemporaryDirectory(prefix="winback-stripe-mock-") as tmp:
        log_path = Path(tmp) / "stripe-mock.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    stripe_mock_binary(),
                    "-http-addr",
                    "127.0.0.1:0",
                    "-https-addr",
                    "127.0.0.1:0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            address = None
            while address is None:
                found = re.search(
                    r"Listening for HTTP at address: (127\.0\.0\.1:\d+)", log_path.read_text()
                )
                if found:
                    address = found.group(1)
                elif proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stripe-mock did not start:\n{log_path.read_text()}")
                else:
                    time.sleep(0.05)  # polling the server's own log for its address
            yield f"http://{address}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
