"""A hostile-record corpus for ingest: records a hostile or broken producer could put on an
inbound topic, each with the dead-letter error code (and field) it must get — plus valid
cancellations to interleave with them.

Deterministic: the same arguments give the same bytes (random content comes from a seeded
``random.Random``; times are fixed, never "now"). Every record is new to the inbox (ids are
unique per corpus entry), so a good one is handled once and a bad one is dead-lettered once.

- ``hostile_records(...)``: one ``HostileRecord`` per case — random bytes, truncated JSON,
  wrong JSON kinds, wrong types for each CloudEvents attribute and for each payload field of
  every inbound type, bad binary-mode headers, non-UTF-8 header values and names (names as
  ``bytes``), NUL and other control characters in attributes and payload strings, deep
  nesting, out-of-range times (year 0001 at +01:00, 9999-12-31T23:59:59-01:00, …), a
  ``customer_since`` in year 0001, ``mrr_minor`` over a PostgreSQL bigint, a 100 KB
  ``source``, values over ingest's ``max_event_bytes`` and one near the broker's limit
  (``oversize_bytes``, ~1 MB; ``None`` leaves it out).
- ``valid_cancellations(n, ...)``: N structured ``subscription.cancelled`` events, one
  customer each.
- ``produce_records(...)``: produce either kind to a real broker and get each record's
  (partition, offset). A record whose header names are ``bytes`` (not UTF-8, as Kafka's
  protocol allows on the wire but aiokafka's producer cannot send) goes out in a record batch
  built here, alone in its batch.

A record's ``key`` is arbitrary bytes (some are not UTF-8): ingest never reads record keys.
``field`` is what ``winback-dlq-error-field`` must say (``None``: empty). Codes the corpus
expects: see ``CODES``.
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

STRUCTURED = (("content-type", b"application/cloudevents+json"),)
JSON = ("content-type", b"application/json")
DEFAULT_OVERSIZE_BYTES = 1_048_400
"""The record value of the near-limit case: the record (value, key, one header, framing) fits
a stock broker's ``message.max.bytes`` (1,048,588), while its dead-letter copy, the same bytes
plus the ``winback-dlq-*`` headers, is a few hundred bytes over the producer's 1 MiB
``max_request_size`` — the record that once blocked the outbox relay (issue 9)."""
CORPUS_TIME = "2026-01-15T10:00:00Z"
"""The time of every corpus event that is not about time: in range, in the past."""

Header = tuple[str | bytes, bytes]


class HostileRecord(NamedTuple):
    name: str
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    code: str
    """The ``winback-dlq-error-code`` it must be dead-lettered with."""
    field: str | None
    """The ``winback-dlq-error-field`` (``None``: none, the header is empty)."""

    @property
    def raw_header_names(self) -> bool:
        """Whether a header name is ``bytes``: aiokafka's producer cannot send it."""
        return any(isinstance(name, bytes) for name, _ in self.headers)


class ValidRecord(NamedTuple):
    name: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    customer_id: str
    event_id: str


def _event(name: str, event_type: str, data: Any, prefix: str, **attrs: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"hostile-{name}",
        "source": "/corpus/hostile",
        "type": f"{prefix}.{event_type}",
        "time": CORPUS_TIME,
        "datacontenttype": "application/json",
        "data": data,
    }
    event.update(attrs)  # attributes given replace the defaults, whatever their type
    return event


def _cancel_data(customer: str = "hostile-customer", **fields: Any) -> dict[str, Any]:
    return {"customer_id": customer, "reason": "too_expensive", **fields}


def _nested(depth: int) -> bytes:
    """A JSON array nested ``depth`` levels."""
    return b"[" * depth + b"]" * depth


def hostile_records(
    *,
    seed: int = 9,
    prefix: str = "com.example",
    max_event_bytes: int = 256 * 1024,
    oversize_bytes: int | None = DEFAULT_OVERSIZE_BYTES,
) -> list[HostileRecord]:
    """Every hostile case, in a fixed order. ``max_event_bytes`` is ingest's setting (for the
    records just over it); ``oversize_bytes`` the size of the near-broker-limit one."""
    rng = random.Random(seed)
    out: list[HostileRecord] = []

    def key() -> bytes:
        # every third key is not UTF-8
        n = len(out)
        if n % 3 == 2:
            return b"\xff\xfe" + rng.randbytes(6)
        return f"hostile-{n}".encode()

    def add(
        name: str,
        value: bytes | None,
        headers: Sequence[Header],
        code: str,
        field: str | None = None,
    ) -> None:
        out.append(HostileRecord(name, key(), value, tuple(headers), code, field))

    def structured(name: str, event: dict[str, Any], code: str, field: str | None = None) -> None:
        add(name, orjson.dumps(event), STRUCTURED, code, field)

    def binary(
        name: str,
        event: dict[str, Any],
        code: str,
        field: str | None = None,
        extra: Sequence[Header] = (),
        content_type: bytes = b"application/json",
        value: bytes | None = None,
    ) -> None:
        headers: list[Header] = [
            (f"ce_{k}", str(v).encode())
            for k, v in event.items()
            if k not in ("data", "datacontenttype")
        ]
        headers.append(("content-type", content_type))
        headers.extend(extra)
        add(name, value if value is not None else orjson.dumps(event["data"]), headers, code, field)

    def ev(
        name: str, event_type: str = "subscription.cancelled", data: Any = None, **attrs: Any
    ) -> dict[str, Any]:
        """A corpus event; ``attrs`` replace attributes (``type=...`` the whole type)."""
        return _event(name, event_type, _cancel_data() if data is None else data, prefix, **attrs)

    # -- bytes that are no event at all ---------------------------------------------------
    for i, size in enumerate((1, 64, 4096)):
        noise = b"\xff" + rng.randbytes(size - 1)
        add(f"random_bytes_{size}_no_headers", noise, (), "missing_attribute", "specversion")
        add(f"random_bytes_{size}_structured", noise, STRUCTURED, "malformed_json")
        if i == 1:
            add("random_bytes_binary", noise, binary_headers(prefix), "malformed_json")
    add("brace_then_noise_no_headers", b"{" + rng.randbytes(31), (), "malformed_json")
    whole = orjson.dumps(ev("truncated"))
    add("truncated_json_structured", whole[: len(whole) // 2], STRUCTURED, "malformed_json")
    add("truncated_json_binary", b'{"customer_id": "c', binary_headers(prefix), "malformed_json")
    add("empty_value_structured", b"", STRUCTURED, "malformed_json")
    add("tombstone_structured", None, STRUCTURED, "malformed_json")
    add("tombstone_no_headers", None, (), "missing_attribute", "specversion")
    add("json_array", orjson.dumps([ev("array")]), STRUCTURED, "malformed_json")
    add("json_string", b'"an event"', STRUCTURED, "malformed_json")
    add("json_null", b"null", STRUCTURED, "malformed_json")
    add("json_number_over_double", b'{"id": 1e400}', STRUCTURED, "malformed_json")
    add("invalid_utf8_in_json", b'{"id": "\xc3\x28"}', STRUCTURED, "malformed_json")
    add("lone_surrogate_escape", b'{"id": "\\ud800"}', STRUCTURED, "malformed_json")
    add("utf8_bom", b"\xef\xbb\xbf" + orjson.dumps(ev("bom")), STRUCTURED, "malformed_json")

    # -- attributes: missing, wrong type, bad value -----------------------------------------
    for attr in ("id", "source", "specversion", "type"):
        event = ev(f"missing_{attr}")
        del event[attr]
        structured(f"missing_{attr}", event, "missing_attribute", attr)
    wrong_attributes: tuple[tuple[str, Any], ...] = (
        ("id", 5),
        ("source", []),
        ("specversion", 1.0),
        ("type", {}),
        ("time", 12345),
        ("subject", 1),
        ("datacontenttype", True),
        ("dataschema", 3),
        ("correlationid", {"nested": True}),
    )
    for attr, wrong in wrong_attributes:
        structured(
            f"wrong_type_{attr}",
            ev(f"wrong_type_{attr}", **{attr: wrong}),
            "invalid_attribute",
            attr,
        )
    structured(
        "specversion_0_3",
        ev("specversion_0_3", specversion="0.3"),
        "invalid_attribute",
        "specversion",
    )
    structured(
        "extension_name_bad", ev("ext_bad", **{"Bad-Ext": "x"}), "invalid_attribute", "Bad-Ext"
    )
    structured(
        "extension_name_too_long", ev("ext_long", **{"a" * 21: "x"}), "invalid_attribute", "a" * 21
    )
    structured(
        "extension_name_newline",
        ev("ext_nl", **{"abc\n": "x"}),
        "invalid_attribute",
        repr("abc\n"),
    )
    many = {f"x{i}": "v" for i in range(33)}
    structured("too_many_extensions", ev("ext_many", **many), "invalid_attribute", "x32")
    structured(
        "data_base64", ev("b64", data=None, data_base64="AAAA"), "invalid_attribute", "data_base64"
    )

    # -- NUL and other control characters -----------------------------------------------------
    structured("nul_in_id", ev("nul", id="evt\u0000x"), "invalid_attribute", "id")
    structured(
        "nul_in_source", ev("nul_src", source="/billing\u0000"), "invalid_attribute", "source"
    )
    structured(
        "nul_in_type",
        ev("nul_type", type=f"{prefix}.subscription.cancelled\u0000"),
        "invalid_attribute",
        "type",
    )
    structured(
        "c1_in_subject", ev("c1_subject", subject="cus\u0085"), "invalid_attribute", "subject"
    )
    structured(
        "newline_in_extension",
        ev("nl_ext", correlationid="a\nb"),
        "invalid_attribute",
        "correlationid",
    )
    structured(
        "nul_in_customer_id",
        ev("nul_cid", data=_cancel_data(customer="c\u0000")),
        "invalid_payload",
        "data.customer_id",
    )
    structured(
        "nul_in_customer_name",
        ev("nul_name", data={**_cancel_data(), "customer": {"name": "Ann\u0000"}}),
        "invalid_payload",
        "data.customer.name",
    )
    structured(
        "nul_in_comment",
        ev("nul_comment", data=_cancel_data(comment="fine\u0000")),
        "invalid_payload",
        "data.comment",
    )
    structured(
        "escape_in_reason",
        ev("esc_reason", data=_cancel_data(reason="\u001b[31mred")),
        "invalid_payload",
        "data.reason",
    )

    # -- lengths ------------------------------------------------------------------------------
    structured("id_too_long", ev("long_id", id="i" * 257), "invalid_attribute", "id")
    structured(
        "source_100kb", ev("big_source", source="/" + "s" * 100_000), "invalid_attribute", "source"
    )
    structured(
        "type_too_long", ev("long_type", type=f"{prefix}." + "t" * 300), "invalid_attribute", "type"
    )
    structured(
        "subject_too_long", ev("long_subject", subject="s" * 257), "invalid_attribute", "subject"
    )
    structured(
        "dataschema_too_long",
        ev("long_schema", dataschema="https://x/" + "d" * 1100),
        "invalid_attribute",
        "dataschema",
    )
    structured(
        "datacontenttype_too_long",
        ev("long_dct", datacontenttype="application/" + "j" * 200),
        "invalid_attribute",
        "datacontenttype",
    )
    structured(
        "extension_value_too_long",
        ev("long_ext", correlationid="c" * 1025),
        "invalid_attribute",
        "correlationid",
    )
    structured(
        "customer_id_too_long",
        ev("long_cid", data=_cancel_data(customer="c" * 201)),
        "invalid_payload",
        "data.customer_id",
    )
    structured(
        "comment_too_long",
        ev("long_comment", data=_cancel_data(comment="w" * 5001)),
        "invalid_payload",
        "data.comment",
    )

    # -- times --------------------------------------------------------------------------------
    for name, time in (
        ("time_year_0001_plus_0100", "0001-01-01T00:00:00+01:00"),
        ("time_9999_12_31_minus_0100", "9999-12-31T23:59:59-01:00"),
        ("time_before_1970", "1969-12-31T23:59:59Z"),
        ("time_2200", "2200-01-01T00:00:00Z"),
        ("time_not_a_time", "yesterday"),
        ("time_without_offset", "2026-01-15T10:00:00"),
        ("time_month_13", "2026-13-01T00:00:00Z"),
        ("time_too_long", "2026-01-15T10:00:00." + "0" * 80 + "Z"),
    ):
        structured(name, ev(name, time=time), "invalid_attribute", "time")
    binary(
        "binary_time_year_0001",
        ev("bin_time", time="0001-01-01T00:00:00+01:00"),
        "invalid_attribute",
        "time",
    )
    structured(
        "time_far_future_in_range", ev("future", time="2199-06-01T00:00:00Z"), "future_time", "time"
    )
    for name, since in (
        ("customer_since_year_0001", "0001-01-01T00:00:00+01:00"),
        ("customer_since_9999_minus_0100", "9999-12-31T23:59:59-01:00"),
        ("customer_since_not_a_time", "yesterday"),
        ("customer_since_without_offset", "2020-01-01T00:00:00"),
    ):
        structured(
            name,
            ev(name, data={**_cancel_data(), "customer": {"customer_since": since}}),
            "invalid_payload",
            "data.customer.customer_since",
        )

    # -- numbers beyond the columns -------------------------------------------------------------
    over = ev("mrr_over_bigint", data=_cancel_data(mrr_minor=0))
    add(
        "mrr_over_bigint",
        orjson.dumps(over).replace(b'"mrr_minor":0', b'"mrr_minor":9223372036854775808'),
        STRUCTURED,
        "invalid_payload",
        "data.mrr_minor",
    )
    over = ev("profile_mrr_over_bigint", data={**_cancel_data(), "customer": {"mrr_minor": 0}})
    add(
        "profile_mrr_over_bigint",
        orjson.dumps(over).replace(b'"mrr_minor":0', b'"mrr_minor":100000000000000000000000'),
        STRUCTURED,
        "invalid_payload",
        "data.customer.mrr_minor",
    )
    structured(
        "mrr_negative",
        ev("mrr_neg", data=_cancel_data(mrr_minor=-1)),
        "invalid_payload",
        "data.mrr_minor",
    )
    structured(
        "days_inactive_huge",
        ev("days", "user.inactive", {"customer_id": "c", "days_inactive": 2**62}),
        "invalid_payload",
        "data.days_inactive",
    )

    # -- payload fields of every inbound type, wrong types ----------------------------------
    wrong_payloads: list[tuple[str, str, dict[str, Any], str]] = [
        ("subscription.cancelled", "customer_id", {"customer_id": 123}, "customer_id"),
        ("subscription.cancelled", "customer", {**_cancel_data(), "customer": "x"}, "customer"),
        ("subscription.cancelled", "reason", _cancel_data(reason=5), "reason"),
        ("subscription.cancelled", "comment", _cancel_data(comment=[]), "comment"),
        ("subscription.cancelled", "feature", _cancel_data(feature={}), "feature"),
        ("subscription.cancelled", "competitor", _cancel_data(competitor=1), "competitor"),
        ("subscription.cancelled", "mrr_minor", _cancel_data(mrr_minor="lots"), "mrr_minor"),
        ("subscription.cancelled", "currency", _cancel_data(currency=12), "currency"),
        ("subscription.reactivated", "plan", {"customer_id": "c", "plan": 1}, "plan"),
        ("subscription.created", "currency", {"customer_id": "c", "currency": "EURO"}, "currency"),
        ("trial.expired", "reason", {"customer_id": "c", "reason": []}, "reason"),
        ("trial.expired", "feature", {"customer_id": "c", "feature": 7}, "feature"),
        ("lead.lost", "competitor", {"customer_id": "c", "competitor": 1}, "competitor"),
        ("lead.lost", "comment", {"customer_id": "c", "comment": {}}, "comment"),
        (
            "user.inactive",
            "days_inactive",
            {"customer_id": "c", "days_inactive": "x"},
            "days_inactive",
        ),
        (
            "user.inactive",
            "usage_drop_percent",
            {"customer_id": "c", "usage_drop_percent": 101},
            "usage_drop_percent",
        ),
        ("user.active", "customer_id", {"customer_id": None}, "customer_id"),
        ("feature.released", "feature", {"feature": 1}, "feature"),
        ("feature.released", "name", {"feature": "sso", "name": 1}, "name"),
        ("feature.released", "description", {"feature": "sso", "description": []}, "description"),
        ("consent.withdrawn", "channel", {"customer_id": "c", "channel": "pigeon"}, "channel"),
        ("customer.updated", "customer_id", {"customer": {}}, "customer_id"),
    ]
    wrong_profile: tuple[tuple[str, Any], ...] = (
        ("email", 1),
        ("phone", 1),
        ("name", []),
        ("locale", 1),
        ("timezone", 1),
        ("plan", 1),
        ("mrr_minor", "x"),
        ("currency", 1),
        ("customer_since", True),
        ("engagement", "extreme"),
        ("crm_owner", 1),
    )
    for field_name, wrong_value in wrong_profile:
        wrong_payloads.append(
            (
                "customer.updated",
                f"customer.{field_name}",
                {"customer_id": "c", "customer": {field_name: wrong_value}},
                f"customer.{field_name}",
            )
        )
    for event_type, label, data, field_name in wrong_payloads:
        name = f"wrong_type_{event_type.replace('.', '_')}_{label.replace('.', '_')}"
        structured(name, ev(name, event_type, data), "invalid_payload", f"data.{field_name}")
    structured("data_not_an_object", ev("data_str", data="cancelled"), "invalid_payload", "data")
    no_data = ev("no_data")
    del no_data["data"]
    structured("data_missing", no_data, "invalid_payload", "data")
    structured("unknown_type", ev("unknown", "invoice.paid"), "unknown_type", "type")
    structured(
        "other_prefix", ev("other", type="org.other.subscription.cancelled"), "unknown_type", "type"
    )

    # -- binary mode: bad headers ---------------------------------------------------------------
    base = ev("binary")
    add(
        "binary_only_ce_id",
        b'{"customer_id": "c"}',
        (("ce_id", b"x"), JSON),
        "missing_attribute",
        "source",
    )
    binary(
        "binary_specversion_0_3", {**base, "specversion": "0.3"}, "invalid_attribute", "specversion"
    )
    binary(
        "binary_text_plain",
        ev("bin_text"),
        "invalid_attribute",
        "datacontenttype",
        content_type=b"text/plain",
        value=b"cancelled",
    )
    binary(
        "binary_ce_id_not_utf8",
        {k: v for k, v in ev("bin_id").items() if k != "id"},
        "invalid_attribute",
        "ce_id",
        extra=(("ce_id", b"\xc3\x28"),),
    )
    binary(
        "binary_ce_id_twice",
        ev("bin_twice"),
        "invalid_attribute",
        "ce_id",
        extra=(("ce_id", b"another"),),
    )
    binary(
        "binary_ce_data_header",
        ev("bin_data"),
        "invalid_attribute",
        "ce_data",
        extra=(("ce_data", b"{}"),),
    )
    binary(
        "binary_bad_extension_header",
        ev("bin_ext"),
        "invalid_attribute",
        "bad-name",
        extra=(("ce_Bad-Name", b"x"),),
    )
    binary("binary_nul_in_ce_id", ev("bin_nul", id="evt\u0000"), "invalid_attribute", "id")
    binary(
        "binary_content_type_not_utf8",
        ev("bin_ct"),
        "invalid_attribute",
        "content-type",
        content_type=b"application/\xffjson",
    )
    add(
        "structured_content_type_not_utf8",
        orjson.dumps(ev("ct_utf8")),
        (("content-type", b"application/cloudevents+json\xff"),),
        "invalid_attribute",
        "content-type",
    )
    # header names that are not UTF-8 (bytes: only a hand-built record batch can carry them)
    add(
        "header_name_not_utf8_structured",
        orjson.dumps(ev("hdr_name")),
        (*STRUCTURED, (b"\xff\xfe", b"x")),
        "invalid_header",
        "headers",
    )
    binary(
        "header_name_not_utf8_binary",
        ev("hdr_name_bin"),
        "invalid_header",
        "headers",
        extra=((b"ce_\xc3\x28", b"x"),),
    )
    add(
        "header_value_not_utf8_unread_header",
        orjson.dumps(ev("hdr_value_other") | {"time": "0001-01-01T00:00:00+01:00"}),
        (*STRUCTURED, ("x-trace", b"\xff\xfe\xfd")),
        "invalid_attribute",
        "time",
    )

    # -- nesting ------------------------------------------------------------------------------
    for depth in (40, 5000):
        value = orjson.dumps(ev(f"deep_{depth}", data=_cancel_data(extra="@@")))
        value = value.replace(b'"@@"', _nested(depth))
        add(f"deep_nesting_{depth}", value, STRUCTURED, "too_deep")

    # -- size -----------------------------------------------------------------------------------
    big = ev("over_limit", data=_cancel_data(comment="x" * (max_event_bytes + 10)))
    add("value_over_max_event_bytes", orjson.dumps(big), STRUCTURED, "oversize")
    add(
        "headers_over_max_event_bytes",
        orjson.dumps(ev("big_headers")),
        (*STRUCTURED, ("x-padding", b"p" * (max_event_bytes + 10))),
        "oversize",
    )
    if oversize_bytes is not None:
        event = ev("near_broker_limit", data=_cancel_data(comment="@@"))
        skeleton = orjson.dumps(event)
        fill = max(0, oversize_bytes - len(skeleton) + 2)
        add(
            "value_near_broker_limit",
            skeleton.replace(b'"@@"', b'"' + b"y" * fill + b'"'),
            STRUCTURED,
            "oversize",
        )
    return out


def binary_headers(prefix: str = "com.example", id: str = "hostile-binary") -> list[Header]:
    """Valid binary-mode headers for a cancellation (pair them with a bad value)."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", id.encode()),
        ("ce_source", b"/corpus/hostile"),
        ("ce_type", f"{prefix}.subscription.cancelled".encode()),
        ("ce_time", CORPUS_TIME.encode()),
        JSON,
    ]


CODES = (
    "malformed_json",
    "too_deep",
    "missing_attribute",
    "invalid_attribute",
    "invalid_header",
    "unknown_type",
    "invalid_payload",
    "future_time",
    "oversize",
)
"""Every dead-letter code the corpus expects."""


def valid_cancellations(
    n: int,
    *,
    prefix: str = "com.example",
    tag: str = "good",
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
) -> list[ValidRecord]:
    """``n`` valid structured cancellations, customer ``f"{tag}-{i}"`` each, one second apart
    from ``start``; the event id is a UUID derived from tag and index."""
    out = []
    for i in range(n):
        customer = f"{tag}-{i}"
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-corpus/{tag}/{i}"))
        event = {
            "specversion": "1.0",
            "id": event_id,
            "source": "/corpus/good",
            "type": f"{prefix}.subscription.cancelled",
            "time": (start + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": {
                "customer_id": customer,
                "reason": "too_expensive",
                "comment": "Line one\nline two\twith a tab",
                "customer": {
                    "email": f"{customer}@example.com",
                    "timezone": "Europe/Helsinki",
                    "mrr_minor": 4900,
                    "currency": "EUR",
                    "customer_since": "2024-01-15T00:00:00+02:00",
                },
            },
        }
        out.append(
            ValidRecord(
                f"valid_{i}", customer.encode(), orjson.dumps(event), STRUCTURED, customer, event_id
            )
        )
    return out


# -- producing to a real broker ------------------------------------------------------------------
Producible = HostileRecord | ValidRecord


async def produce_records(
    bootstrap: str, topic: str, records: Sequence[Producible]
) -> list[tuple[int, int]]:
    """Produce ``records`` in order and return each one's (partition, offset) once every one is
    acknowledged. Header names that are ``bytes`` go in a hand-built batch of their own."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_request_size=1024 * 1024 + 64 * 1024
    )
    await producer.start()
    try:
        futures: list[Any] = []
        for record in records:
            if any(isinstance(name, bytes) for name, _ in record.headers):
                futures.append(await _send_raw(producer, topic, record))
            else:
                futures.append(
                    await producer.send(
                        topic,
                        value=record.value,
                        key=record.key,
                        headers=[(str(n), v) for n, v in record.headers],
                    )
                )
        done = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in done]


class _Metadata(NamedTuple):
    partition: int
    offset: int


async def _send_raw(producer: Any, topic: str, record: Producible) -> asyncio.Future[_Metadata]:
    """Send one record whose header names may be any bytes: a v2 record batch built by
    aiokafka with same-length placeholder names, patched, its CRC recomputed, sent in a
    ProduceRequest to the partition's leader (the partition the key hashes to)."""
    from aiokafka.partitioner import DefaultPartitioner
    from aiokafka.protocol.produce import ProduceRequest
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.util import calc_crc32c
    from aiokafka.structs import TopicPartition

    from shared.messaging.kafka_raw import parse_batch, split_batches

    await producer.flush()  # what is queued goes first: the partition's order holds
    partitions = sorted(await producer.partitions_for(topic))
    partition = DefaultPartitioner()(record.key, partitions, partitions)
    headers: list[tuple[str, bytes]] = []
    patches: list[tuple[bytes, bytes]] = []  # (what to find, the name to write)
    for name, value in record.headers:
        if isinstance(name, bytes):
            placeholder = "~" * len(name)
            needle = _varint(len(name)) + placeholder.encode() + _varint(len(value)) + value
            patches.append((needle, name))
            headers.append((placeholder, value))
        else:
            headers.append((name, value))
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2 * 1024 * 1024,
    )
    builder.append(offset=0, timestamp=None, key=record.key, value=record.value, headers=headers)
    batch = bytearray(builder.build())
    end = len(batch)
    for needle, name in reversed(patches):  # headers are the record's last bytes
        at = batch.rindex(needle, 0, end) + len(_varint(len(name)))
        batch[at : at + len(name)] = name
        end = at
    struct.pack_into(">I", batch, 17, calc_crc32c(bytes(batch[21:])))  # CRC of attributes..end
    (written,) = parse_batch(next(split_batches(bytes(batch))))
    wanted = tuple((n if isinstance(n, bytes) else n.encode(), v) for n, v in record.headers)
    if (written.key, written.value, written.headers) != (record.key, record.value, wanted):
        raise AssertionError(f"the hand-built batch of {record.name} does not hold the record")
    client = producer.client
    leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
    request = ProduceRequest(
        transactional_id=None,
        required_acks=-1,
        timeout=30_000,
        topics=[(topic, [(partition, bytes(batch))])],
    )
    response = await client.send(leader, request)
    _, ((_, error, offset, *_),) = response.topics[0]
    if error:
        raise RuntimeError(f"producing {record.name} failed with Kafka error {error}")
    future: asyncio.Future[_Metadata] = asyncio.get_running_loop().create_future()
    future.set_result(_Metadata(partition, offset))
    return future


def _varint(n: int) -> bytes:
    """Kafka's zig-zag varint (header value lengths in a v2 record)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
