"""The Kafka transport, on aiokafka. The only module that imports aiokafka (with
``kafka_raw``, which reads a record batch aiokafka cannot parse)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Iterator, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    CommitFailedError,
    IllegalSaslStateError,
    IllegalStateError,
    IncompatibleBrokerVersion,
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationAssignmentError,
    InvalidReplicationFactorError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    SecurityDisabled,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnrecognizedBrokerVersion,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
    for_code,
)
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTP

from shared.errors import ConfigError, InvalidEvent, TransientError
from shared.messaging.kafka_raw import RawRecord, read_around
from shared.messaging.transport import (
    DEFAULT_MAX_RECORD_BYTES,
    PUBLISHED,
    Outcome,
    OutgoingRecord,
    Record,
    RevokeHook,
    TopicPartition,
    raise_for_outcomes,
    record_problem,
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
        for tp in tps:
            self.owner.next_offsets.pop(tp, None)

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
        self.next_offsets: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record ``poll`` returned."""
        self._consumer: AIOKafkaConsumer | None = None
        self._bootstrap = bootstrap
        self._client_id = f"{client_id}-{group}"
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
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError:
            raise
        except Exception as exc:
            # aiokafka failed to parse a fetched record (a header name that is not UTF-8):
            # it would fail the same way on every retry, in every member of the group
            return await self._read_around_unparsable(exc)
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
        for r in out:
            self.next_offsets[r.tp] = r.offset + 1
        return out

    async def _read_around_unparsable(self, error: Exception) -> list[Record]:
        """Put every partition back where ``poll`` left it (the failed fetch may have moved
        some past records it never returned), then read the batch aiokafka cannot parse
        ourselves (``kafka_raw``): its records are returned — the unparsable ones marked
        ``unreadable``, to be dead-lettered — and the partition moves past the batch."""
        log.warning(
            "the Kafka client cannot parse a fetched record; reading its batch directly",
            extra={"error": f"{type(error).__name__}: {error}"[:300]},
        )
        consumer = self.consumer
        out: list[Record] = []
        for topic, partition in sorted(self.assignment()):
            tp = KafkaTP(topic, partition)
            start = self.next_offsets.get((topic, partition))
            if start is None:
                committed = await consumer.committed(tp)
                start = (
                    committed
                    if committed is not None
                    else (await consumer.beginning_offsets([tp]))[tp]
                )
            consumer.seek(tp, start)
            found = await read_around(self._bootstrap, self._client_id, topic, partition, start)
            if found is None:
                continue
            raw_records, after = found
            out += [_from_raw(topic, partition, r) for r in raw_records]
            consumer.seek(tp, after)
            self.next_offsets[(topic, partition)] = after
        if not out:
            raise error  # not a record we could find: fail as before
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


_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


def outcome_of(exc: BaseException) -> Outcome:
    """Classify a failed send. ``refused`` only for what the same bytes can never get past —
    a record or batch over a size limit, a topic name the broker rejects, a timestamp it
    refuses; these aiokafka errors are not ``retriable``. Everything else is ``failed``: the
    ``retriable`` errors (leader moving, broker unreachable, not enough replicas) and the
    non-retriable ones that a fix of the cluster or its configuration cures (authorization,
    an unknown topic, a fenced producer) — the row waits for the next pass."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, _TOO_LARGE):
        return Outcome.refused("record_too_large", detail)
    if isinstance(exc, InvalidTopicError):
        return Outcome.refused("invalid_topic", detail)
    if isinstance(exc, InvalidTimestampError | UnicodeEncodeError):
        return Outcome.refused("invalid_record", detail)
    return Outcome.failed(type(exc).__name__, detail[:500])


def _from_raw(topic: str, partition: int, raw: RawRecord) -> Record:
    if raw.corrupt:
        return Record(
            topic,
            partition,
            raw.offset,
            None,
            None,
            (),
            unreadable=InvalidEvent(
                "unreadable_record", "the record's bytes cannot be parsed (record batch v2)"
            ),
        )
    headers: list[tuple[str, bytes]] = []
    error: InvalidEvent | None = None
    for name, value in raw.headers:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            text = name.decode("utf-8", "backslashreplace")
            error = error or InvalidEvent(
                "invalid_header", f"header name {name[:40]!r} is not UTF-8", "headers"
            )
        headers.append((text, value if value is not None else b""))
    return Record(
        topic,
        partition,
        raw.offset,
        raw.key,
        raw.value,
        tuple(headers),
        raw.timestamp_ms,
        unreadable=error,
    )


class KafkaPublisher:
    """The idempotent producer (acks=all). ``max_record_bytes`` is its ``max_request_size``:
    a larger record is refused before it is sent (``MessageSizeTooLargeError``)."""

    def __init__(
        self, bootstrap: str, client_id: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    ) -> None:
        self.max_record_bytes = max_record_bytes
        self._producer: AIOKafkaProducer | None = None
        self._started = False
        self._options = dict(
            bootstrap_servers=bootstrap,
            client_id=f"{client_id}-publisher",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=256 * 1024,
            max_request_size=max_record_bytes,
        )

    async def start(self) -> None:
        """Start the producer; the broker unreachable is a ``TransientError``, a refusal the
        configuration cannot get past a ``ConfigError`` (``startup_errors``)."""
        self._started = True
        with startup_errors("starting the producer", str(self._options["bootstrap_servers"])):
            await self._open()

    async def _open(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**self._options)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()  # closes what it opened; else a ResourceWarning
                raise
            self._producer = producer
        return self._producer

    async def _close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def publish(self, records: Sequence[OutgoingRecord]) -> None:
        raise_for_outcomes(records, await self.publish_each(records))

    async def publish_each(self, records: Sequence[OutgoingRecord]) -> list[Outcome]:
        """Hand every record to the producer (its batches pipeline them), then wait for each
        acknowledgement.

        A batch the broker refuses as too large (a topic's ``max.message.bytes`` under ours)
        fails every record in it, small ones too: those are sent again one at a time, so only
        a record too large on its own is ``refused``. A batch the broker refused also leaves
        the idempotent producer's sequence numbers for that partition ahead of the broker's
        (every later batch would fail with ``OutOfOrderSequenceNumber``), so after one the
        producer is replaced by a new one (a new producer id)."""
        if not self._started:
            raise RuntimeError("the publisher is not started")
        producer = await self._open()  # again, if a renewal could not start one
        outcomes: list[Outcome] = [PUBLISHED] * len(records)
        pending: dict[int, asyncio.Future[object]] = {}
        held: set[str] = set()
        for i, r in enumerate(records):
            outcome = await self._hand_over(producer, r, held)
            if isinstance(outcome, Outcome):
                outcomes[i] = outcome
                if outcome.status == "failed":
                    held.add(r.topic)
            else:
                pending[i] = outcome
        results = await asyncio.gather(*pending.values(), return_exceptions=True)
        alone: list[int] = []
        for i, result in zip(pending, results, strict=True):
            if isinstance(result, _TOO_LARGE):
                alone.append(i)
            elif isinstance(result, BaseException):
                outcomes[i] = outcome_of(result)
        if any(isinstance(result, BaseException) for result in results):
            producer = await self._renew()
        for i in alone:
            r = records[i]
            try:
                future = await producer.send(r.topic, r.value, r.key, headers=list(r.headers))
            except Exception as exc:
                outcomes[i] = outcome_of(exc)
                continue
            try:
                await future
            except Exception as exc:
                outcomes[i] = outcome_of(exc)
                producer = await self._renew()
        return outcomes

    async def _renew(self) -> AIOKafkaProducer:
        """Replace the producer after the broker refused a batch (see ``publish_each``)."""
        log.warning("the broker refused a batch; starting a new producer")
        await self._close()
        return await self._open()

    async def _hand_over(
        self, producer: AIOKafkaProducer, r: OutgoingRecord, held: set[str]
    ) -> Outcome | asyncio.Future[object]:
        """The record's future, or its outcome if it cannot be handed to the producer."""
        if r.topic in held:
            return Outcome.failed("held", "an earlier record of this topic was not published")
        problem = record_problem(r, self.max_record_bytes)
        if problem is not None:
            # aiokafka would refuse the size too, but wait for the metadata of a topic name
            # the broker rejects until its request timeout and then call it unknown
            return problem
        try:
            future: asyncio.Future[object] = await producer.send(
                r.topic, value=r.value, key=r.key, headers=list(r.headers)
            )
        except Exception as exc:
            return outcome_of(exc)
        return future

    async def stop(self) -> None:
        self._started = False
        await self._close()


_SETTING = "kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS)"
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")

# What the same configuration will never get past: authentication, authorization, a broker
# that does not speak our protocol, topic settings the cluster refuses. Every other Kafka error
# at start-up (the broker unreachable, no leader yet, a timeout, one we do not know) is waited
# out.
_PERMANENT: tuple[type[KafkaError], ...] = (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    IllegalSaslStateError,
    IncompatibleBrokerVersion,
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationAssignmentError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    KafkaConfigurationError,
    PolicyViolationError,
    SaslAuthenticationFailed,
    SecurityDisabled,
    TopicAuthorizationFailedError,
    UnrecognizedBrokerVersion,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
)


def parse_bootstrap(servers: str) -> list[tuple[str, int]]:
    """The ``host:port`` pairs of a bootstrap list (``[v6]:port`` for IPv6; the port defaults
    to 9092), or ``ConfigError`` naming the setting and the entry that cannot be an address:
    a configuration no retry can fix fails at once instead of being waited out."""
    if not servers.strip():
        raise ConfigError(f"{_SETTING}: empty")
    pairs: list[tuple[str, int]] = []
    for entry in servers.split(","):
        try:
            [(host, port, family)] = collect_hosts(entry, randomize=False)
        except ValueError:
            raise ConfigError(f"{_SETTING}: {entry.strip()!r} is not host:port") from None
        if not 0 < port < 65536:
            raise ConfigError(f"{_SETTING}: {entry.strip()!r}: port {port} is out of range")
        if family != socket.AF_INET6 and not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"{_SETTING}: {entry.strip()!r}: {host!r} is not a host name")
        pairs.append((host, port))
    return pairs


@contextlib.contextmanager
def startup_errors(what: str, servers: str) -> Iterator[None]:
    """Classify a Kafka client's failure while a service starts (creating topics, starting a
    producer, a readiness ping), so the caller's retry policy can tell waiting from giving up:
    a failure the same configuration can never get past (``_PERMANENT``) becomes a
    ``ConfigError`` naming the setting; any other Kafka error — the broker unreachable first of
    all (``KafkaConnectionError``) — a ``TransientError``."""
    try:
        yield
    except _PERMANENT as exc:
        raise ConfigError(f"{_SETTING}: {what} at {servers} refused: {_named(exc)}"[:500]) from exc
    except KafkaError as exc:
        raise TransientError(
            f"{what}: the broker at {servers} is not available: {_named(exc)}"[:500]
        ) from exc


def _named(exc: BaseException) -> str:
    """``"Type: message"`` (aiokafka's messages often start with their type already)."""
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class KafkaTransport:
    def __init__(
        self,
        bootstrap: str,
        client_id: str = "winback",
        session_timeout_ms: int = 30_000,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        parse_bootstrap(bootstrap)
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.session_timeout_ms = session_timeout_ms
        self.max_record_bytes = max_record_bytes

    def subscription(self, group: str, topics: Sequence[str]) -> KafkaSubscription:
        return KafkaSubscription(
            self.bootstrap, group, topics, self.client_id, self.session_timeout_ms
        )

    def publisher(self) -> KafkaPublisher:
        return KafkaPublisher(self.bootstrap, self.client_id, self.max_record_bytes)

    async def ensure_topics(
        self, topics: Sequence[str], partitions: int, replication: int = 1
    ) -> None:
        """Create the topics that do not exist yet and wait until each partition has a
        leader. The broker unreachable is a ``TransientError``; the cluster refusing (a
        replication factor over its brokers, no authorization) a ``ConfigError``
        (``startup_errors``)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        try:
            with startup_errors("creating the topics", self.bootstrap):
                await admin.start()
                existing = set(await admin.list_topics())
                missing = [t for t in dict.fromkeys(topics) if t not in existing]
                if missing:
                    response = await admin.create_topics(
                        [
                            NewTopic(t, num_partitions=partitions, replication_factor=replication)
                            for t in missing
                        ]
                    )
                    for topic, code, *message in response.topic_errors:
                        error = for_code(code)
                        if code and error is not TopicAlreadyExistsError:
                            raise error(f"topic {topic}: {''.join(message[:1]) or error.message}")
                    await _until_led(admin, missing)
        finally:
            await admin.close()

    async def ping(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, request_timeout_ms=3000
        )
        try:
            with startup_errors("ping", self.bootstrap):
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
