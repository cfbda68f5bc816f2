"""No outbox row can block the rows after it: on the real broker and PostgreSQL.

- A record near the broker's limit is dead-lettered cut down (hash, size, excerpt), and every
  later row is published.
- Rows the broker refuses for good are parked with their reason, counted, and the good rows
  around them go out in the same pass.
- A row that fails for now stays unpublished (not parked) and goes out once it can.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared import domain_events
from shared.clock import FrozenClock, SystemClock
from shared.db.tables import outbox
from shared.messaging.kafka import KafkaTransport
from shared.messaging.memory import MemoryBus
from shared.messaging.outbox import OutboxRelay, RelayPass
from shared.messaging.retention import prune_outbox
from shared.messaging.transport import OutgoingRecord, serialized_size
from shared.messaging.uow import write_outbox
from shared.settings import Settings
from tests.support.kafka import cloudevent, event_of, header, produce, read_all, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration

NOW = SystemClock().now()  # rows written here are stamped by the clock the relays run on


async def rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(outbox.select().order_by(outbox.c.id))).all())


async def unpublished(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
            or 0
        )


def parked_total(topic: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "winback_outbox_parked_total", {"topic": topic, "reason": reason}
    )
    return value or 0.0


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


# -- (a) a record near the broker's limit ----------------------------------------------------------
async def test_a_record_near_the_broker_limit_is_dead_lettered_cut_down_and_later_rows_go_out(
    settings: Settings, engine: AsyncEngine
) -> None:
    topic = settings.topics.inbound[0]
    limit = settings.kafka.max_record_bytes
    # a cancellation whose comment brings the record to 60 bytes under the producer's limit:
    # the broker takes it (message.max.bytes 1048588), ingest dead-letters it (over 256 KiB)
    event = cloudevent("subscription.cancelled", {"customer_id": "cus_big", "comment": ""})
    value, hs = structured(event)
    pad = limit - 60 - serialized_size(OutgoingRecord(topic, b"cus_big", value, tuple(hs)))
    event["data"]["comment"] = "x" * pad
    big, hs = structured(event)
    size = serialized_size(OutgoingRecord(topic, b"cus_big", big, tuple(hs)))
    assert limit - 64 <= size <= limit - 56
    assert len(big) > 1_000_000

    good = [
        cloudevent("subscription.cancelled", {"customer_id": "cus_a", "reason": "too_expensive"}),
        cloudevent("subscription.cancelled", {"customer_id": "cus_big", "reason": "competitor"}),
        cloudevent("subscription.reactivated", {"customer_id": "cus_a", "plan": "pro"}),
    ]
    service = bootstrap(settings, engine=engine)
    async with running(service.core.runtime):
        await produce(settings.kafka.bootstrap_servers, topic, [(b"cus_big", big, hs)])
        # the dead-letter row is in the outbox before the good events arrive: they come after
        written = await eventually(lambda: rows(engine), lambda rs: len(rs) >= 1)
        assert [r.topic for r in written] == [settings.topics.dead_letter]
        await produce(
            settings.kafka.bootstrap_servers,
            topic,
            [(e["data"]["customer_id"].encode(), *structured(e)) for e in good],
        )
        done = await eventually(
            lambda: rows(engine),
            lambda rs: len(rs) >= 4 and all(r.published_at is not None for r in rs),
            timeout=60,
        )
        domain = [r for r in done if r.topic == settings.topics.domain]
        published = await read_all(
            settings.kafka.bootstrap_servers, settings.topics.domain, len(domain)
        )
        dead = await read_all(settings.kafka.bootstrap_servers, settings.topics.dead_letter, 1)

    # the dead letter, two churns and a return: all published, none parked
    assert len(done) == 4
    assert [r.parked_at for r in done] == [None] * 4
    assert all(r.published_at is not None for r in done)
    types = sorted(event_of(r)["type"] for r in published)
    assert types == sorted(
        [domain_events.CHURN_RECORDED] * 2 + [domain_events.CUSTOMER_RETURNED]
    ), types
    assert len(published) == len(domain)

    assert len(dead) == 1
    copy = dead[0]
    assert copy.key == b"cus_big"
    assert copy.value == big[:4096]
    assert header(copy, "winback-dlq-value-truncated") == "true"
    assert header(copy, "winback-dlq-value-sha256") == hashlib.sha256(big).hexdigest()
    assert header(copy, "winback-dlq-value-size") == str(len(big))
    assert header(copy, "winback-dlq-error-code") == "oversize"
    assert header(copy, "winback-dlq-error-reason")
    assert header(copy, "winback-dlq-source-topic") == topic
    assert header(copy, "content-type") == "application/cloudevents+json"


# -- (b) rows the broker refuses for good ----------------------------------------------------------
async def create_topic(bootstrap: str, name: str, config: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


async def test_rows_the_broker_refuses_are_parked_and_the_rows_around_them_go_out_in_one_pass(
    settings: Settings, engine: AsyncEngine
) -> None:
    bootstrap = settings.kafka.bootstrap_servers
    limit = settings.kafka.max_record_bytes
    topic = settings.topics.domain
    small = f"small-{uuid.uuid4().hex[:8]}"  # the broker takes at most 4 KiB per batch here
    transport = KafkaTransport(bootstrap, max_record_bytes=limit)
    await transport.ensure_topics([topic], 3)
    await create_topic(bootstrap, small, {"max.message.bytes": "4096"})
    before = {
        (small, "record_too_large"): parked_total(small, "record_too_large"),
        (topic, "record_too_large"): parked_total(topic, "record_too_large"),
        ("bad topic!", "invalid_topic"): parked_total("bad topic!", "invalid_topic"),
    }
    async with engine.begin() as conn:
        await write_outbox(conn, [OutgoingRecord(topic, b"k", b"good-1")], limit, now=NOW)
        # the broker refuses it: over the topic's max.message.bytes
        await write_outbox(conn, [OutgoingRecord(small, b"k", b"x" * 10_000)], limit, now=NOW)
        # same topic and key, right after the refused one
        await write_outbox(conn, [OutgoingRecord(small, b"k", b"small-ok")], limit, now=NOW)
        # over kafka.max_record_bytes: written past the write-time check (as a bug could)
        await write_outbox(conn, [OutgoingRecord(topic, b"k", b"x" * limit)], 10 * limit, now=NOW)
        # a topic name Kafka does not allow, inserted directly
        await conn.execute(outbox.insert().values(topic="bad topic!", key=b"k", value=b"v"))
        await write_outbox(conn, [OutgoingRecord(topic, b"k", b"good-2")], limit, now=NOW)
    assert [r.parked_at for r in await rows(engine)] == [None] * 6

    relay = OutboxRelay(engine, transport.publisher(), SystemClock(), batch_size=100)
    await relay.publisher.start()
    try:
        first = await relay.publish_once()
        second = await relay.publish_once()
        await relay.report_backlog()
    finally:
        await relay.publisher.stop()

    assert first == RelayPass(published=3, parked=3, failed=0)
    assert second == RelayPass()  # parked rows are not tried again
    after = await rows(engine)
    assert [(r.published_at is not None, r.parked_at is not None) for r in after] == [
        (True, False),
        (False, True),
        (True, False),
        (False, True),
        (False, True),
        (True, False),
    ]
    reasons = [r.park_reason for r in after if r.parked_at is not None]
    assert reasons[0].startswith("record_too_large: ")  # the broker's MessageSizeTooLargeError
    assert reasons[1].startswith("record_too_large: ")
    assert f"over the limit of {limit}" in reasons[1]
    assert reasons[2].startswith("invalid_topic: ")
    for (t, reason), was in before.items():
        assert parked_total(t, reason) == was + 1, (t, reason)
    assert gauge("winback_outbox_parked_rows") == 3
    assert gauge("winback_outbox_backlog") == 0

    published = await read_all(bootstrap, topic, 2)
    assert [r.value for r in published] == [b"good-1", b"good-2"]
    assert [r.value for r in await read_all(bootstrap, small, 1)] == [b"small-ok"]

    # parked rows are kept: retention prunes published rows only
    await prune_outbox(engine, SystemClock(), timedelta(0), 100)
    assert [r.id for r in await rows(engine)] == [r.id for r in after if r.parked_at is not None]


async def test_a_row_over_the_limit_when_written_is_parked_at_once_and_the_transaction_goes_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    topic = settings.topics.domain
    was = parked_total(topic, "record_too_large")
    records = [
        OutgoingRecord(topic, b"k", b"before"),
        OutgoingRecord(topic, b"k", b"x" * 200_000),
        OutgoingRecord(topic, b"k", b"after"),
    ]
    async with engine.begin() as conn:
        await write_outbox(conn, records, 128 * 1024, now=NOW)
    written = await rows(engine)
    assert [r.value[:6] for r in written] == [b"before", b"xxxxxx", b"after"]
    assert [r.parked_at is not None for r in written] == [False, True, False]
    assert written[1].park_reason.startswith("record_too_large: ")
    assert len(written[1].value) == 200_000  # kept whole, for whoever looks into it
    assert parked_total(topic, "record_too_large") == was + 1


# -- (c) a row that fails for now ------------------------------------------------------------------
async def test_a_row_that_fails_for_now_stays_unpublished_and_goes_out_once_it_can(
    engine: AsyncEngine,
) -> None:
    """The in-process bus stands for a broker without the topic yet: the rows of that topic
    fail (and the later ones of it are held back), the others go out, nothing is parked; once
    the topic exists the relay's retry publishes them, in order."""
    bus = MemoryBus(clock=FrozenClock())
    await bus.ensure_topics(["ready"], 1)
    records: Sequence[OutgoingRecord] = [
        OutgoingRecord("ready", b"k", b"1"),
        OutgoingRecord("later", b"k", b"2"),
        OutgoingRecord("ready", b"k", b"3"),
        OutgoingRecord("later", b"k", b"4"),
    ]
    async with engine.begin() as conn:
        await write_outbox(conn, records, now=NOW)
    relay = OutboxRelay(engine, bus.publisher(), SystemClock(), idle_poll_seconds=0.01)
    await relay.publisher.start()
    assert await relay.publish_once() == RelayPass(published=2, parked=0, failed=2)
    task = asyncio.create_task(relay.run())
    try:
        waiting = await rows(engine)
        assert [(r.value, r.published_at is None, r.parked_at) for r in waiting] == [
            (b"1", False, None),
            (b"2", True, None),
            (b"3", False, None),
            (b"4", True, None),
        ]
        await bus.ensure_topics(["later"], 1)
        left = await eventually(lambda: unpublished(engine), lambda n: n == 0)
    finally:
        relay.stop()
        await task
        await relay.publisher.stop()
        bus.close()
    assert left == 0
    assert [r.value for r in bus._log(("later", 0))] == [b"2", b"4"]
    assert [r.value for r in bus._log(("ready", 0))] == [b"1", b"3"]
