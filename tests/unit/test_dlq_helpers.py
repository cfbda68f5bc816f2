"""The dead-letter helpers without a broker: ids, what makes a dead letter unredrivable or
superseded, the record a redrive publishes, the command's times and its progress output."""

from __future__ import annotations

import argparse
import io
from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import InvalidEvent
from shared.messaging import dlq
from shared.messaging.dlq_cli import _progress_to, when
from shared.messaging.memory import MemoryBus
from shared.messaging.pipeline import DeadLetter, dead_letter_record
from shared.messaging.transport import OutgoingRecord, Record

NOW = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
SOURCE = Record("billing", 1, 41, b"cus_1", b"{bad", (("content-type", b"application/json"),))


def stored(record: OutgoingRecord, offset: int) -> Record:
    return Record(record.topic, 0, offset, record.key, record.value, record.headers)


def letter_of(source: Record, offset: int = 0, max_bytes: int = 1024 * 1024) -> dlq.DeadLetter:
    error = InvalidEvent("malformed_json", "not JSON")
    copy = dead_letter_record("dlq", DeadLetter(source, error, "ingest"), NOW, max_bytes)
    return dlq.read_dead_letter(stored(copy, offset))


def test_ids_name_topic_partition_and_offset() -> None:
    assert dlq.parse_id("winback.dead-letter:2:17") == ("winback.dead-letter", 2, 17)
    assert dlq.parse_id("a:b:0:1") == ("a:b", 0, 1)
    for bad in ("dlq", "dlq:1", "dlq:x:1", ":1:2", "dlq:1:-2", "dlq:99999999999:0"):
        with pytest.raises(dlq.BadId):
            dlq.parse_id(bad)


def test_a_whole_copy_redrives_the_original_record() -> None:
    letter = letter_of(SOURCE)
    assert (letter.id, letter.error_code, letter.source_topic) == (
        "dlq:0:0",
        "malformed_json",
        "billing",
    )
    assert letter.dead_lettered_at == NOW
    assert letter.not_redrivable is None
    again = letter.redrive_record()
    assert (again.topic, again.key, again.value) == ("billing", b"cus_1", b"{bad")
    assert again.headers == (("content-type", b"application/json"), (dlq.REDRIVE_OF, b"dlq:0:0"))


def test_a_truncated_copy_cannot_be_redriven() -> None:
    big = Record("billing", 0, 1, b"k", b"x" * 200_000, ())
    letter = letter_of(big, max_bytes=128 * 1024)
    assert letter.truncated == ["value"]
    assert letter.not_redrivable == (
        "stored truncated (value of 200000 bytes, first 4096 kept): the original is not all here"
    )


async def test_a_dead_letter_whose_redrive_failed_again_is_superseded() -> None:
    bus = MemoryBus()
    await bus.ensure_topics(["dlq"], 1)
    publisher = bus.publisher()
    await publisher.start()
    first = letter_of(SOURCE)
    again = first.redrive_record()
    redriven = Record("billing", 1, 42, again.key, again.value, again.headers)
    second_copy = dead_letter_record(
        "dlq", DeadLetter(redriven, InvalidEvent("malformed_json", "not JSON"), "ingest"), NOW
    )
    first_copy = OutgoingRecord("dlq", first.record.key, first.record.value, first.record.headers)
    await publisher.publish([first_copy, second_copy])
    reader = dlq.reader_for(bus)
    newest, oldest = await dlq.scan(reader, "dlq")
    assert (oldest.id, oldest.superseded_by) == ("dlq:0:0", "dlq:0:1")
    assert (newest.redrive_of, newest.superseded_by) == ("dlq:0:0", None)
    report = await dlq.redrive(reader, None, "dlq", dlq.DeadLetterFilter(), dry_run=True)
    assert [(r.id, r.status) for r in report.results] == [
        ("dlq:0:0", "superseded"),
        ("dlq:0:1", "would_redrive"),
    ]
    assert await dlq.show(reader, "dlq", "dlq:0:1") is not None
    assert await dlq.show(reader, "dlq", "dlq:0:2") is None
    assert await dlq.show(reader, "other", "other:0:0") is None
    await publisher.stop()
    bus.close()


def test_filters_match_codes_topics_consumers_and_time() -> None:
    letter = letter_of(SOURCE)
    assert dlq.filters_of().matches(letter)
    assert dlq.filters_of(codes=["malformed_json", "x"], source_topics=["billing"]).matches(letter)
    assert not dlq.filters_of(codes=["unknown_type"]).matches(letter)
    assert not dlq.filters_of(consumers=["scheduler"]).matches(letter)
    assert dlq.filters_of(since=NOW, until=NOW + timedelta(seconds=1)).matches(letter)
    assert not dlq.filters_of(until=NOW).matches(letter)
    assert dlq.filters_of(since=datetime(2026, 11, 30, 3, 0)).matches(letter)  # naive = UTC


def test_times_are_iso_or_ago() -> None:
    assert when("2026-11-30T10:00:00Z") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert when("2026-11-30") == datetime(2026, 11, 30, tzinfo=UTC)
    ago = datetime.now(UTC) - when("6h")
    assert abs(ago - timedelta(hours=6)) < timedelta(minutes=1)
    with pytest.raises(argparse.ArgumentTypeError):
        when("yesterday")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_counts_otherwise() -> None:
    tty = Terminal()
    show = _progress_to(tty)
    show(0, 4)
    show(2, 4)
    show(4, 4)
    assert tty.getvalue() == (
        "\rredriving [" + "." * 30 + "] 0/4"
        "\rredriving [" + "#" * 15 + "." * 15 + "] 2/4"
        "\rredriving [" + "#" * 30 + "] 4/4\n"
    )
    pipe = io.StringIO()
    _progress_to(pipe)(4, 4)
    assert pipe.getvalue() == "redriving: 4/4 published\n"
