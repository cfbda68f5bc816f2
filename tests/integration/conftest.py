"""Fixtures shared by the integration tests.

- ``service_bus``: the bus a scenario test runs its services on, once on the real Kafka broker
  and once on the in-process ``MemoryBus`` (tests/support/buses.py).
- The dispatcher's: the fake provider server, settings wired to it, the clock and a dispatcher
  whose sender the test drives. The helpers they build on (``dispatcher_config``,
  ``with_dispatcher``, ``service``, ``seed``, ``command``, …) are in
  ``tests/support/dispatcher.py``, importable from any test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import DispatcherService
from shared.clock import FrozenClock
from shared.messaging.memory import MemoryBus
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.buses import ServiceBus
from tests.support.dispatcher import T0, dispatcher_config, service, with_dispatcher


@pytest.fixture(params=["kafka", "memory"])
def service_bus(request: pytest.FixtureRequest, kafka_bootstrap: str) -> Iterator[ServiceBus]:
    """For scenario tests that do not depend on Kafka's own behaviour: the real broker, and the
    in-process bus (much faster: no group joins)."""
    bus = ServiceBus(
        request.param, kafka_bootstrap, MemoryBus() if request.param == "memory" else None
    )
    try:
        yield bus
    finally:
        bus.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviderServer]:
    """The fake provider server (SendGrid, Postmark, Twilio, HubSpot, a webhook receiver)."""
    async with FakeProviderServer() as server:
        yield server


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(T0)


@pytest.fixture
def configured(settings: Settings, fake: FakeProviderServer, tmp_path: Path) -> Settings:
    """This test's settings with every channel of the dispatcher on ``fake``."""
    return with_dispatcher(settings, dispatcher_config(fake, tmp_path))


@pytest.fixture
async def dispatcher(
    settings: Settings,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    tmp_path: Path,
    clock: FrozenClock,
    request: pytest.FixtureRequest,
) -> AsyncIterator[DispatcherService]:
    """A dispatcher on ``fake`` whose sender the test drives (``sender.drain()``); indirect
    parametrization passes ``dispatcher_config`` overrides."""
    overrides = getattr(request, "param", {})
    configured = with_dispatcher(settings, dispatcher_config(fake, tmp_path, **overrides))
    svc = service(configured, engine, clock)
    try:
        yield svc
    finally:
        await svc.aclose()
