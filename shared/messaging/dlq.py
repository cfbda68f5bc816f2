"""Dead letters for operators: list them by error, see one, send them back after a fix.

Every consumer's pipeline writes a record it cannot handle to the dead-letter topic
(``topics.dead_letter``) with its original key, value and headers plus ``winback-dlq-*``
headers naming the error (code, reason, field), where it came from (source topic, partition,
offset), the consumer and when (``shared.messaging.pipeline.dead_letter_record``). A copy too
large for the broker keeps a 4 KiB excerpt of the value (``winback-dlq-value-truncated``,
``-value-sha256``, ``-value-size``; the same for a long key, ``-headers-truncated`` for cut
headers).

Here, for the ``winback dlq`` command and the ``/v1/dead-letters`` routes alike:

- **Reading** (``scan``, ``show``): the topic from its beginning to its end as of now, with a
  fresh reader that joins no consumer group and commits nothing (``TopicReader``: Kafka in
  ``shared.messaging.kafka_read``, the in-process bus here). A dead letter's id is
  ``<dead-letter topic>:<partition>:<offset>``.
- **Filtering** (``DeadLetterFilter``): error codes, source topics, consumers, ids, and a time
  range on when it was dead-lettered.
- **Redrive** (``redrive``): each matching dead letter's original record — key, value, its
  original headers without the ``winback-dlq-*`` ones — is published again to its source
  topic with one more header, ``winback-redrive-of: <id>``. Safe to repeat: the consumers'
  inboxes drop an event they already handled. A record that still fails is dead-lettered
  again — a new dead letter carrying ``winback-redrive-of`` — and nothing redrives it by
  itself, so there is no loop; the older dead letter is then *superseded* and a later redrive
  sends only the newest copy. A dead letter stored truncated cannot be redriven (its bytes are
  not all there): the report says so for each.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from shared.messaging.memory import MemoryBus
from shared.messaging.pipeline import DLQ_PREFIX
from shared.messaging.transport import OutgoingRecord, Publisher, Record, Transport

REDRIVE_OF = "winback-redrive-of"
"""Header on a redriven record: the id of the dead letter it came from (kept by the dead-letter
copy if it fails again, which supersedes that dead letter)."""
PUBLISH_CHUNK = 100


class TopicReader(Protocol):
    """Reads a topic without joining a consumer group or committing anything."""

    async def read(self, topic: str) -> list[Record]:
        """Every record from the beginning to the end as of the call; ``[]`` for a topic
        that does not exist."""
        ...

    async def read_one(self, topic: str, partition: int, offset: int) -> Record | None:
        """The record at that position, or None."""
        ...


class MemoryTopicReader:
    """Reads the in-process bus's logs directly."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    async def read(self, topic: str) -> list[Record]:
        partitions = self.bus.topics().get(topic, 0)
        return [r for p in range(partitions) for r in self.bus._log((topic, p))]

    async def read_one(self, topic: str, partition: int, offset: int) -> Record | None:
        if not 0 <= partition < self.bus.topics().get(topic, 0):
            return None
        log = self.bus._log((topic, partition))
        return log[offset] if 0 <= offset < len(log) else None


def reader_for(transport: Transport) -> TopicReader:
    """The reader for a transport: the Kafka cluster's or the in-process bus's."""
    if isinstance(transport, MemoryBus):
        return MemoryTopicReader(transport)
    from shared.messaging.kafka import KafkaTransport
    from shared.messaging.kafka_read import KafkaTopicReader

    if isinstance(transport, KafkaTransport):
        return KafkaTopicReader(transport.bootstrap, transport.client_id)
    raise TypeError(f"no dead-letter reader for {type(transport).__name__}")


# -- one dead letter --------------------------------------------------------------------------
class BadId(ValueError):
    """Not a dead-letter id (``<topic>:<partition>:<offset>``)."""


def parse_id(text: str) -> tuple[str, int, int]:
    topic, sep1, rest = text.rpartition(":")
    topic, sep2, partition = topic.rpartition(":")
    if not (sep1 and sep2 and topic and partition.isdigit() and rest.isdigit()):
        raise BadId(f"{text[:300]!r} is not <dead-letter topic>:<partition>:<offset>")
    if len(partition) > 10 or int(partition) >= 2**31 or len(rest) > 19 or int(rest) >= 2**63:
        raise BadId(f"{text[:300]!r}: partition or offset out of range")
    return topic, int(partition), int(rest)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "backslashreplace")


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, read."""

    record: Record
    dlq: dict[str, str]
    """The ``winback-dlq-*`` headers, names without the prefix, values as text."""
    superseded_by: str | None = None

    @property
    def id(self) -> str:
        return f"{self.record.topic}:{self.record.partition}:{self.record.offset}"

    @property
    def error_code(self) -> str:
        return self.dlq.get("error-code", "")

    @property
    def source_topic(self) -> str:
        return self.dlq.get("source-topic", "")

    @property
    def consumer(self) -> str:
        return self.dlq.get("consumer", "")

    @property
    def dead_lettered_at(self) -> datetime | None:
        at = _time(self.dlq.get("dead-lettered-at"))
        if at is None and self.record.timestamp_ms is not None:
            at = datetime.fromtimestamp(self.record.timestamp_ms / 1000, UTC)
        return at

    @property
    def original_headers(self) -> tuple[tuple[str, bytes], ...]:
        """The headers the record came with (without ours)."""
        return tuple(
            (name, value)
            for name, value in self.record.headers
            if not name.startswith(DLQ_PREFIX) and name != REDRIVE_OF
        )

    @property
    def redrive_of(self) -> str | None:
        for name, value in self.record.headers:
            if name == REDRIVE_OF:
                return _text(value)
        return None

    @property
    def truncated(self) -> list[str]:
        """Which parts were stored cut down: ``key``, ``value``, ``headers``."""
        cut = [part for part in ("key", "value") if self.dlq.get(f"{part}-truncated") == "true"]
        if self.dlq.get("headers-truncated"):
            cut.append("headers")
        return cut

    @property
    def not_redrivable(self) -> str | None:
        """Why this dead letter cannot be sent back, or None."""
        cut = self.truncated
        if cut:
            parts = []
            for part in cut:
                size = self.dlq.get(f"{part}-size")
                if part == "headers":
                    parts.append(f"{self.dlq.get('headers-truncated')} headers cut")
                else:
                    parts.append(f"{part} of {size} bytes, first 4096 kept" if size else part)
            return "stored truncated (" + "; ".join(parts) + "): the original is not all here"
        if not self.source_topic:
            return "no winback-dlq-source-topic header: not a dead letter winback wrote"
        return None

    def redrive_record(self) -> OutgoingRecord:
        return OutgoingRecord(
            topic=self.source_topic,
            key=self.record.key,
            value=self.record.value,
            headers=(*self.original_headers, (REDRIVE_OF, self.id.encode())),
        )


def read_dead_letter(record: Record) -> DeadLetter:
    dlq = {
        name[len(DLQ_PREFIX) :]: _text(value)
        for name, value in record.headers
        if name.startswith(DLQ_PREFIX)
    }
    return DeadLetter(record, dlq)


# -- filters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters: each given set must contain the letter's value (empty = any);
    ``since`` ≤ dead-lettered < ``until``."""

    codes: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    consumers: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.codes and letter.error_code not in self.codes:
            return False
        if self.source_topics and letter.source_topic not in self.source_topics:
            return False
        if self.consumers and letter.consumer not in self.consumers:
            return False
        if self.ids and letter.id not in self.ids:
            return False
        if self.since is not None or self.until is not None:
            at = letter.dead_lettered_at
            if at is None:
                return False
            if self.since is not None and at < self.since:
                return False
            if self.until is not None and at >= self.until:
                return False
        return True


async def scan(
    reader: TopicReader, topic: str, filters: DeadLetterFilter = DeadLetterFilter()
) -> list[DeadLetter]:
    """The matching dead letters of ``topic``, newest first, each marked superseded when a
    redrive of it failed again (a later dead letter names it in ``winback-redrive-of``)."""
    letters = [read_dead_letter(r) for r in await reader.read(topic)]
    successors: dict[str, str] = {}
    for letter in sorted(letters, key=_position):
        of = letter.redrive_of
        if of is not None:
            successors[of] = letter.id
    found = [
        DeadLetter(letter.record, letter.dlq, successors.get(letter.id))
        for letter in letters
        if filters.matches(letter)
    ]
    return sorted(found, key=_position, reverse=True)


def _position(letter: DeadLetter) -> tuple[datetime, int, int]:
    at = letter.dead_lettered_at or datetime.min.replace(tzinfo=UTC)
    return (at, letter.record.offset, letter.record.partition)


async def show(reader: TopicReader, topic: str, letter_id: str) -> DeadLetter | None:
    """One dead letter by id; None if there is none (or the id is not of ``topic``)."""
    where, partition, offset = parse_id(letter_id)
    if where != topic:
        return None
    record = await reader.read_one(where, partition, offset)
    return read_dead_letter(record) if record is not None else None


# -- redrive ----------------------------------------------------------------------------------
RedriveStatus = Literal["redriven", "would_redrive", "not_redrivable", "superseded", "failed"]


@dataclass
class RedriveResult:
    id: str
    source_topic: str
    error_code: str
    status: RedriveStatus
    detail: str = ""


@dataclass
class RedriveReport:
    dry_run: bool
    results: list[RedriveResult] = field(default_factory=list)

    def count(self, status: RedriveStatus) -> int:
        return sum(1 for r in self.results if r.status == status)


Progress = Callable[[int, int], None]
"""Called with (records published so far, records to publish)."""


async def redrive(
    reader: TopicReader,
    publisher: Publisher | None,
    topic: str,
    filters: DeadLetterFilter,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RedriveReport:
    """Publish each matching dead letter's original record to its source topic (oldest first,
    so one key's records keep their order), except those stored truncated and those
    superseded by a newer dead letter of the same record. ``publisher`` must be started
    (``None`` is allowed for a dry run)."""
    letters = sorted(await scan(reader, topic, filters), key=_position)
    report = RedriveReport(dry_run)
    todo: list[tuple[DeadLetter, RedriveResult]] = []
    for letter in letters:
        result = RedriveResult(letter.id, letter.source_topic, letter.error_code, "would_redrive")
        why = letter.not_redrivable
        if why is not None:
            result.status, result.detail = "not_redrivable", why
        elif letter.superseded_by is not None:
            result.status = "superseded"
            result.detail = f"redriven before and dead-lettered again as {letter.superseded_by}"
        else:
            todo.append((letter, result))
        report.results.append(result)
    if dry_run or not todo:
        return report
    if publisher is None:
        raise ValueError("a redrive that is not a dry run needs a publisher")
    done = 0
    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), PUBLISH_CHUNK):
        chunk = todo[start : start + PUBLISH_CHUNK]
        outcomes = await publisher.publish_each([letter.redrive_record() for letter, _ in chunk])
        for (_, result), outcome in zip(chunk, outcomes, strict=True):
            if outcome.status == "published":
                result.status = "redriven"
            else:
                result.status, result.detail = "failed", outcome.reason[:500]
        done += len(chunk)
        if progress is not None:
            progress(done, len(todo))
    return report


# -- what the API and `--json` show -------------------------------------------------------------
class SourceModel(BaseModel):
    topic: str
    partition: int | None
    offset: int | None


class DeadLetterSummary(BaseModel):
    """One dead letter, without its bytes."""

    id: str = Field(description="<dead-letter topic>:<partition>:<offset>")
    dead_lettered_at: datetime | None
    error_code: str
    error_field: str | None
    error_reason: str
    source: SourceModel
    consumer: str
    truncated: list[str] = Field(description="parts stored cut down: key, value, headers")
    redrivable: bool
    not_redrivable_reason: str | None
    superseded_by: str | None = Field(
        description="a redrive of it failed again: the newer dead letter"
    )
    redrive_of: str | None = Field(description="it is itself a redrive of this dead letter")


class HeaderModel(BaseModel):
    name: str
    value: str | None = Field(description="as UTF-8 text; null when it is not")
    value_base64: str


class DeadLetterDetail(DeadLetterSummary):
    """One dead letter with the original record: headers, key and value."""

    headers: list[HeaderModel] = Field(description="the original headers (not winback-dlq-*)")
    dlq_headers: dict[str, str] = Field(description="the winback-dlq-* headers, prefix removed")
    key: str | None = Field(description="as UTF-8 text; null when there is none or not text")
    key_base64: str | None
    value: str | None = Field(description="as UTF-8 text; null when there is none or not text")
    value_base64: str | None
    value_bytes: int


class RedriveResultModel(BaseModel):
    id: str
    source_topic: str
    error_code: str
    status: RedriveStatus = Field(
        description="redriven; would_redrive (dry run); not_redrivable (stored truncated); "
        "superseded (a newer dead letter of the same record is sent instead); failed (the "
        "broker did not take it: detail)"
    )
    detail: str


class RedriveReportModel(BaseModel):
    dry_run: bool
    redriven: int
    would_redrive: int
    not_redrivable: int
    superseded: int
    failed: int
    results: list[RedriveResultModel]


def _int(value: str | None) -> int | None:
    return int(value) if value and value.lstrip("-").isdigit() else None


def summary(letter: DeadLetter) -> DeadLetterSummary:
    why = letter.not_redrivable
    return DeadLetterSummary(
        id=letter.id,
        dead_lettered_at=letter.dead_lettered_at,
        error_code=letter.error_code,
        error_field=letter.dlq.get("error-field") or None,
        error_reason=letter.dlq.get("error-reason", ""),
        source=SourceModel(
            topic=letter.source_topic,
            partition=_int(letter.dlq.get("source-partition")),
            offset=_int(letter.dlq.get("source-offset")),
        ),
        consumer=letter.consumer,
        truncated=letter.truncated,
        redrivable=why is None,
        not_redrivable_reason=why,
        superseded_by=letter.superseded_by,
        redrive_of=letter.redrive_of,
    )


def _as_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def detail(letter: DeadLetter) -> DeadLetterDetail:
    record = letter.record
    return DeadLetterDetail(
        **summary(letter).model_dump(),
        headers=[
            HeaderModel(name=name, value=_as_text(value), value_base64=_b64(value) or "")
            for name, value in letter.original_headers
        ],
        dlq_headers=letter.dlq,
        key=_as_text(record.key),
        key_base64=_b64(record.key),
        value=_as_text(record.value),
        value_base64=_b64(record.value),
        value_bytes=len(record.value or b""),
    )


def report_model(report: RedriveReport) -> RedriveReportModel:
    return RedriveReportModel(
        dry_run=report.dry_run,
        redriven=report.count("redriven"),
        would_redrive=report.count("would_redrive"),
        not_redrivable=report.count("not_redrivable"),
        superseded=report.count("superseded"),
        failed=report.count("failed"),
        results=[
            RedriveResultModel(
                id=r.id,
                source_topic=r.source_topic,
                error_code=r.error_code,
                status=r.status,
                detail=r.detail,
            )
            for r in report.results
        ],
    )


def filters_of(
    codes: Iterable[str] = (),
    source_topics: Iterable[str] = (),
    consumers: Iterable[str] = (),
    ids: Iterable[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> DeadLetterFilter:
    return DeadLetterFilter(
        frozenset(codes),
        frozenset(source_topics),
        frozenset(consumers),
        frozenset(ids),
        _utc(since),
        _utc(until),
    )


def _utc(when: datetime | None) -> datetime | None:
    if when is None:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


async def redrive_with(
    transport: Transport,
    topic: str,
    filters: DeadLetterFilter,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RedriveReport:
    """``redrive`` with a publisher of ``transport`` started for it and stopped after."""
    reader = reader_for(transport)
    if dry_run:
        return await redrive(reader, None, topic, filters, dry_run=True)
    publisher = transport.publisher()
    await publisher.start()
    try:
        return await redrive(reader, publisher, topic, filters, progress=progress)
    finally:
        await publisher.stop()
