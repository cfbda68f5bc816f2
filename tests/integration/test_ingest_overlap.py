"""Ingest on the real broker and PostgreSQL: while a batch's transaction waits, the next batch is
polled, yet no offset is committed and nothing of it is stored before the first batch commits."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.db.tables import churn_episodes
from shared.messaging.kafka import KafkaSubscription
from shared.settings import Settings
from tests.support.kafka import cloudevent, produce, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration

HELD = "cus_held"


def cancellation(customer: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    event = cloudevent("subscription.cancelled", {"customer_id": customer, "reason": "other"})
    return (customer.encode(), *structured(event))


async def episodes(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(churn_episodes)) or 0)


async def lock_waits(engine: AsyncEngine) -> int:
    """Transactions of this database waiting for an advisory lock."""
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"
                )
            )
            or 0
        )


async def committed(settings: Settings, group: str, topic: str) -> int:
    """The group's committed offsets on ``topic``, added up: records handled and committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        offsets = [
            await consumer.committed(TopicPartition(topic, p))
            for p in range(settings.topics.partitions)
        ]
    finally:
        await consumer.stop()
    return sum(o or 0 for o in offsets)


async def test_the_next_batch_is_polled_during_a_transaction_and_committed_after_it(
    settings: Settings, engine: AsyncEngine
) -> None:
    # a group of its own: a member joining the group meanwhile would wait for the transaction
    # held below, and the held member would not poll until it is rebalanced
    group = f"ingest-overlap-{uuid.uuid4().hex[:8]}"
    service = bootstrap(settings, engine=engine, group=group)
    topic = settings.topics.inbound[0]
    servers = settings.kafka.bootstrap_servers
    async with engine.connect() as blocker:
        # the advisory lock ingest takes for a customer (store.lock_customers), held here: the
        # transaction of the batch with HELD's event waits for it
        await blocker.execute(text("SELECT pg_advisory_lock(hashtextextended(:c, 7))"), {"c": HELD})
        async with running(service.core.runtime):
            # the member has joined with every partition (a rejoin on a metadata change would
            # wait for the transaction held below, and no record would be polled meanwhile)
            subscription = service.consumer.subscription
            assert isinstance(subscription, KafkaSubscription)
            every = {(t, p) for t in settings.topics.inbound for p in range(3)}

            async def assigned() -> set[tuple[str, int]]:
                return subscription.assignment()

            assert await eventually(assigned, lambda a: a == every) == every
            await produce(servers, topic, [cancellation("cus_first")])
            assert await eventually(lambda: episodes(engine), lambda n: n >= 1) == 1
            await produce(servers, topic, [cancellation(HELD)])
            assert await eventually(lambda: lock_waits(engine), lambda n: n >= 1) >= 1

            await produce(servers, topic, [cancellation(f"cus_next_{i}") for i in range(20)])

            async def polled() -> int:
                return sum(n for (t, _), n in subscription.next_offsets.items() if t == topic)

            # every record is polled (the next batch too) while the first transaction waits
            assert await eventually(polled, lambda n: n >= 22) == 22
            assert await lock_waits(engine) >= 1, "the first transaction did not wait"
            assert await episodes(engine) == 1
            assert await committed(settings, group, topic) == 1, (
                "an offset was committed before its transaction"
            )

            await blocker.execute(
                text("SELECT pg_advisory_unlock(hashtextextended(:c, 7))"), {"c": HELD}
            )
            await blocker.commit()
            assert await eventually(lambda: episodes(engine), lambda n: n >= 22) == 22
            offsets = await eventually(lambda: committed(settings, group, topic), lambda n: n >= 22)
            assert offsets == 22
