"""Provider failures against the fake over real HTTP: retries, failover, circuit breaking,
permanent refusals that suppress (an SMS opt-out also unsubscribes the customer), no failover
after an answer that never came, and a provider's rate limit spacing its requests."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import DispatcherService
from services.dispatcher.resilience import CircuitState
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.db.tables import scheduler_customers
from shared.messaging.pipeline import Incoming
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer, Fault, postmark_error, twilio_error
from tests.support.dispatcher import (
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


async def dispatch(svc: DispatcherService, *events: dict[str, object]) -> int:
    """Hand commands to the dispatcher's pipeline (as its consumer does), then send."""
    items: list[Incoming[object]] = [
        svc.pipeline.decode_payload(from_json_dict(e), None, None) for e in events
    ]
    await svc.pipeline.transact_reliably(items)
    return await svc.sender.drain()


def outcomes_topic(svc: DispatcherService) -> str:
    return svc.core.settings.topics.outcomes


@asynccontextmanager
async def configured_dispatcher(
    settings: Settings, engine: AsyncEngine, clock: FrozenClock, config: dict[str, Any]
) -> AsyncIterator[DispatcherService]:
    """A dispatcher with a configuration built in the test (one that needs the fake's URL)."""
    svc = service(with_dispatcher(settings, config), engine, clock)
    try:
        yield svc
    finally:
        await svc.aclose()


async def change_phone(engine: AsyncEngine, customer_id: str, phone: str) -> None:
    """The customer's number changes in the scheduler's view (as a customer.updated does)."""
    async with engine.begin() as conn:
        await conn.execute(
            update(scheduler_customers)
            .where(scheduler_customers.c.id == customer_id)
            .values(phone=phone)
        )


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
    assert (row.state, row.provider) == ("failed", "twilio")
    assert len(fake.requests_for("twilio")) == 1
    topic = outcomes_topic(dispatcher)
    (failed,) = await emitted(engine, topic, model.MESSAGE_FAILED)
    assert "21610" in failed["data"]["reason"]

    # the recipient replied STOP: the customer counts as unsubscribed from SMS, the same event
    # an unsubscribe yields (the scheduler withdraws consent and closes the case on it)
    (unsubscribed,) = await emitted(engine, topic, model.CUSTOMER_UNSUBSCRIBED)
    assert unsubscribed["subject"] == "cus_stop"
    data = unsubscribed["data"]
    assert {k: data[k] for k in ("customer_id", "case_id", "step_key", "channel", "provider")} == {
        "customer_id": "cus_stop",
        "case_id": case,
        "step_key": "d1_sms",
        "channel": "sms",
        "provider": "twilio",
    }
    assert data["idempotency_key"] == f"{case}:d1_sms"
    assert "21610" in data["reason"]
    assert number not in orjson.dumps(unsubscribed).decode()  # no address in outcome events

    # both the number and the customer (whatever number they have later) are suppressed
    rows = {s.address_hash: s for s in await suppression_rows(engine)}
    assert set(rows) == {
        model.address_hash("sms", number),
        model.customer_key_hash("sms", "cus_stop"),
    }
    assert {(s.channel, s.customer_id, s.reason) for s in rows.values()} == {
        ("sms", "cus_stop", "twilio: 21610")
    }

    # the next message to that number is stopped before it reaches a provider
    await dispatch(dispatcher, command("cus_stop", case, "d2_sms", channel="sms", phone=number))
    assert len(fake.requests_for("twilio")) == 1
    (stopped,) = await emitted(engine, topic, model.MESSAGE_SUPPRESSED)
    assert stopped["data"]["step_key"] == "d2_sms"
    assert stopped["data"]["reason"].startswith("suppressed: twilio")

    # so is a message to a new number of the same customer: the customer key holds
    other = "+358409876543"
    await change_phone(engine, "cus_stop", other)
    await dispatch(dispatcher, command("cus_stop", case, "d3_sms", channel="sms", phone=other))
    assert len(fake.requests_for("twilio")) == 1
    _, stopped = await emitted(engine, topic, model.MESSAGE_SUPPRESSED)
    assert stopped["data"]["step_key"] == "d3_sms"
    assert stopped["data"]["reason"] == "suppressed: twilio: 21610"
    assert [r.state for r in await delivery_rows(engine)] == ["failed", "suppressed", "suppressed"]
    assert len(await emitted(engine, topic, model.CUSTOMER_UNSUBSCRIBED)) == 1


async def test_an_invalid_number_suppresses_only_that_number_and_unsubscribes_nobody(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.fail_next("twilio", twilio_error(21211, message="The 'To' number is not valid."))
    bad, good = "+358401111111", "+358402222222"
    case = await seed(engine, "cus_typo", phone=bad, consent={"sms": True})
    await dispatch(dispatcher, command("cus_typo", case, "d1_sms", channel="sms", phone=bad))
    (row,) = await delivery_rows(engine)
    assert (row.state, row.provider) == ("failed", "twilio")
    assert len(fake.requests_for("twilio")) == 1
    topic = outcomes_topic(dispatcher)
    (failed,) = await emitted(engine, topic, model.MESSAGE_FAILED)
    assert "21211" in failed["data"]["reason"]
    assert not await emitted(engine, topic, model.CUSTOMER_UNSUBSCRIBED)
    (suppressed,) = await suppression_rows(engine)
    assert (suppressed.channel, suppressed.address_hash) == ("sms", model.address_hash("sms", bad))

    # a corrected number is not suppressed: the customer did not opt out
    await change_phone(engine, "cus_typo", good)
    await dispatch(dispatcher, command("cus_typo", case, "d2_sms", channel="sms", phone=good))
    assert [r.state for r in await delivery_rows(engine)] == ["failed", "sent"]
    (accepted,) = fake.accepted("twilio")
    assert accepted.form["To"] == good
    assert not await emitted(engine, topic, model.MESSAGE_SUPPRESSED)


def postmark_first(fake: FakeProviderServer, files: Path) -> dict[str, Any]:
    """Email through Postmark, failing over to SendGrid (the default order reversed)."""
    email = dispatcher_config(fake, files)["email"]
    return {"primary": email["secondary"], "secondary": email["primary"]}


async def test_postmark_inactive_recipient_fails_without_failover_and_suppresses_the_address(
    settings: Settings,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    tmp_path: Path,
    clock: FrozenClock,
) -> None:
    config = dispatcher_config(fake, tmp_path, email=postmark_first(fake, tmp_path))
    fake.fail_next(
        "postmark",
        postmark_error(406, message="You tried to send to recipient(s) marked as inactive."),
    )
    address = "aino.inactive@example.com"
    case = await seed(engine, "cus_406", email=address)
    async with configured_dispatcher(settings, engine, clock, config) as svc:
        topic = outcomes_topic(svc)
        await dispatch(svc, command("cus_406", case, email=address))
        (row,) = await delivery_rows(engine)
        assert (row.state, row.provider) == ("failed", "postmark")
        (request,) = fake.requests_for("postmark")  # a permanent refusal: no retry
        assert (request.status, request.json["To"]) == (422, address)
        assert not fake.requests_for("sendgrid")  # the recipient is the problem: no failover
        (failed,) = await emitted(engine, topic, model.MESSAGE_FAILED)
        assert failed["data"]["provider"] == "postmark"
        assert "marked as inactive" in failed["data"]["reason"]
        assert "code 406" in failed["data"]["reason"]
        assert address not in failed["data"]["reason"]
        assert not await emitted(engine, topic, model.CUSTOMER_UNSUBSCRIBED)
        (suppressed,) = await suppression_rows(engine)  # the address, not the customer
        assert (suppressed.channel, suppressed.address_hash, suppressed.reason) == (
            "email",
            model.address_hash("email", address),
            "postmark: 406",
        )

        # the next email to that address (however it is capitalised) goes nowhere
        await dispatch(svc, command("cus_406", case, "d7_follow_up", email=address.upper()))
        assert len(fake.requests) == 1
        (stopped,) = await emitted(engine, topic, model.MESSAGE_SUPPRESSED)
        assert stopped["data"]["step_key"] == "d7_follow_up"
        assert stopped["data"]["reason"] == "suppressed: postmark: 406"
        assert [r.state for r in await delivery_rows(engine)] == ["failed", "suppressed"]


RATE = 10
"""Requests per second allowed on the rate-limited provider."""


async def test_the_rate_limit_of_a_provider_spaces_its_requests(
    settings: Settings,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    tmp_path: Path,
    clock: FrozenClock,
) -> None:
    email = dispatcher_config(fake, tmp_path)["email"]
    config = dispatcher_config(
        fake,
        tmp_path,
        email={"primary": {**email["primary"], "rate_per_second": RATE}},
        # sends queued in the limiter count towards the longest a send may take (settings
        # refuse a stale limit shorter than that)
        stale_sending_seconds=3600,
    )
    n = 3 * RATE
    cases = {f"cus_rate_{i:02d}": await seed(engine, f"cus_rate_{i:02d}") for i in range(n)}
    async with configured_dispatcher(settings, engine, clock, config) as svc:
        assert await dispatch(svc, *(command(cid, case) for cid, case in cases.items())) == n

    # every message went once, all through the limited primary
    rows = await delivery_rows(engine)
    assert {(r.state, r.provider) for r in rows} == {("sent", "sendgrid")}
    assert len(rows) == n
    requests = fake.requests_for("sendgrid")
    assert sorted(r.idempotency_key or "" for r in requests) == sorted(
        f"{case}:d0_we_miss_you" for case in cases.values()
    )
    assert {r.status for r in requests} == {202}
    assert not fake.requests_for("postmark")

    # aiolimiter's leaky bucket lets RATE through at once (an empty bucket holds RATE), then
    # RATE a second: no second sees more than 2 * RATE (one more for arrival jitter), where an
    # unlimited provider gets all n within a few milliseconds
    arrivals = sorted(r.received_at for r in requests)
    busiest = max(bisect_right(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert busiest <= 2 * RATE + 1, f"{busiest} requests within one second"
    # and the last one can only go once (n - RATE) / RATE seconds have leaked out
    assert arrivals[-1] - arrivals[0] >= (n - RATE) / RATE - 0.2


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
