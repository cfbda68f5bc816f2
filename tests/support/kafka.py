"""Real-broker helpers for tests: produce in either binding, read a topic to the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

PREFIX = "com.example"


def cloudevent(
    type: str,
    data: Any,
    *,
    id: str | None = None,
    source: str = "/billing/test",
    time: datetime | str | None = None,
) -> dict[str, Any]:
    when = time if time is not None else datetime.now(UTC)
    return {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": f"{PREFIX}.{type}",
        "time": when if isinstance(when, str) else when.isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }


def structured(event: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    return orjson.dumps(event), [("content-type", b"application/cloudevents+json")]


def binary(event: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    headers = [
        (f"ce_{name}", str(value).encode())
        for name, value in event.items()
        if name not in ("data", "datacontenttype")
    ]
    headers.append(("content-type", b"application/json"))
    return orjson.dumps(event["data"]), headers


async def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> None:
    """Produce (key, value, headers) records and wait for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=value, key=key, headers=headers)
            for key, value, headers in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(
    bootstrap: str, topic: str, expect: int, timeout: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from its start, read once at least ``expect`` have arrived and
    every partition is read to the end it had at that moment (so a record written before the
    ``expect``-th one arrived is in the answer too: an extra copy shows up in the count). Gives
    up after ``timeout`` and returns what it read; the caller's assertion shows the rest."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    ends: dict[TopicPartition, int] | None = None
    try:
        async with asyncio.timeout(timeout):
            while ends is None or not await _read_to(consumer, ends):
                batches = await consumer.getmany(timeout_ms=200)
                for messages in batches.values():
                    out.extend(messages)
                partitions = consumer.assignment()  # every partition, once the topic exists
                if ends is None and len(out) >= expect and partitions:
                    ends = await consumer.end_offsets(list(partitions))
    except TimeoutError:
        pass  # what arrived is the answer
    finally:
        await consumer.stop()
    return out


async def _read_to(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether the consumer's position has reached ``ends`` on every partition."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def group_behind(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """How many records of each partition of ``topic`` lie past ``group``'s committed position
    (a partition without a commit counts from 0); empty once the group has committed to the end.
    A consumer commits after its transaction, so then every record's effect is in the database."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        behind = {tp.partition: ends[tp] - (await consumer.committed(tp) or 0) for tp in tps}
    finally:
        await consumer.stop()
    return {p: n for p, n in behind.items() if n > 0}


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return bytes(value).decode()
    return None


def event_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(record.value or b"null")
    return value
