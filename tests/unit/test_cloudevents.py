"""CloudEvents decoding in both Kafka bindings; each failure names the attribute, and what is
accepted stays within the limits (lengths, control characters, time range, nesting)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from shared.cloudevents import (
    ATTRIBUTE_LIMITS,
    MAX_EXTENSION_VALUE_CHARS,
    MAX_EXTENSIONS,
    MAX_JSON_DEPTH,
    MAX_TIME,
    MIN_TIME,
    CloudEvent,
    from_json_dict,
    from_kafka,
    loads,
    utc_in_range,
)
from shared.errors import InvalidEvent

EVENT = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "/billing",
    "type": "com.example.subscription.cancelled",
    "time": "2026-03-01T10:00:00+02:00",
    "correlationid": "corr-9",
    "data": {"customer_id": "c1"},
}


def test_structured_mode_is_read_from_the_value() -> None:
    event = from_kafka(orjson.dumps(EVENT), [("content-type", b"application/cloudevents+json")])
    assert event.id == "evt-1"
    assert event.time == datetime(2026, 3, 1, 8, tzinfo=UTC)
    assert event.data == {"customer_id": "c1"}
    assert event.correlation_id == "corr-9"


def test_binary_mode_is_read_from_ce_headers() -> None:
    headers = [(f"ce_{k}", str(v).encode()) for k, v in EVENT.items() if k != "data"]
    headers.append(("content-type", b"application/json"))
    event = from_kafka(orjson.dumps(EVENT["data"]), headers)
    assert (event.id, event.source, event.type) == ("evt-1", "/billing", EVENT["type"])
    assert event.data == {"customer_id": "c1"}
    assert event.extensions == {"correlationid": "corr-9"}


def test_what_we_write_reads_back_the_same() -> None:
    original = from_json_dict(EVENT)
    value, headers = original.to_structured()
    assert from_kafka(value, headers) == original


@pytest.mark.parametrize("missing", ["id", "source", "specversion", "type"])
def test_a_missing_required_attribute_is_named(missing: str) -> None:
    broken = {k: v for k, v in EVENT.items() if k != missing}
    with pytest.raises(InvalidEvent) as info:
        from_json_dict(broken)
    assert info.value.code == "missing_attribute"
    assert info.value.field == missing


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"specversion": "0.3"}, "invalid_attribute", "specversion"),
        ({"time": "yesterday"}, "invalid_attribute", "time"),
        ({"time": "2026-03-01T10:00:00"}, "invalid_attribute", "time"),
        ({"Bad-Ext": "x"}, "invalid_attribute", "Bad-Ext"),
        ({"id": 5}, "invalid_attribute", "id"),
    ],
)
def test_bad_attributes_are_named(change: dict[str, object], code: str, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        from_json_dict({**EVENT, **change})
    assert (info.value.code, info.value.field) == (code, field)


def test_malformed_json_is_its_own_kind_of_error() -> None:
    with pytest.raises(InvalidEvent) as info:
        from_kafka(b"{nope", [("content-type", b"application/cloudevents+json")])
    assert info.value.code == "malformed_json"


def test_a_record_in_neither_mode_is_rejected() -> None:
    with pytest.raises(InvalidEvent) as info:
        from_kafka(b"plain text", [])
    assert info.value.code == "missing_attribute"


def test_correlation_defaults_to_the_event_id() -> None:
    assert CloudEvent(id="x", source="/s", type="t").correlation_id == "x"


# -- limits: what an accepted event can hold ----------------------------------------------------
def decode_error(obj: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        from_json_dict(obj)
    return info.value


@pytest.mark.parametrize(("attribute", "limit"), sorted(ATTRIBUTE_LIMITS.items()))
def test_each_string_attribute_has_a_length_limit(attribute: str, limit: int) -> None:
    if attribute == "specversion":
        error = decode_error({**EVENT, "specversion": "1" * (limit + 1)})
        assert (error.code, error.field) == ("invalid_attribute", "specversion")
        return
    at_limit = "a" * limit
    if attribute == "type":
        at_limit = str(EVENT["type"]) + "x" * (limit - len(EVENT["type"]))
    assert getattr(from_json_dict({**EVENT, attribute: at_limit}), attribute) == at_limit
    error = decode_error({**EVENT, attribute: at_limit + "x"})
    assert (error.code, error.field) == ("invalid_attribute", attribute)
    assert str(limit) in error.reason


def test_a_100_kb_source_is_refused() -> None:
    error = decode_error({**EVENT, "source": "/" + "s" * 100_000})
    assert (error.code, error.field) == ("invalid_attribute", "source")


def test_extension_values_and_their_number_are_limited() -> None:
    value = "v" * MAX_EXTENSION_VALUE_CHARS
    assert from_json_dict({**EVENT, "ext": value}).extensions["ext"] == value
    error = decode_error({**EVENT, "ext": value + "v"})
    assert (error.code, error.field) == ("invalid_attribute", "ext")
    many = {f"x{i}": i for i in range(MAX_EXTENSIONS - 1)}  # EVENT carries correlationid
    assert len(from_json_dict({**EVENT, **many}).extensions) == MAX_EXTENSIONS
    error = decode_error({**EVENT, **many, "onemore": 1})
    assert (error.code, error.field) == ("invalid_attribute", "onemore")


def test_extension_scalars_read_as_their_canonical_strings_and_null_is_absent() -> None:
    event = from_json_dict({**EVENT, "flag": True, "count": 3, "gone": None})
    assert event.extensions == {"correlationid": "corr-9", "flag": "true", "count": "3"}


@pytest.mark.parametrize("name", ["abc\n", "Abc", "a" * 21, "", "a-b", "ä"])
def test_extension_names_are_exactly_lowercase_letters_and_digits(name: str) -> None:
    error = decode_error({**EVENT, name: "x"})
    assert error.code == "invalid_attribute"
    assert error.field in (name, repr(name))


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("id", "evt\x00x"),
        ("source", "/billing\x00"),
        ("type", str(EVENT["type"]) + "\x00"),
        ("subject", "line\nbreak"),
        ("dataschema", "https://x/\x7f"),
        ("id", "c1\x85control"),
        ("correlationid", "a\tb"),
    ],
)
def test_nul_and_control_characters_are_refused_in_attributes(attribute: str, value: str) -> None:
    error = decode_error({**EVENT, attribute: value})
    assert (error.code, error.field) == ("invalid_attribute", attribute)
    assert "control character U+" in error.reason


def test_unicode_text_in_attributes_is_fine() -> None:
    event = from_json_dict({**EVENT, "subject": "Päivi ✓ 你好", "source": "/laskutus/ä"})
    assert event.subject == "Päivi ✓ 你好"


def test_data_base64_is_refused_even_beside_data() -> None:
    error = decode_error({**EVENT, "data_base64": "AAAA"})
    assert (error.code, error.field) == ("invalid_attribute", "data_base64")


# -- time range --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",  # overflows on the way to UTC
        "9999-12-31T23:59:59-01:00",  # likewise, the other end
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "1969-12-31T23:59:59.999999Z",
        "2200-01-01T00:00:00Z",
        "2200-01-01T00:59:59+01:00" + "0" * 60,
    ],
)
def test_times_outside_the_range_are_refused_naming_time(value: str) -> None:
    error = decode_error({**EVENT, "time": value})
    assert (error.code, error.field) == ("invalid_attribute", "time")


def test_the_time_range_bounds() -> None:
    assert from_json_dict({**EVENT, "time": "1970-01-01T00:00:00Z"}).time == MIN_TIME
    assert from_json_dict({**EVENT, "time": "1970-01-01T01:00:00+01:00"}).time == MIN_TIME
    last = from_json_dict({**EVENT, "time": "2199-12-31T23:59:59.999999Z"}).time
    assert last is not None
    assert last < MAX_TIME
    assert decode_error({**EVENT, "time": "2200-01-01T01:00:00+01:00"}).field == "time"


def test_utc_in_range_is_a_value_error_for_every_extreme() -> None:
    for extreme in (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)):
        with pytest.raises(ValueError, match="out of range"):
            utc_in_range(extreme)


# -- JSON nesting ------------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_json_nested_to_the_limit_is_read_and_one_deeper_is_too_deep() -> None:
    assert loads(nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(InvalidEvent) as info:
        loads(nested(MAX_JSON_DEPTH + 1))
    assert info.value.code == "too_deep"


@pytest.mark.parametrize("depth", [1000, 1024, 1025, 100_000])
def test_very_deep_json_is_too_deep_not_a_recursion_error(depth: int) -> None:
    with pytest.raises(InvalidEvent) as info:
        from_kafka(
            b'{"specversion":"1.0","id":"x","source":"/s","type":"t","data":'
            + nested(depth)
            + b"}",
            STRUCTURED_HEADERS,
        )
    assert info.value.code == "too_deep"


def test_deep_objects_count_too() -> None:
    deep = b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(InvalidEvent) as info:
        loads(deep)
    assert info.value.code == "too_deep"


# -- Kafka headers -----------------------------------------------------------------------------
STRUCTURED_HEADERS: list[tuple[str | bytes, bytes | None]] = [
    ("content-type", b"application/cloudevents+json")
]


def kafka_error(
    value: bytes | None, headers: list[tuple[str | bytes, bytes | None]]
) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        from_kafka(value, headers)
    return info.value


def binary_headers(**change: bytes) -> list[tuple[str | bytes, bytes | None]]:
    headers: dict[str, bytes] = {
        f"ce_{k}": str(v).encode() for k, v in EVENT.items() if k != "data"
    }
    headers["content-type"] = b"application/json"
    headers.update(change)
    return list(headers.items())


@pytest.mark.parametrize("name", [b"\xff\xfe", b"ce_\xc3\x28", "\udcff", "ce_\ud800"])
def test_a_header_name_that_is_not_utf8_is_invalid_header(name: str | bytes) -> None:
    value = orjson.dumps(EVENT)
    error = kafka_error(value, [*STRUCTURED_HEADERS, (name, b"x")])
    assert (error.code, error.field) == ("invalid_header", "headers")
    error.reason.encode()  # the reason travels as a header: it must encode


def test_header_names_as_utf8_bytes_are_read_like_strings() -> None:
    event = from_kafka(orjson.dumps(EVENT), [(b"content-type", b"application/cloudevents+json")])
    assert event.id == "evt-1"


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        (binary_headers(ce_id=b"\xc3\x28"), "ce_id"),
        (binary_headers(ce_source=b"\xff"), "ce_source"),
        (binary_headers(**{"content-type": b"application/\xffjson"}), "content-type"),
        ([("content-type", b"application/cloudevents+json\xff")], "content-type"),
    ],
)
def test_a_header_value_that_is_not_utf8_names_the_header(
    headers: list[tuple[str | bytes, bytes | None]], field: str
) -> None:
    error = kafka_error(orjson.dumps(EVENT["data"]), headers)
    assert (error.code, error.field) == ("invalid_attribute", field)


def test_headers_we_do_not_read_may_hold_any_bytes() -> None:
    headers = [*STRUCTURED_HEADERS, ("traceparent", b"\xff\x00\xfe"), ("x-empty", None)]
    assert from_kafka(orjson.dumps(EVENT), headers).id == "evt-1"


@pytest.mark.parametrize(
    ("headers", "code", "field"),
    [
        (binary_headers(ce_id=b"evt\x00"), "invalid_attribute", "id"),
        (binary_headers(ce_time=b"0001-01-01T00:00:00+01:00"), "invalid_attribute", "time"),
        (binary_headers(ce_specversion=b"0.3"), "invalid_attribute", "specversion"),
        (binary_headers(ce_data=b"{}"), "invalid_attribute", "ce_data"),
        (binary_headers(ce_data_base64=b"AAAA"), "invalid_attribute", "ce_data_base64"),
        (binary_headers(**{"ce_Bad-Name": b"x"}), "invalid_attribute", "bad-name"),
        (binary_headers(**{"ce_": b"x"}), "invalid_attribute", ""),
        (binary_headers(**{"content-type": b"text/plain"}), "invalid_attribute", "datacontenttype"),
        ([("ce_id", b"x"), ("content-type", b"application/json")], "missing_attribute", "source"),
        (
            [*binary_headers(), ("ce_id", b"another")],
            "invalid_attribute",
            "ce_id",
        ),
        (
            [*binary_headers(), ("CE_ID", b"another")],
            "invalid_attribute",
            "ce_id",
        ),
    ],
)
def test_bad_binary_mode_headers_are_named(
    headers: list[tuple[str | bytes, bytes | None]], code: str, field: str
) -> None:
    error = kafka_error(orjson.dumps(EVENT["data"]), headers)
    assert (error.code, error.field) == (code, field)


def test_a_header_given_twice_with_the_same_value_is_fine() -> None:
    headers = [*binary_headers(), ("ce_id", b"evt-1")]
    assert from_kafka(orjson.dumps(EVENT["data"]), headers).id == "evt-1"


def test_invalid_event_reasons_and_fields_always_encode_and_stay_short() -> None:
    error = InvalidEvent("x", "bad \ud800 " + "r" * 10_000, "f\udcff" + "f" * 1000)
    error.reason.encode()
    assert error.field is not None
    error.field.encode()
    assert len(error.reason) <= InvalidEvent.MAX_REASON_CHARS
    assert len(error.field) <= InvalidEvent.MAX_FIELD_CHARS
