"""Reading a partition's records where aiokafka cannot: a record batch it fails to parse.

Kafka's protocol lets a producer write a header name that is not UTF-8; aiokafka decodes
every header name as UTF-8 while it parses a batch, so one such record makes every fetch of
its partition raise ``UnicodeDecodeError`` — for the records before it in the batch as much
as for the ones after it, on every retry, in every consumer of the group. ``read_around``
fetches the partition's raw bytes itself (one ``FetchRequest`` on a short-lived client),
finds the first batch aiokafka cannot parse, and parses that batch here, leniently (record
batch format v2: https://kafka.apache.org/documentation/#recordbatch): every record with its
key, value and headers, header names as bytes. The caller hands the records on and moves the
partition's position past the batch.

Only the Kafka transport (``shared.messaging.kafka``) uses this.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition as KafkaTP

_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")  # base offset … record count: 61 bytes
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    1: gzip_decode,
    2: snappy_decode,
    3: lz4_decode,
    4: zstd_decode,
}
_TRANSACTIONAL = 0x10
_CONTROL = 0x20
_LOG_APPEND_TIME = 0x08


@dataclass(frozen=True)
class RawRecord:
    """One record as the bytes say; ``corrupt`` when even the lenient parse failed (then only
    the offset is known)."""

    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...]
    corrupt: bool = False


@dataclass(frozen=True)
class _Batch:
    base_offset: int
    last_offset: int
    attributes: int
    producer_id: int
    max_timestamp: int
    base_timestamp: int
    record_count: int
    magic: int
    raw: bytes

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & _CONTROL)

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & _TRANSACTIONAL)


def split_batches(message_set: bytes) -> Iterator[_Batch]:
    """The whole v2 batches in a fetched message set (a trailing partial one is left out)."""
    pos = 0
    while pos + _BATCH_HEADER.size <= len(message_set):
        (
            base_offset,
            length,
            _epoch,
            magic,
            _crc,
            attributes,
            last_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            _producer_epoch,
            _base_sequence,
            count,
        ) = _BATCH_HEADER.unpack_from(message_set, pos)
        end = pos + 12 + length
        if end > len(message_set):
            return
        yield _Batch(
            base_offset,
            base_offset + last_delta,
            attributes,
            producer_id,
            max_timestamp,
            base_timestamp,
            count,
            magic,
            message_set[pos:end],
        )
        pos = end


def aiokafka_reads(batch: _Batch) -> bool:
    """Whether aiokafka parses every record of the batch."""
    if batch.magic != 2:
        return True  # message format v0/v1 has no headers: nothing of this kind to fail
    try:
        for _ in DefaultRecordBatch(batch.raw):
            pass
    except Exception:
        return False
    return True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(buf, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise ValueError("field runs past the record")
    return buf[pos : pos + length], pos + length


def parse_batch(batch: _Batch) -> list[RawRecord]:
    """Every record of a v2 batch, header names as bytes; from the first record that cannot
    be parsed even so, the batch's remaining offsets as ``corrupt`` records."""
    out: list[RawRecord] = []
    try:
        body = batch.raw[_BATCH_HEADER.size :]
        codec = batch.attributes & 0x07
        if codec:
            body = _DECOMPRESS[codec](body)
        pos = 0
        for _ in range(batch.record_count):
            length, pos = _varint(body, pos)
            end = pos + length
            if length < 0 or end > len(body):
                raise ValueError("record runs past the batch")
            pos += 1  # attributes (unused)
            ts_delta, pos = _varint(body, pos)
            offset_delta, pos = _varint(body, pos)
            key, pos = _bytes(body, pos)
            value, pos = _bytes(body, pos)
            count, pos = _varint(body, pos)
            headers: list[tuple[bytes, bytes | None]] = []
            for _ in range(count):
                name, pos = _bytes(body, pos)
                header_value, pos = _bytes(body, pos)
                headers.append((name or b"", header_value))
            if pos != end:
                raise ValueError("record length does not match its fields")
            timestamp = (
                batch.max_timestamp
                if batch.attributes & _LOG_APPEND_TIME
                else batch.base_timestamp + ts_delta
            )
            out.append(
                RawRecord(batch.base_offset + offset_delta, timestamp, key, value, tuple(headers))
            )
    except (ValueError, IndexError, KeyError, struct.error, OSError, RuntimeError):
        first = out[-1].offset + 1 if out else batch.base_offset
        out += [
            RawRecord(o, None, None, None, (), corrupt=True)
            for o in range(first, batch.next_offset)
        ]
    return out


def _aborted_skipper(aborted: list[dict[str, Any]]) -> Callable[[_Batch], bool]:
    """What read_committed skips, as aiokafka's fetcher does: batches of aborted
    transactions, and control batches."""
    pending = sorted((a["first_offset"], a["producer_id"]) for a in aborted)
    producers: set[int] = set()

    def skip(batch: _Batch) -> bool:
        while pending and pending[0][0] <= batch.base_offset:
            producers.add(pending.pop(0)[1])
        if batch.is_control:
            if batch.is_transactional and _is_abort_marker(batch):
                producers.discard(batch.producer_id)
            return True
        return batch.is_transactional and batch.producer_id in producers

    return skip


def _is_abort_marker(batch: _Batch) -> bool:
    records = parse_batch(batch)
    key = records[0].key if records and not records[0].corrupt else None
    return key is not None and len(key) >= 4 and struct.unpack_from(">h", key, 2)[0] == 0


def unreadable_batch(
    message_set: bytes, aborted: list[dict[str, Any]], offset: int
) -> tuple[list[RawRecord], int] | None:
    """In a fetched message set: every record from ``offset`` to the end of the first batch
    aiokafka cannot parse (the batches before it too: the caller moves past them all), and
    the offset after that batch — or None if aiokafka reads them all."""
    skip = _aborted_skipper(aborted)
    records: list[RawRecord] = []
    for batch in split_batches(message_set):
        if batch.next_offset <= offset or skip(batch):
            continue
        records += [r for r in parse_batch(batch) if r.offset >= offset]
        if not aiokafka_reads(batch):
            return records, batch.next_offset
    return None


async def read_around(
    bootstrap: str,
    client_id: str,
    topic: str,
    partition: int,
    offset: int,
    read_committed: bool = True,
    max_bytes: int = 2 * 1024 * 1024,
) -> tuple[list[RawRecord], int] | None:
    """Fetch ``topic``/``partition`` from ``offset`` and return ``unreadable_batch`` of it."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=f"{client_id}-raw")
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(KafkaTP(topic, partition))
        if leader is None or leader < 0:
            return None
        request = FetchRequest(
            max_wait_time=0,
            min_bytes=1,
            max_bytes=max_bytes,
            isolation_level=1 if read_committed else 0,
            topics=[(topic, [(partition, offset, max_bytes)])],
        )
        response = (await client.send(leader, request)).to_object()
    finally:
        await client.close()
    for entry in response["topics"]:
        for part in entry["partitions"]:
            if part["partition"] == partition and not part["error_code"]:
                return unreadable_batch(
                    part["message_set"] or b"", part.get("aborted_transactions") or [], offset
                )
    return None
