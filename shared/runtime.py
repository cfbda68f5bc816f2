"""A service's moving parts, started and stopped together: consumers, the outbox relay and
the periodic gauges. Each part runs supervised: a crash is logged (through the log throttle,
with its traceback) and the part restarts by the ``RESTART`` retry policy (0.5 s, windows
doubling to 30 s, full jitter) until the runtime stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import Clock
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.outbox import OutboxRelay
from shared.messaging.transport import Publisher, Transport
from shared.retry import RESTART, RetryPolicy

log = logging.getLogger(__name__)

Part = tuple[str, Callable[[], Awaitable[None]], Callable[[], None]]


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
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def readiness_checks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """What ``/ready`` checks: the database and the broker."""
        return [("database", self.check_database), ("kafka", self.check_kafka)]

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """The FastAPI lifespan of a service: start every part, stop them on shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` every ``seconds`` as a supervised part (gauges and housekeeping); a
        failing run is logged and the next one comes on time."""

        async def loop() -> None:
            while not self._stopping.is_set():
                try:
                    await job()
                except Exception:
                    log.warning("periodic job failed", extra={"part": name}, exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), seconds)

        self.extra_parts.append((name, loop, lambda: None))

    async def check_database(self) -> None:
        async with self.engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=3)

    async def check_kafka(self) -> None:
        await self.transport.ping()

    async def start(self) -> None:
        if self.topics:
            await self.transport.ensure_topics(self.topics, self.partitions, self.replication)
        parts: list[Part] = []
        if self.relay_enabled:
            await self.publisher.start()
            parts.append(("outbox-relay", self.relay.run, self.relay.stop))
        parts += [(f"consumer:{c.name}", c.run, c.stop) for c in self.consumers]
        self.every("gauges", self.gauge_seconds, self._gauges)
        parts += self.extra_parts
        for name, run, _ in parts:
            self._tasks.append(asyncio.create_task(self._supervise(name, run), name=name))
        self._parts = parts

    async def wait_consuming(self, timeout: float = 60) -> None:
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
        for _, _, stop in getattr(self, "_parts", []):
            stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        await self.publisher.stop()
