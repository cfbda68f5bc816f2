"""The outbox relay and the consumer group, on the real broker."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.clock import SystemClock
from shared.db.tables import churn_episodes, outbox
from shared.messaging.kafka import KafkaTransport
from shared.messaging.outbox import OutboxRelay
from shared.messaging.transport import OutgoingRecord
from shared.messaging.uow import write_outbox
from shared.settings import Settings
from tests.support.kafka import cloudevent, produce, read_all, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration


async def test_three_relays_publish_every_row_once_in_order_per_key(
    settings: Settings, engine: AsyncEngine
) -> None:
    topic = settings.topics.domain
    transport = KafkaTransport(settings.kafka.bootstrap_servers)
    await transport.ensure_topics([topic], 3)
    async with engine.begin() as conn:
        await write_outbox(
            conn,
            [OutgoingRecord(topic, f"k{i % 7}".encode(), f"{i}".encode()) for i in range(3000)],
            now=SystemClock().now(),
        )
    relays = [
        OutboxRelay(
            engine, transport.publisher(), SystemClock(), batch_size=100, idle_poll_seconds=0.01
        )
        for _ in range(3)
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]

    async def unpublished() -> int:
        async with engine.connect() as conn:
            return int(
                await conn.scalar(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                )
                or 0
            )

    left = await eventually(unpublished, lambda n: n == 0, timeout=60)
    for r in relays:
        r.stop()
    await asyncio.gather(*tasks)
    for r in relays:
        await r.publisher.stop()
    assert left == 0
    records = await read_all(settings.kafka.bootstrap_servers, topic, 3000)
    values = [int(r.value or b"-1") for r in records]
    assert len(values) == 3000
    assert sorted(values) == list(range(3000))
    per_key: dict[bytes, list[int]] = defaultdict(list)
    for r in records:
        per_key[r.key or b""].append(int(r.value or b"-1"))
    for key, seen in per_key.items():
        assert seen == sorted(seen), f"key {key!r} out of order"


async def test_a_rebalance_and_a_graceful_stop_lose_nothing_and_repeat_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    topic = settings.topics.inbound[0]
    n = 600
    first = bootstrap(settings, engine=engine)
    second = bootstrap(settings, engine=engine)
    events = [
        (
            f"cus_r{i}".encode(),
            *structured(cloudevent("subscription.cancelled", {"customer_id": f"cus_r{i}"})),
        )
        for i in range(n)
    ]

    async def episodes() -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(churn_episodes)) or 0)

    async with running(first.core.runtime):
        await produce(settings.kafka.bootstrap_servers, topic, events[: n // 2])
        await eventually(episodes, lambda v: v >= 50)
        # a second member joins: partitions move while the first is consuming
        async with running(second.core.runtime):
            await produce(settings.kafka.bootstrap_servers, topic, events[n // 2 :])
            done = await eventually(episodes, lambda v: v >= n, timeout=60)
        # the second member stopped gracefully: its partitions return to the first
        everything = {
            (t, p) for t in settings.topics.inbound for p in range(settings.topics.partitions)
        }

        async def owned() -> set[tuple[str, int]]:
            return first.consumer.subscription.assignment()

        assert await eventually(owned, lambda a: a == everything) == everything
    assert done == n
    async with engine.connect() as conn:
        emitted = int(await conn.scalar(select(func.count()).select_from(outbox)) or 0)
    assert emitted == n, "a repeated event had a second effect"

    # after the graceful stops every partition's committed offset is at its end
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id="ingest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topics.partitions)]
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()
    assert committed == ends
