"""Never a second send: redelivered commands, a consumer crash, a crash mid-send and two
dispatchers on one database — each step reaches the (fake) provider exactly once."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.messaging.kafka import KafkaTransport
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import (
    T0,
    command,
    delivery_rows,
    emitted,
    seed,
    send_commands,
    service,
    started,
)
from tests.support.kafka import event_of, read_all
from tests.support.services import eventually

pytestmark = pytest.mark.integration


def duplicates() -> float:
    value = REGISTRY.get_sample_value(
        "winback_events_consumed_total",
        {"consumer": "dispatcher", "type": "any", "result": "duplicate"},
    )
    return value or 0.0


async def wait_deliveries(engine: AsyncEngine, n: int) -> list[Any]:
    return await eventually(lambda: delivery_rows(engine), lambda rows: len(rows) >= n)


async def test_a_command_delivered_twice_is_sent_once(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_twice")
    first = command("cus_twice", case)
    again = command("cus_twice", case)  # the scheduler re-emitted it: new event id, same key
    async with started(service(configured, engine, FrozenClock(T0))) as svc:
        await send_commands(configured, first, first, again)
        await wait_deliveries(engine, 1)
        assert await svc.sender.drain() == 1
        assert await svc.sender.drain() == 0
        records = await read_all(
            configured.kafka.bootstrap_servers, configured.topics.outcomes, expect=1, timeout=15
        )
    (row,) = await delivery_rows(engine)
    assert row.state == "sent"
    assert row.attempts == 1
    (request,) = fake.requests_for("sendgrid")
    assert request.idempotency_key == f"{case}:d0_we_miss_you"
    sent = [event_of(r) for r in records]
    assert [e["type"] for e in sent] == [de.MESSAGE_SENT]
    data = sent[0]["data"]
    assert {k: data[k] for k in ("case_id", "step_key", "customer_id", "channel")} == {
        "case_id": case,
        "step_key": "d0_we_miss_you",
        "customer_id": "cus_twice",
        "channel": "email",
    }
    assert data["provider"] == "sendgrid"
    assert data["provider_message_id"] == row.provider_message_id
    assert (data["template"], data["variant"], data["crm_owner"]) == (
        "we_miss_you",
        "control",
        "owner-7",
    )
    assert records[0].key == b"cus_twice"
    # the outcome carries the command's correlation id
    assert sent[0]["correlationid"] == first["id"]


async def test_a_command_redelivered_after_a_consumer_crash_is_sent_once(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_crash")
    svc = service(configured, engine, FrozenClock(T0))
    transport = KafkaTransport(configured.kafka.bootstrap_servers)
    await transport.ensure_topics(svc.core.runtime.topics, configured.topics.partitions)
    await send_commands(configured, command("cus_crash", case))
    # A first consumer handles the batch (its transaction commits) and dies before it can
    # commit the Kafka offset.
    doomed = transport.subscription("dispatcher", [configured.topics.dispatch])

    async def no_revoke(_: set[tuple[str, int]]) -> None:
        return None

    await doomed.start(on_revoke=no_revoke)
    try:
        records: list[Any] = []
        for _ in range(100):
            records += await doomed.poll(100, 200)
            if records:
                break
        assert len(records) == 1
        await svc.pipeline.transact_reliably([svc.consumer.decode(r) for r in records])
    finally:
        await doomed.stop()  # no commit: the record will be read again
    assert len(await delivery_rows(engine)) == 1

    before = duplicates()
    async with started(svc):
        # the restarted consumer reads the record again; the inbox absorbs it

        async def seen() -> float:
            return duplicates()

        assert await eventually(seen, lambda n: n > before) == before + 1
        await svc.sender.drain()
    rows = await delivery_rows(engine)
    assert [r.state for r in rows] == ["sent"]
    assert len(fake.requests_for("sendgrid")) == 1


async def test_a_crash_between_the_provider_call_and_the_update_never_sends_twice(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    clock = FrozenClock(T0)
    case = await seed(engine, "cus_midsend")
    first = service(configured, engine, clock)
    async with started(first):
        await send_commands(configured, command("cus_midsend", case))
        await wait_deliveries(engine, 1)
        claimed = await first.sender.claim()
        (outcome,) = [await first.sender.send(c) for c in claimed]
        assert outcome.result is not None  # the provider has the message...
        # ... and the process dies before recording it: the row stays "sending".
    (row,) = await delivery_rows(engine)
    assert row.state == "sending"

    restarted = service(configured, engine, clock)
    try:
        assert await restarted.sender.drain() == 0  # not stale yet: left alone
        clock.advance(timedelta(seconds=61))
        await restarted.sender.drain()
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    (row,) = await delivery_rows(engine)
    # unknown, not failed: reconciliation settles it (tests/integration/dispatcher/
    # test_reconcile.py); SendGrid has no idempotency key, so it is never re-sent
    assert (row.state, row.error) == ("unknown", None)
    assert len(fake.requests_for("sendgrid")) == 1
    # Postmark (the secondary) is only searched for it (GET /messages/outbound), never sent to
    assert [r.method for r in fake.requests_for("postmark")] == ["GET"]
    assert await emitted(engine, configured.topics.outcomes, model.MESSAGE_FAILED) == []


async def test_a_crash_mid_send_through_an_idempotent_provider_resends_and_is_absorbed(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    clock = FrozenClock(T0)
    case = await seed(engine, "cus_hook", consent={"webhook": True})
    first = service(configured, engine, clock)
    async with started(first):
        await send_commands(configured, command("cus_hook", case, channel="webhook"))
        await wait_deliveries(engine, 1)
        (claimed,) = await first.sender.claim()
        assert (await first.sender.send(claimed)).result is not None
    clock.advance(timedelta(seconds=61))
    restarted = service(configured, engine, clock)
    try:
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    (row,) = await delivery_rows(engine)
    assert row.state == "sent"
    assert row.attempts == 2
    requests = fake.requests_for("webhook")
    assert len(requests) == 2
    assert len(fake.accepted("webhook")) == 1  # the receiver deduplicated on our key
    assert requests[1].replayed
    assert {r.headers["idempotency-key"] for r in requests} == {f"{case}:d0_we_miss_you"}


async def test_two_dispatchers_on_one_database_send_each_step_exactly_once(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    fake.set_latency("sendgrid", 0.02)
    customers = [f"cus_pair_{i}" for i in range(40)]
    cases = {cid: await seed(engine, cid) for cid in customers}
    events = []
    for cid in customers:
        for step in ("d0_we_miss_you", "d3_what_you_missed"):
            template = "we_miss_you" if step.startswith("d0") else "what_you_missed"
            one = command(cid, cases[cid], step, template=template)
            events += [one, one, command(cid, cases[cid], step, template=template)]
    # small claims, so both senders work the same queue at once
    small = configured.model_copy(
        update={
            "dispatcher": configured.dispatcher.model_copy(
                update={"claim_batch": 5, "max_in_flight": 10}
            )
        }
    )
    a = service(small, engine, FrozenClock(T0), sender_loop=True)
    b = service(small, engine, FrozenClock(T0), sender_loop=True)
    async with started(a):
        await send_commands(configured, *events[: len(events) // 2])
        await wait_deliveries(engine, 1)
        async with started(b):  # joins the group while a is consuming: a rebalance
            await send_commands(configured, *events[len(events) // 2 :])
            rows = await eventually(
                lambda: delivery_rows(engine),
                lambda rows: len(rows) == 80 and all(r.state == "sent" for r in rows),
            )
    assert a.sender.claimed_total > 0
    assert b.sender.claimed_total > 0
    assert len(rows) == 80
    assert {r.state for r in rows} == {"sent"}
    keys = Counter(str(r.idempotency_key) for r in fake.requests_for("sendgrid"))
    assert len(keys) == 80
    assert set(keys.values()) == {1}
    sent = await emitted(engine, configured.topics.outcomes, model.MESSAGE_SENT)
    assert sorted(e["data"]["idempotency_key"] for e in sent) == sorted(keys)
    assert all(orjson.dumps(e) for e in sent)
