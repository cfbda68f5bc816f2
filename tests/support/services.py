"""Run a service's runtime inside the test's event loop, with real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from shared.runtime import Runtime

T = TypeVar("T")


@asynccontextmanager
async def running(runtime: Runtime) -> AsyncIterator[Runtime]:
    await runtime.start()
    try:
        await runtime.wait_consuming(timeout=60)
        yield runtime
    finally:
        await runtime.stop()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    timeout: float = 30.0,
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until ``accept`` holds; return the last value either way so the test's
    own assertion reports what was seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await probe()
    while not accept(value) and loop.time() < deadline:
        await asyncio.sleep(interval)
        value = await probe()
    return value
