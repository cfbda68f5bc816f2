"""Provider failures against the fake over real HTTP: retries, failover, circuit breaking,
permanent refusals that suppress, and no failover after an answer that never came."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import DispatcherService
from services.dispatcher.resilience import CircuitState
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.messaging.pipeline import Incoming
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer, Fault, twilio_error
from tests.integration.test_dispatcher_support import (
    T0,
    command,
    delivery_rows,
    dispatcher_config,
    emitted,
    seed,
    service,
    suppression_rows,
    with_dispatcher,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviderServer]:
    async with FakeProviderServer() as server:
        yield server


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(T0)


@pytest.fixture
async def dispatcher(
    settings: Settings,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    tmp_path: Path,
    clock: FrozenClock,
    request: pytest.FixtureRequest,
) -> AsyncIterator[DispatcherService]:
    overrides = getattr(request, "param", {})
    configured = with_dispatcher(settings, dispatcher_config(fake, tmp_path, **overrides))
    svc = service(configured, engine, clock)
    try:
        yield svc
    finally:
        await svc.aclose()


async def dispatch(svc: DispatcherService, *events: dict[str, object]) -> int:
    """Hand commands to the dispatcher's pipeline (as its consumer does), then send."""
    items: list[Incoming[object]] = [
        svc.pipeline.decode_payload(from_json_dict(e), None, None) for e in events
    ]
    await svc.pipeline.transact_reliably(items)
    return await svc.sender.drain()


def outcomes_topic(svc: DispatcherService) -> str:
    return svc.core.settings.topics.outcomes


async def test_primary_down_sends_through_the_secondary(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_always("sendgrid", Fault.http(503))
    case = await seed(engine, "cus_fo")
    await dispatch(dispatcher, command("cus_fo", case))
    (row,) = await delivery_rows(engine)
    assert (row.state, row.provider) == ("sent", "postmark")
    assert len(fake.requests_for("sendgrid")) == 2  # max_attempts, then failover
    (accepted,) = fake.accepted("postmark")
    assert accepted.json["Metadata"]["idempotency_key"] == f"{case}:d0_we_miss_you"
    (sent,) = await emitted(engine, outcomes_topic(dispatcher), model.MESSAGE_SENT)
    assert sent["data"]["provider"] == "postmark"
    assert sent["data"]["provider_message_id"] == row.provider_message_id


async def test_every_provider_down_ends_as_message_failed_with_the_reasons(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_always("sendgrid", Fault.http(503))
    fake.fail_always("postmark", Fault.http(500))
    case = await seed(engine, "cus_down")
    await dispatch(dispatcher, command("cus_down", case))
    (row,) = await delivery_rows(engine)
    assert row.state == "failed"
    (failed,) = await emitted(engine, outcomes_topic(dispatcher), model.MESSAGE_FAILED)
    reason = failed["data"]["reason"]
    assert "sendgrid attempt 2" in reason
    assert "postmark attempt 2" in reason
    assert "HTTP 500" in reason
    assert failed["data"]["case_id"] == case
    assert not await emitted(engine, outcomes_topic(dispatcher), model.MESSAGE_SENT)


@pytest.mark.parametrize(
    "dispatcher", [{"retry": {"rounds": 3, "round_delay_seconds": 120}}], indirect=True
)
async def test_a_transient_failure_everywhere_is_tried_again_in_a_later_round(
    dispatcher: DispatcherService,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    clock: FrozenClock,
) -> None:
    fake.fail_next("sendgrid", Fault.http(503), times=2)
    fake.fail_next("postmark", Fault.http(503), times=2)
    case = await seed(engine, "cus_round")
    await dispatch(dispatcher, command("cus_round", case))
    (row,) = await delivery_rows(engine)
    assert row.state == "queued"
    assert row.not_before == T0 + timedelta(seconds=120)
    assert await dispatcher.sender.drain() == 0  # not before its time
    clock.advance(timedelta(seconds=121))
    assert await dispatcher.sender.drain() == 1
    (row,) = await delivery_rows(engine)
    assert (row.state, row.provider, row.attempts) == ("sent", "sendgrid", 2)
    assert len(fake.accepted()) == 1


async def test_rate_limited_with_retry_after_is_retried_on_the_same_provider(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_next("sendgrid", Fault.rate_limited(retry_after="0.2"))
    case = await seed(engine, "cus_429")
    await dispatch(dispatcher, command("cus_429", case))
    (row,) = await delivery_rows(engine)
    assert (row.state, row.provider) == ("sent", "sendgrid")
    first, second = fake.requests_for("sendgrid")
    assert (first.status, second.status) == (429, 202)
    assert not fake.requests_for("postmark")


@pytest.mark.parametrize(
    "dispatcher",
    [{"circuit": {"consecutive_failures": 2, "failure_ratio": None, "cooldown_seconds": 30}}],
    indirect=True,
)
async def test_the_circuit_opens_on_failures_and_closes_after_a_good_probe(
    dispatcher: DispatcherService,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    clock: FrozenClock,
) -> None:
    route = dispatcher.channels["email"].route("sendgrid")

    def state() -> CircuitState:  # read afresh (keeps type checkers from over-narrowing)
        return route.breaker.state

    def gauge() -> float | None:
        return REGISTRY.get_sample_value(
            "winback_dispatcher_circuit_state", {"channel": "email", "provider": "sendgrid"}
        )

    fake.fail_always("sendgrid", Fault.http(503))
    cases = {cid: await seed(engine, cid) for cid in ("cus_c1", "cus_c2", "cus_c3")}
    await dispatch(dispatcher, command("cus_c1", cases["cus_c1"]))
    assert state() is CircuitState.OPEN
    assert gauge() == 2
    assert len(fake.requests_for("sendgrid")) == 2

    await dispatch(dispatcher, command("cus_c2", cases["cus_c2"]))
    assert len(fake.requests_for("sendgrid")) == 2  # open: not even tried
    assert [r.provider for r in await delivery_rows(engine)] == ["postmark", "postmark"]

    fake.heal("sendgrid")
    clock.advance(timedelta(seconds=31))
    await dispatch(dispatcher, command("cus_c3", cases["cus_c3"]))
    assert state() is CircuitState.CLOSED
    assert gauge() == 0
    rows = await delivery_rows(engine)
    assert rows[-1].provider == "sendgrid"
    assert len(fake.requests_for("sendgrid")) == 3


async def test_twilio_21610_fails_without_retry_and_suppresses_the_number(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_next("twilio", twilio_error(21610, message="Attempt to send to unsubscribed"))
    number = "+358401234567"
    case = await seed(engine, "cus_stop", phone=number, consent={"sms": True})
    await dispatch(dispatcher, command("cus_stop", case, "d1_sms", channel="sms", phone=number))
    (row,) = await delivery_rows(engine)
    assert row.state == "failed"
    assert len(fake.requests_for("twilio")) == 1
    (failed,) = await emitted(engine, outcomes_topic(dispatcher), model.MESSAGE_FAILED)
    assert "21610" in failed["data"]["reason"]
    (suppressed,) = await suppression_rows(engine)
    assert suppressed.channel == "sms"
    assert suppressed.address_hash == model.address_hash("sms", number)

    # the next message to that number is stopped before it reaches a provider
    await dispatch(dispatcher, command("cus_stop", case, "d2_sms", channel="sms", phone=number))
    assert len(fake.requests_for("twilio")) == 1
    (stopped,) = await emitted(engine, outcomes_topic(dispatcher), model.MESSAGE_SUPPRESSED)
    assert stopped["data"]["step_key"] == "d2_sms"
    assert stopped["data"]["reason"].startswith("suppressed: twilio")


async def test_no_answer_from_a_provider_without_idempotency_is_not_failed_over(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_next("sendgrid", Fault.hang(5))  # read timeout is 2 s: it may have been sent
    case = await seed(engine, "cus_hang")
    await dispatch(dispatcher, command("cus_hang", case))
    (row,) = await delivery_rows(engine)
    assert row.state == "failed"
    assert row.error.startswith("outcome unknown")
    assert len(fake.requests_for("sendgrid")) == 1  # no retry
    assert not fake.requests_for("postmark")  # and no failover: never two messages


async def test_a_permanent_refusal_of_the_message_is_not_failed_over(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_next("sendgrid", Fault.http(400, {"errors": [{"message": "bad request"}]}))
    case = await seed(engine, "cus_400")
    await dispatch(dispatcher, command("cus_400", case))
    (row,) = await delivery_rows(engine)
    assert row.state == "failed"
    assert "bad request" in row.error
    assert len(fake.requests_for("sendgrid")) == 1
    assert not fake.requests_for("postmark")
