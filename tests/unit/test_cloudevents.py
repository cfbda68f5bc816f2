"""CloudEvents decoding in both Kafka bindings; each failure names the attribute."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from shared.cloudevents import CloudEvent, from_json_dict, from_kafka
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
