"""The hostile-record corpus (tests/support/corpus.py) interleaved with valid events on the
real broker and PostgreSQL: every bad record is dead-lettered with its code and field, every
good one is handled, the consumer never crashes and its committed offsets reach the end."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from hashlib import sha256
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.cloudevents import CloudEvent
from shared.db.tables import churn_episodes, customers
from shared.messaging.kafka import KafkaTransport
from shared.messaging.pipeline import Incoming, Tx
from shared.settings import Settings
from tests.support.corpus import (
    DEFAULT_OVERSIZE_BYTES,
    HostileRecord,
    Producible,
    ValidRecord,
    hostile_records,
    produce_records,
    valid_cancellations,
)
from tests.support.kafka import cloudevent, header, read_all, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration

OVERSIZE_BYTES: int | None = DEFAULT_OVERSIZE_BYTES
"""The near-limit record is in: it fits the broker, its dead-letter copy does not fit 1 MiB
and is cut to an excerpt with the original's SHA-256 and size (shared/messaging/pipeline.py)."""


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def lag_of(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """Per partition: records between the group's committed offset and the end."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await reader.start()
    try:
        ends = await reader.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await reader.stop()
    return {tp.partition: end - committed.get(tp.partition, 0) for tp, end in ends.items()}


async def test_every_hostile_record_is_dead_lettered_and_every_good_one_handled(
    settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    group = f"ingest-hostile-{uuid.uuid4().hex[:6]}"
    service = bootstrap(settings, engine=engine, group=group)
    topic = settings.topics.inbound[0]
    bootstrap_servers = settings.kafka.bootstrap_servers
    hostile = hostile_records(
        max_event_bytes=settings.ingest.max_event_bytes, oversize_bytes=OVERSIZE_BYTES
    )
    good = valid_cancellations(len(hostile) // 3 + 1, tag=f"good-{uuid.uuid4().hex[:6]}")
    interleaved: list[Producible] = []
    for i, record in enumerate(hostile):
        if i % 3 == 0:
            interleaved.append(good[i // 3])
        interleaved.append(record)
    interleaved += good[len(hostile[::3]) :]  # and good ones after the last bad one
    assert len([r for r in interleaved if isinstance(r, ValidRecord)]) == len(good)

    await KafkaTransport(bootstrap_servers).ensure_topics(
        [*settings.topics.inbound, settings.topics.dead_letter], settings.topics.partitions
    )
    async with running(service.core.runtime):
        positions = await produce_records(bootstrap_servers, topic, interleaved)
        dead = await read_all(
            bootstrap_servers, settings.topics.dead_letter, expect=len(hostile), timeout=60
        )
        handled = await eventually(
            lambda: count(engine, churn_episodes), lambda n: n >= len(good), timeout=60
        )

        async def lag() -> dict[int, int]:
            return await lag_of(bootstrap_servers, group, topic, settings.topics.partitions)

        remaining = await eventually(lag, lambda v: bool(v) and not any(v.values()))

    assert remaining, "no partition of the topic seen"
    assert not any(remaining.values()), f"records left behind: {remaining}"
    assert handled == len(good)
    async with engine.connect() as conn:
        stored = set((await conn.execute(select(customers.c.id))).scalars())
    assert stored == {g.customer_id for g in good}

    by_position = {
        pos: record
        for pos, record in zip(positions, interleaved, strict=True)
        if isinstance(record, HostileRecord)
    }
    seen: dict[str, tuple[str | None, str | None]] = {}
    truncated: list[str] = []
    for letter in dead:
        position = (
            int(header(letter, "winback-dlq-source-partition") or -1),
            int(header(letter, "winback-dlq-source-offset") or -1),
        )
        original = by_position[position]
        seen[original.name] = (
            header(letter, "winback-dlq-error-code"),
            header(letter, "winback-dlq-error-field") or None,
        )
        assert header(letter, "winback-dlq-source-topic") == topic
        assert header(letter, "winback-dlq-error-reason"), original.name
        if header(letter, "winback-dlq-value-truncated") == "true":
            # too large to copy whole: an excerpt, and the original's hash and size
            whole = original.value or b""
            assert header(letter, "winback-dlq-value-sha256") == sha256(whole).hexdigest()
            assert header(letter, "winback-dlq-value-size") == str(len(whole))
            assert letter.value is not None
            assert whole.startswith(letter.value)
            truncated.append(original.name)
        else:
            assert letter.value == original.value, original.name  # the original bytes
    expected = {h.name: (h.code, h.field) for h in hostile}
    assert seen == expected
    assert len(dead) == len(hostile), "a record was dead-lettered twice"
    assert truncated == (["value_near_broker_limit"] if OVERSIZE_BYTES else [])

    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert not crashes, [r.getMessage() for r in crashes]


class DecoderWithABug:
    """Ingest's handler, except that decoding customer "bug" raises what no validator
    expected — the stand-in for a bug meeting input nobody foresaw."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, event: CloudEvent) -> Any:
        if isinstance(event.data, dict) and event.data.get("customer_id") == "bug":
            raise KeyError("not foreseen")
        return self.inner.decode(event)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        await self.inner.handle(tx, items)


async def test_an_unexpected_exception_while_decoding_is_a_decode_error_dead_letter(
    settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service = bootstrap(settings, engine=engine)
    service.pipeline.handler = DecoderWithABug(service.pipeline.handler)
    topic = settings.topics.inbound[0]
    before, after = valid_cancellations(2, tag=f"around-bug-{uuid.uuid4().hex[:6]}")
    bug = cloudevent("subscription.cancelled", {"customer_id": "bug"})
    value, headers = structured(bug)
    bad = ValidRecord("bug", b"same-key", value, tuple(headers), "bug", bug["id"])
    async with running(service.core.runtime):
        await produce_records(
            settings.kafka.bootstrap_servers,
            topic,
            [before, bad, after],
        )
        dead = await read_all(settings.kafka.bootstrap_servers, settings.topics.dead_letter, 1)
        handled = await eventually(lambda: count(engine, churn_episodes), lambda n: n >= 2)
    assert handled == 2
    assert len(dead) == 1
    assert header(dead[0], "winback-dlq-error-code") == "decode_error"
    assert (header(dead[0], "winback-dlq-error-reason") or "").startswith("KeyError")
    assert dead[0].value == value
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
