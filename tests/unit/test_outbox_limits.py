"""What the broker takes, checked before a record reaches it: the size as Kafka counts it, the
cut-down dead-letter copy of a record near the limit, and the in-process bus refusing what a
broker would refuse, record by record."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given
from hypothesis import strategies as st

from shared.clock import FrozenClock
from shared.errors import InvalidEvent
from shared.messaging.memory import MemoryBus, UnknownTopic
from shared.messaging.pipeline import (
    DLQ_EXCERPT_BYTES,
    DLQ_MAX_HEADER_VALUE_BYTES,
    DLQ_MAX_ORIGINAL_HEADERS_BYTES,
    DeadLetter,
    dead_letter_record,
)
from shared.messaging.transport import (
    DEFAULT_MAX_RECORD_BYTES,
    PUBLISHED,
    OutgoingRecord,
    PublishFailed,
    Record,
    record_problem,
    serialized_size,
)

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
LIMIT = DEFAULT_MAX_RECORD_BYTES

blobs = st.one_of(st.none(), st.binary(max_size=300))
headers = st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=200)), max_size=6)


# -- the size, as Kafka counts it ------------------------------------------------------------------
@given(key=blobs, value=blobs, hs=headers)
def test_the_size_is_the_producers_own_estimate(
    key: bytes | None, value: bytes | None, hs: list[tuple[str, bytes]]
) -> None:
    record = OutgoingRecord("t", key, value, tuple(hs))
    expected = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(hs))
    assert serialized_size(record) == expected


@pytest.mark.parametrize("length", [0, 63, 64, 8191, 8192, 1_048_000])
def test_the_size_bounds_the_batch_the_producer_builds(length: int) -> None:
    """Across varint boundaries: the batch holding the record alone is never larger."""
    record = OutgoingRecord("t", b"cus_1", b"v" * length, (("content-type", b"x" * 30),))
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2**31 - 1,
    )
    builder.append(
        0, timestamp=None, key=record.key, value=record.value, headers=list(record.headers)
    )
    built = len(builder.build())
    assert built <= serialized_size(record) <= built + 20


def test_a_record_at_the_limit_passes_and_one_byte_more_is_refused() -> None:
    base = OutgoingRecord("winback.dead-letter", b"k", b"")
    # the empty value's length took 1 byte; a value this long takes 3
    pad = LIMIT - serialized_size(base) - 2
    at_limit = OutgoingRecord(base.topic, b"k", b"x" * pad)
    assert serialized_size(at_limit) == LIMIT
    assert record_problem(at_limit, LIMIT) is None
    over = OutgoingRecord(base.topic, b"k", b"x" * (pad + 1))
    problem = record_problem(over, LIMIT)
    assert problem is not None
    assert (problem.status, problem.code) == ("refused", "record_too_large")
    assert f"{LIMIT + 1} bytes" in problem.detail


@pytest.mark.parametrize(
    ("topic", "valid"),
    [
        ("winback.customer-events", True),
        ("a_b-C.9", True),
        ("x" * 249, True),
        ("x" * 250, False),
        ("", False),
        (".", False),
        ("..", False),
        ("bad topic", False),
        ("bad/topic", False),
        ("tópico", False),
    ],
)
def test_topic_names_kafka_does_not_allow_are_refused(topic: str, valid: bool) -> None:
    problem = record_problem(OutgoingRecord(topic, b"k", b"v"), LIMIT)
    if valid:
        assert problem is None
    else:
        assert problem is not None
        assert (problem.status, problem.code) == ("refused", "invalid_topic")


def test_a_header_name_that_is_not_utf8_is_refused() -> None:
    problem = record_problem(OutgoingRecord("t", b"k", b"v", (("\udcff", b"v"),)), LIMIT)
    assert problem is not None
    assert problem.code == "invalid_record"


# -- the dead-letter copy --------------------------------------------------------------------------
def letter(
    value: bytes | None,
    hs: tuple[tuple[str, bytes], ...] = (("content-type", b"application/cloudevents+json"),),
    key: bytes | None = b"cus_big",
) -> DeadLetter:
    record = Record("billing.lifecycle", 2, 41, key, value, hs)
    return DeadLetter(record, InvalidEvent("oversize", "1048000 bytes is over the limit"), "ingest")


def header(record: OutgoingRecord, name: str) -> bytes | None:
    found = [v for n, v in record.headers if n == name]
    assert len(found) <= 1, name
    return found[0] if found else None


def test_a_dead_letter_that_fits_is_the_original_bytes_and_headers_plus_the_reason() -> None:
    original = letter(b'{"not": "json"', key=b"k")
    copy = dead_letter_record("dlq", original, NOW)
    assert (copy.topic, copy.key, copy.value) == ("dlq", b"k", b'{"not": "json"')
    assert copy.headers[0] == ("content-type", b"application/cloudevents+json")
    assert header(copy, "winback-dlq-error-code") == b"oversize"
    assert header(copy, "winback-dlq-source-offset") == b"41"
    assert header(copy, "winback-dlq-value-truncated") is None


def test_a_dead_letter_near_the_broker_limit_is_cut_down_with_hash_size_and_excerpt() -> None:
    """The original fits (the broker took it); with the reason headers it would not."""
    base = letter(b"")
    pad = LIMIT - serialized_size(OutgoingRecord("x", b"cus_big", b"", base.record.headers)) - 50
    value = bytes(range(256)) * (pad // 256) + b"z" * (pad % 256)
    original = letter(value)
    assert serialized_size(OutgoingRecord("x", b"cus_big", value, original.record.headers)) < LIMIT
    whole = OutgoingRecord(
        "dlq",
        b"cus_big",
        value,
        original.record.headers + (("winback-dlq-error-code", b"oversize"),) * 8,
    )
    assert record_problem(whole, LIMIT) is not None  # what used to block the relay

    copy = dead_letter_record("dlq", original, NOW, LIMIT)
    assert record_problem(copy, LIMIT) is None
    assert copy.key == b"cus_big"
    assert copy.value == value[:DLQ_EXCERPT_BYTES]
    assert header(copy, "winback-dlq-value-truncated") == b"true"
    assert header(copy, "winback-dlq-value-sha256") == hashlib.sha256(value).hexdigest().encode()
    assert header(copy, "winback-dlq-value-size") == str(len(value)).encode()
    assert header(copy, "content-type") == b"application/cloudevents+json"  # original kept
    assert header(copy, "winback-dlq-error-code") == b"oversize"
    assert header(copy, "winback-dlq-error-reason") == b"1048000 bytes is over the limit"
    assert header(copy, "winback-dlq-source-topic") == b"billing.lifecycle"
    assert header(copy, "winback-dlq-source-partition") == b"2"
    assert header(copy, "winback-dlq-source-offset") == b"41"
    assert header(copy, "winback-dlq-consumer") == b"ingest"
    assert header(copy, "winback-dlq-key-truncated") is None
    assert header(copy, "winback-dlq-headers-truncated") is None


def test_absurd_headers_and_key_are_cut_and_the_copy_fits_even_the_smallest_limit() -> None:
    smallest = 128 * 1024  # kafka.max_record_bytes may not be set lower
    absurd = tuple((f"h{i}-" + "n" * 1000, b"v" * 10_000) for i in range(100))
    key = b"k" * 50_000
    original = letter(b"x" * 900_000, hs=(("content-type", b"json"), *absurd), key=key)
    copy = dead_letter_record("dlq", original, NOW, smallest)
    assert record_problem(copy, smallest) is None
    assert copy.key == key[:DLQ_EXCERPT_BYTES]
    assert header(copy, "winback-dlq-key-truncated") == b"true"
    assert header(copy, "winback-dlq-key-sha256") == hashlib.sha256(key).hexdigest().encode()
    assert header(copy, "winback-dlq-key-size") == b"50000"
    assert header(copy, "winback-dlq-value-size") == b"900000"
    kept = [(n, v) for n, v in copy.headers if not n.startswith("winback-dlq-")]
    assert kept[0] == ("content-type", b"json")
    assert all(len(v) <= DLQ_MAX_HEADER_VALUE_BYTES and len(n) <= 256 for n, v in kept)
    assert sum(len(n) + len(v) for n, v in kept) <= DLQ_MAX_ORIGINAL_HEADERS_BYTES
    # every original header was cut, and the ones past the budget dropped: all counted
    assert header(copy, "winback-dlq-headers-truncated") == b"100"
    assert header(copy, "winback-dlq-error-code") == b"oversize"


def test_a_header_name_that_is_not_utf8_is_escaped_in_the_dead_letter_copy() -> None:
    original = letter(b"v", hs=(("bad\udcffname", b"1"),))
    copy = dead_letter_record("dlq", original, NOW)
    assert record_problem(copy, LIMIT) is None
    assert copy.headers[0] == ("bad\\udcffname", b"1")
    assert copy.value == b"v"


# -- the in-process bus refuses what a broker would ------------------------------------------------
@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    memory = MemoryBus(clock=FrozenClock(), max_record_bytes=128 * 1024)
    await memory.ensure_topics(["t", "u"], 1)
    yield memory
    memory.close()


async def test_publish_each_reports_each_record_and_holds_a_topic_back_after_a_failure(
    bus: MemoryBus,
) -> None:
    publisher = bus.publisher()
    await publisher.start()
    records = [
        OutgoingRecord("t", b"k", b"1"),
        OutgoingRecord("t", b"k", b"x" * (128 * 1024)),  # over the bus's limit
        OutgoingRecord("bad topic", b"k", b"2"),
        OutgoingRecord("nowhere", b"k", b"3"),  # does not exist (yet)
        OutgoingRecord("t", b"k", b"4"),
        OutgoingRecord("nowhere", b"k", b"5"),  # held: an earlier record of its topic failed
        OutgoingRecord("u", b"k", b"6"),
    ]
    outcomes = await publisher.publish_each(records)
    await publisher.stop()
    assert [(o.status, o.code) for o in outcomes] == [
        ("published", ""),
        ("refused", "record_too_large"),
        ("refused", "invalid_topic"),
        ("failed", "unknown_topic"),
        ("published", ""),
        ("failed", "held"),
        ("published", ""),
    ]
    assert outcomes[0] is PUBLISHED
    assert [r.value for r in bus._log(("t", 0))] == [b"1", b"4"]
    assert [r.value for r in bus._log(("u", 0))] == [b"6"]


async def test_publish_is_still_all_or_none(bus: MemoryBus) -> None:
    publisher = bus.publisher()
    await publisher.start()
    with pytest.raises(PublishFailed, match="record_too_large") as failed:
        await publisher.publish(
            [OutgoingRecord("t", b"k", b"1"), OutgoingRecord("t", b"k", b"x" * 200_000)]
        )
    assert failed.value.outcome.code == "record_too_large"
    with pytest.raises(UnknownTopic):
        await publisher.publish([OutgoingRecord("t", b"k", b"1"), OutgoingRecord("no", b"k", b"")])
    await publisher.stop()
    assert bus._log(("t", 0)) == []
