"""The Kafka transport, on aiokafka. The only module that imports aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTP

from shared.messaging.transport import (
    OutgoingRecord,
    Record,
    RevokeHook,
    TopicPartition,
)

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaSubscription) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[KafkaTP]) -> None:
        tps = {(tp.topic, tp.partition) for tp in revoked}
        if tps and self.owner.on_revoke is not None:
            await self.owner.on_revoke(tps)
        self.owner.revoked |= tps

    async def on_partitions_assigned(self, assigned: Sequence[KafkaTP]) -> None:
        self.owner.revoked -= {(tp.topic, tp.partition) for tp in assigned}


class KafkaSubscription:
    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        client_id: str,
        session_timeout_ms: int = 30_000,
    ) -> None:
        self.topics = list(topics)
        self.group = group
        self.on_revoke: RevokeHook | None = None
        self.revoked: set[TopicPartition] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._options = dict(
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=f"{client_id}-{group}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 10),
            max_poll_interval_ms=300_000,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=2 * 1024 * 1024,
            # a topic created after we subscribed (another service creates it) joins the
            # assignment at the next metadata refresh: 30 s, not aiokafka's 5 minutes
            metadata_max_age_ms=30_000,
        )

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the subscription is not started")
        return self._consumer

    async def start(self, on_revoke: RevokeHook) -> None:
        # aiokafka clients must be made inside the running event loop
        self.on_revoke = on_revoke
        self._consumer = AIOKafkaConsumer(**self._options)
        await self._consumer.start()
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    async def poll(self, max_records: int, timeout_ms: int) -> list[Record]:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Record] = []
        for tp, messages in batches.items():
            for m in messages:
                out.append(
                    Record(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=m.offset,
                        key=m.key,
                        value=m.value,
                        headers=tuple((k, v if v is not None else b"") for k, v in m.headers),
                        timestamp_ms=m.timestamp,
                    )
                )
        return out

    async def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        owned = self.assignment()
        offsets = {
            KafkaTP(topic, partition): OffsetAndMetadata(offset, "")
            for (topic, partition), offset in positions.items()
            if (topic, partition) in owned
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced under us: the new owner re-reads from the last commit
            # and the inbox absorbs the repeats.
            log.warning("offset commit rejected after a rebalance", extra={"error": str(exc)})

    def assignment(self) -> set[TopicPartition]:
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def lag(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            position = await self.consumer.position(tp)
            out[(tp.topic, tp.partition)] = max(0, end - position)
        return out

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class KafkaPublisher:
    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._producer: AIOKafkaProducer | None = None
        self._options = dict(
            bootstrap_servers=bootstrap,
            client_id=f"{client_id}-publisher",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=256 * 1024,
            max_request_size=1024 * 1024,
        )

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(**self._options)
            await producer.start()
            self._producer = producer

    async def publish(self, records: Sequence[OutgoingRecord]) -> None:
        if self._producer is None:
            raise RuntimeError("the publisher is not started")
        futures = [
            await self._producer.send(r.topic, value=r.value, key=r.key, headers=list(r.headers))
            for r in records
        ]
        if futures:
            await asyncio.gather(*futures)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class KafkaTransport:
    def __init__(
        self, bootstrap: str, client_id: str = "winback", session_timeout_ms: int = 30_000
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.session_timeout_ms = session_timeout_ms

    def subscription(self, group: str, topics: Sequence[str]) -> KafkaSubscription:
        return KafkaSubscription(
            self.bootstrap, group, topics, self.client_id, self.session_timeout_ms
        )

    def publisher(self) -> KafkaPublisher:
        return KafkaPublisher(self.bootstrap, self.client_id)

    async def ensure_topics(
        self, topics: Sequence[str], partitions: int, replication: int = 1
    ) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in dict.fromkeys(topics) if t not in existing]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [
                            NewTopic(t, num_partitions=partitions, replication_factor=replication)
                            for t in missing
                        ]
                    )
                await _until_led(admin, missing)
        finally:
            await admin.close()

    async def ping(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, request_timeout_ms=3000
        )
        try:
            await asyncio.wait_for(admin.start(), timeout=5)
            await asyncio.wait_for(admin.list_topics(), timeout=5)
        finally:
            await admin.close()


async def _until_led(
    admin: AIOKafkaAdminClient, topics: Sequence[str], timeout: float = 30
) -> None:
    """Wait until the metadata shows every partition of ``topics`` with a leader.

    A consumer subscribing right after ``create_topics`` may otherwise see a topic without
    leaders yet, leave it out of the group's assignment, and pick it up only at its next
    metadata refresh (``metadata_max_age_ms``) — minutes of records not consumed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        described = await admin.describe_topics(list(topics))
        if all(
            t["error_code"] == 0
            and t["partitions"]
            and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics {list(topics)} have no partition leaders after {timeout} s")
        await asyncio.sleep(0.1)
