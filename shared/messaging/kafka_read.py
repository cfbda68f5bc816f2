"""Reading a Kafka topic as it is, for operators' tools (``shared.messaging.dlq``): a consumer
without a group (``group_id=None``), assigned every partition, from the beginning to the end
offsets taken when the read starts. It joins no group and commits nothing, so reading never
moves any service's position."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition as KafkaTP

from shared.errors import TransientError
from shared.messaging.kafka import startup_errors
from shared.messaging.transport import Record

READ_TIMEOUT_SECONDS = 60.0


class KafkaTopicReader:
    def __init__(
        self, bootstrap: str, client_id: str = "winback", timeout: float = READ_TIMEOUT_SECONDS
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.timeout = timeout

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-reader-{uuid.uuid4().hex[:6]}",
            group_id=None,
            enable_auto_commit=False,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=2 * 1024 * 1024,
            request_timeout_ms=10_000,
        )

    async def _start(self, consumer: AIOKafkaConsumer) -> None:
        """Start it; the broker unreachable is a ``TransientError``."""
        try:
            with startup_errors("reading the topic", self.bootstrap):
                await consumer.start()
        except BaseException:
            await consumer.stop()
            raise

    @contextlib.contextmanager
    def _in_time(self, topic: str) -> Iterator[None]:
        """A read that does not reach the end in time (the broker went away meanwhile) is a
        ``TransientError``, as an unreachable broker is."""
        try:
            yield
        except TimeoutError:
            raise TransientError(
                f"reading {topic} did not reach its end within {self.timeout:g} s "
                f"(broker at {self.bootstrap})"
            ) from None

    async def read(self, topic: str) -> list[Record]:
        consumer = self._consumer()
        await self._start(consumer)
        try:
            with startup_errors("reading the topic", self.bootstrap), self._in_time(topic):
                return await asyncio.wait_for(self._read(consumer, topic), self.timeout)
        finally:
            await consumer.stop()

    async def _read(self, consumer: AIOKafkaConsumer, topic: str) -> list[Record]:
        partitions = await _partitions(consumer, topic)
        tps = [KafkaTP(topic, p) for p in partitions]
        if not tps:
            return []
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        pending: set[KafkaTP] = set()
        for tp in tps:
            if ends[tp] > begins[tp]:
                consumer.seek(tp, begins[tp])
                pending.add(tp)
        out: list[Record] = []
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, messages in batches.items():
                out += [_record(tp, m) for m in messages if m.offset < ends[tp]]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out

    async def read_one(self, topic: str, partition: int, offset: int) -> Record | None:
        consumer = self._consumer()
        await self._start(consumer)
        try:
            with startup_errors("reading the topic", self.bootstrap), self._in_time(topic):
                return await asyncio.wait_for(
                    self._read_one(consumer, topic, partition, offset), self.timeout
                )
        finally:
            await consumer.stop()

    async def _read_one(
        self, consumer: AIOKafkaConsumer, topic: str, partition: int, offset: int
    ) -> Record | None:
        if partition not in await _partitions(consumer, topic):
            return None
        tp = KafkaTP(topic, partition)
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if not begin <= offset < end:
            return None
        consumer.seek(tp, offset)
        while await consumer.position(tp) < end:
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            for message in batches.get(tp, []):
                return _record(tp, message) if message.offset == offset else None
        return None


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partitions ([] if there is no such topic). A consumer without a subscription
    keeps no metadata of the topic, so the cluster's is fetched (as ``consumer.topics()`` does)."""
    cluster = await consumer._client.fetch_all_metadata()
    return sorted(cluster.partitions_for_topic(topic) or ())


def _record(tp: KafkaTP, m: Any) -> Record:
    return Record(
        topic=tp.topic,
        partition=tp.partition,
        offset=m.offset,
        key=m.key,
        value=m.value,
        headers=tuple((k, v if v is not None else b"") for k, v in m.headers),
        timestamp_ms=m.timestamp,
    )
