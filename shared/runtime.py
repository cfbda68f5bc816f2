"""A service's moving parts, started and stopped together: consumers, the outbox relay and
the periodic gauges. Each part runs supervised: a crash is logged (through the log throttle,
with its traceback) and the part restarts by the ``RESTART`` retry policy (0.5 s, windows
doubling to 30 s, full jitter) until the runtime stops.

Start-up waits for its dependencies instead of failing: the database (``SELECT 1``), then the
broker (the topics created, the relay's producer started), each retried by the ``STARTUP``
policy while the failure is transient (the broker or the database unreachable), one log line
per interval through the log throttle. Started from the FastAPI lifespan, the waiting runs in
the background: the HTTP server answers meanwhile, ``/health`` alive and ``/ready`` 503 naming
the dependency start-up waits for, and a SIGTERM ends the wait at once. A failure no waiting
can cure (a ``ConfigError``: a wrong address, credentials the database or the broker refuses, a
replication factor over the cluster's brokers) ends start-up with one clear line: the
``on_failure`` callback (``winback`` exits with code 2), else an error log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import Clock
from shared.errors import ConfigError, WinbackError
from shared.logging import throttled
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.outbox import OutboxRelay
from shared.messaging.transport import Publisher, Transport
from shared.retry import RESTART, RetryPolicy, is_transient

log = logging.getLogger(__name__)

Part = tuple[str, Callable[[], Awaitable[None]], Callable[[], None]]

STARTUP = RetryPolicy(first_delay=0.5, max_delay=10.0)
"""Waiting for the database and the broker at start-up: 0.5 s, then windows doubling to 10 s
(full jitter); transient failures only — anything else ends start-up at once; until the
dependency answers or the runtime stops."""

DATABASE = "database"
KAFKA = "kafka"


class NotStarted(Exception):
    """What ``/ready`` reports for a dependency start-up is still waiting for (or failed on):
    ``public_reason`` is what the probe tells its caller (no error text), the message is for
    the log."""

    def __init__(self, message: str, public_reason: str) -> None:
        super().__init__(message)
        self.public_reason = public_reason


async def database_answers(engine: AsyncEngine) -> None:
    """``SELECT 1`` on ``engine``. The database unreachable (refused, reset, starting up, too
    many connections) raises the transient error as it is; a server that answers and refuses
    us (credentials, a database that does not exist) raises ``ConfigError``."""
    try:
        async with engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=3)
    except DBAPIError as exc:
        if is_transient(exc):
            raise
        cause = exc.orig.__cause__ or exc.orig if exc.orig is not None else exc
        raise ConfigError(
            "database.url (WINBACK_DATABASE__URL): the database refused the connection: "
            f"{type(cause).__name__}: {cause}"[:500]
        ) from exc


@dataclass
class Runtime:
    engine: AsyncEngine
    transport: Transport
    publisher: Publisher
    clock: Clock
    relay: OutboxRelay
    consumers: list[ConsumerRunner] = field(default_factory=list)
    extra_parts: list[Part] = field(default_factory=list)
    topics: Sequence[str] = ()
    partitions: int = 6
    replication: int = 1
    gauge_seconds: float = 5.0
    relay_enabled: bool = True
    restart: RetryPolicy = RESTART
    """How a crashed part is restarted (tests pass a quicker one)."""
    startup: RetryPolicy = STARTUP
    """How start-up waits for the database and the broker (tests pass a quicker one)."""
    on_failure: Callable[[BaseException], None] | None = None
    """Called when start-up in the background (``lifespan``) fails for good, with the failure
    (``winback`` prints it and exits); without it the failure is logged as an error."""
    failure: BaseException | None = None
    """Why start-up failed for good, if it did."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _boot: asyncio.Task[None] | None = None
    _waiting_for: str | None = None
    _last_error: str | None = None

    @property
    def readiness_checks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """What ``/ready`` checks: the database and the broker. While start-up waits for one
        of them (or failed on it), that one fails with what start-up saw."""
        return [(DATABASE, self.check_database), (KAFKA, self.check_kafka)]

    @property
    def waiting_for(self) -> str | None:
        """The dependency start-up is waiting for (``"database"``, ``"kafka"``), if any."""
        return self._waiting_for

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """The FastAPI lifespan of a service: start every part once the database and the
        broker answer — in the background, so the HTTP server answers its probes while
        start-up waits — and stop them (or the waiting) on shutdown."""
        self._waiting_for = DATABASE
        self._boot = asyncio.create_task(self._start_in_background(), name="start-up")
        try:
            yield
        finally:
            await self.stop()

    async def _start_in_background(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            if self.on_failure is not None:
                self.on_failure(exc)
            elif isinstance(exc, ConfigError):
                log.error("start-up failed: %s", exc, extra={"dependency": self._waiting_for})
            else:
                log.error(
                    "start-up failed",
                    extra={"dependency": self._waiting_for},
                    exc_info=exc,
                )

    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` every ``seconds`` as a supervised part (gauges and housekeeping); a
        failing run is logged and the next one comes on time."""
        failed = throttled(log)

        async def loop() -> None:
            while not self._stopping.is_set():
                try:
                    await job()
                except Exception as exc:
                    # an outage fails every run: one line per interval (throttled), and a
                    # traceback only for what is not an outage
                    failed.warning(
                        f"periodic job {name} failed",
                        extra={"part": name, "error": repr(exc)[:500]},
                        exc_info=None if is_transient(exc) else exc,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), seconds)

        self.extra_parts.append((name, loop, lambda: None))

    async def check_database(self) -> None:
        self._raise_if_waiting_for(DATABASE)
        await database_answers(self.engine)

    async def check_kafka(self) -> None:
        self._raise_if_waiting_for(KAFKA)
        await self.transport.ping()

    def _raise_if_waiting_for(self, dependency: str) -> None:
        if self._waiting_for != dependency:
            return
        if self.failure is not None:
            raise NotStarted(
                f"start-up failed: {type(self.failure).__name__}: {self.failure}",
                f"start-up failed on {dependency}",
            )
        seen = f": {self._last_error}" if self._last_error else ""
        waiting = f"start-up is waiting for {dependency}"
        raise NotStarted(f"{waiting}{seen}", waiting)

    async def _reach_database(self) -> None:
        await database_answers(self.engine)

    async def _ensure_topics(self) -> None:
        await self.transport.ensure_topics(self.topics, self.partitions, self.replication)

    async def _dependencies_available(self) -> bool:
        """The database answers, the topics exist, the relay's producer is started; ``False``
        if the runtime was stopped first."""
        return (
            await self._when_available(DATABASE, "reaching the database", self._reach_database)
            and (
                not self.topics
                or await self._when_available(KAFKA, "creating the topics", self._ensure_topics)
            )
            and (
                not self.relay_enabled
                or await self._when_available(KAFKA, "starting the producer", self.publisher.start)
            )
        )

    async def _when_available(
        self, dependency: str, operation: str, attempt: Callable[[], Awaitable[None]]
    ) -> bool:
        """Run ``attempt`` until it succeeds, retrying transient failures by the ``startup``
        policy (logged through the throttle: one line per interval); ``False`` if the runtime
        was stopped meanwhile. A failure that is not transient is raised."""
        if self._stopping.is_set():
            return False
        self._waiting_for = dependency

        async def once() -> None:
            try:
                await attempt()
            except Exception as exc:
                # our own classified errors say what they are; others with their type
                own = isinstance(exc, WinbackError)
                self._last_error = (str(exc) if own else f"{type(exc).__name__}: {exc}")[:300]
                raise

        try:
            await self.startup.call(once, f"start-up: {operation}", log, self._stopping)
        except Exception:
            if self._stopping.is_set():
                return False
            raise
        self._waiting_for = self._last_error = None
        return True

    async def start(self) -> None:
        """Wait for the database and the broker (see the module's docstring), create the
        topics, start the relay's producer, then every part. Raises a failure waiting cannot
        cure (kept in ``failure``); returns without starting anything if the runtime is stopped
        while waiting."""
        try:
            if not await self._dependencies_available():
                return
        except Exception as exc:
            self.failure = exc
            raise
        parts: list[Part] = []
        if self.relay_enabled:
            parts.append(("outbox-relay", self.relay.run, self.relay.stop))
        parts += [(f"consumer:{c.name}", c.run, c.stop) for c in self.consumers]
        self.every("gauges", self.gauge_seconds, self._gauges)
        parts += self.extra_parts
        for name, run, _ in parts:
            self._tasks.append(asyncio.create_task(self._supervise(name, run), name=name))
        self._parts = parts

    async def wait_consuming(self, timeout: float | None = 60) -> None:
        """Wait until every consumer has joined its group (for tests and the demo)."""
        await asyncio.wait_for(asyncio.gather(*(c.started.wait() for c in self.consumers)), timeout)

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def once() -> None:
            if not self._stopping.is_set():
                await run()

        try:
            await self.restart.call(once, f"service part {name}", log, self._stopping)
        except Exception:
            log.exception("service part crashed while stopping", extra={"part": name})

    async def _gauges(self) -> None:
        await self.relay.report_backlog()
        for consumer in self.consumers:
            await consumer.report_lag()

    async def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()  # a start-up still waiting: no part has started
            await asyncio.wait([self._boot])
        for _, _, stop in getattr(self, "_parts", []):
            stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        await self.publisher.stop()
