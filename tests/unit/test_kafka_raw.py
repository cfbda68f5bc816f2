"""Reading a record batch aiokafka cannot parse (a header name that is not UTF-8): the batches
are built by aiokafka's own builder, then a header name is patched to invalid UTF-8 — the
bytes a hostile producer can put on a topic. The real broker round trip is in
tests/integration/test_ingest_hostile_corpus.py."""

from __future__ import annotations

import struct

import pytest
from aiokafka.codec import gzip_encode
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from shared.messaging.kafka_raw import aiokafka_reads, parse_batch, split_batches, unreadable_batch

PLACEHOLDER = "@@name@@"
BAD_NAME = b"\xff\xfe@nam\xc3\x28"

Rec = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def build(
    records: list[Rec], base_offset: int = 0, transactional: bool = False, producer_id: int = -1
) -> bytearray:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=int(transactional),
        producer_id=producer_id,
        producer_epoch=0 if transactional else -1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, (key, value, headers) in enumerate(records):
        builder.append(
            offset=i, timestamp=1_700_000_000_000 + i, key=key, value=value, headers=headers
        )
    batch = bytearray(builder.build())
    struct.pack_into(">q", batch, 0, base_offset)
    return batch


def seal(batch: bytearray) -> bytes:
    struct.pack_into(">I", batch, 17, calc_crc32c(bytes(batch[21:])))
    return bytes(batch)


def poisoned(batch: bytearray) -> bytes:
    """Every placeholder header name replaced by bytes that are not UTF-8."""
    batch[:] = batch.replace(PLACEHOLDER.encode(), BAD_NAME)
    return seal(batch)


def gzipped(batch: bytes) -> bytes:
    """The same batch with its records gzip-compressed (attributes codec 1)."""
    head, body = bytearray(batch[:61]), gzip_encode(batch[61:])
    attributes = struct.unpack_from(">h", head, 21)[0] | 1
    struct.pack_into(">h", head, 21, attributes)
    struct.pack_into(">i", head, 8, len(head) + len(body) - 12)
    return seal(head + body)


THREE: list[Rec] = [
    (b"k0", b"before", [("content-type", b"application/json")]),
    (b"k1", b"poison", [("content-type", b"x"), (PLACEHOLDER, b"v")]),
    (None, None, [("after", b"")]),
]


def test_aiokafka_itself_cannot_read_such_a_batch() -> None:
    raw = poisoned(build(THREE))
    with pytest.raises(UnicodeDecodeError):
        list(DefaultRecordBatch(raw))
    batch = next(split_batches(raw))
    assert not aiokafka_reads(batch)


@pytest.mark.parametrize("compress", [False, True])
def test_every_record_of_the_batch_is_read_with_header_names_as_bytes(compress: bool) -> None:
    raw = poisoned(build(THREE, base_offset=40))
    if compress:
        raw = gzipped(raw)
    records = parse_batch(next(split_batches(raw)))
    assert [r.offset for r in records] == [40, 41, 42]
    assert [(r.key, r.value) for r in records] == [
        (b"k0", b"before"),
        (b"k1", b"poison"),
        (None, None),
    ]
    assert records[1].headers == ((b"content-type", b"x"), (BAD_NAME, b"v"))
    assert records[2].headers == ((b"after", b""),)
    assert records[0].timestamp_ms == 1_700_000_000_000
    assert not any(r.corrupt for r in records)


def test_the_records_from_the_offset_to_the_end_of_the_unreadable_batch() -> None:
    clean = seal(build([(b"a", b"1", []), (b"b", b"2", [])], base_offset=10))
    bad = poisoned(build(THREE, base_offset=12))
    later = seal(build([(b"z", b"9", [])], base_offset=15))
    found = unreadable_batch(clean + bad + later, [], 11)
    assert found is not None
    records, after = found
    assert [r.offset for r in records] == [11, 12, 13, 14]  # the clean batch's rest too
    assert after == 15
    assert unreadable_batch(clean + later, [], 10) is None


def test_a_batch_past_the_offset_or_partial_is_left_alone() -> None:
    bad = poisoned(build(THREE, base_offset=0))
    assert unreadable_batch(bad, [], 3) is None  # already past it
    assert unreadable_batch(bad[:-5], [], 0) is None  # a fetch cut it: not whole


def test_an_aborted_transaction_is_skipped_as_a_read_committed_consumer_does() -> None:
    bad = poisoned(build(THREE, transactional=True, producer_id=7))
    assert unreadable_batch(bad, [{"producer_id": 7, "first_offset": 0}], 0) is None
    assert unreadable_batch(bad, [], 0) is not None


def test_bytes_that_cannot_be_parsed_even_leniently_become_corrupt_offsets() -> None:
    raw = bytearray(poisoned(build(THREE, base_offset=5)))
    raw[61:] = b"\xff" * (len(raw) - 61)  # the records' bytes destroyed
    records = parse_batch(next(split_batches(seal(raw))))
    assert [(r.offset, r.corrupt) for r in records] == [(5, True), (6, True), (7, True)]
