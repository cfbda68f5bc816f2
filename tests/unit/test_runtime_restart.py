"""A service part that crashes is restarted by the runtime's retry policy until it ends, and
not once the runtime stops. The policy here waits a millisecond (the real one: ``RESTART``).
The runtime starts its parts once the database answers: the test session's PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import FrozenClock
from shared.messaging.memory import MemoryBus
from shared.messaging.outbox import OutboxRelay
from shared.retry import RetryPolicy, any_exception
from shared.runtime import Runtime

QUICK = RetryPolicy(first_delay=0.001, max_delay=0.001, retry_on=any_exception)


@pytest.fixture
async def runtime(engine: AsyncEngine) -> AsyncIterator[Runtime]:
    bus = MemoryBus(clock=FrozenClock())
    publisher = bus.publisher()
    rt = Runtime(
        engine=engine,
        transport=bus,
        publisher=publisher,
        clock=FrozenClock(),
        relay=OutboxRelay(engine, publisher, FrozenClock()),
        relay_enabled=False,
        gauge_seconds=3600,
        restart=QUICK,
    )
    try:
        yield rt
    finally:
        await rt.stop()
        bus.close()


async def test_a_crashing_part_is_restarted_until_it_ends(runtime: Runtime) -> None:
    runs: list[int] = []
    ended = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs) + 1)
        if len(runs) < 4:
            raise ZeroDivisionError(f"crash {len(runs)}")
        ended.set()

    runtime.extra_parts.append(("flaky", flaky, lambda: None))
    await runtime.start()
    await asyncio.wait_for(ended.wait(), timeout=5)
    assert runs == [1, 2, 3, 4]


async def test_a_part_that_crashes_while_the_runtime_stops_is_not_restarted(
    runtime: Runtime,
) -> None:
    runs: list[int] = []
    crashing = asyncio.Event()
    stopped = asyncio.Event()

    async def crashes_on_stop() -> None:
        runs.append(len(runs) + 1)
        crashing.set()
        await stopped.wait()
        raise ConnectionResetError("torn down under it")

    runtime.extra_parts.append(("fragile", crashes_on_stop, stopped.set))
    await runtime.start()
    await asyncio.wait_for(crashing.wait(), timeout=5)
    await runtime.stop()
    assert runs == [1]
