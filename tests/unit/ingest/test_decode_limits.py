"""Decoding an inbound record never raises anything but ``InvalidEvent``, and what it accepts
can be stored: payload limits, the hostile-record corpus, and a Hypothesis property over
arbitrary bytes, JSON values and header lists."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.ingest import events as ev
from services.ingest.handler import IngestHandler
from shared.clock import FrozenClock
from shared.cloudevents import (
    ATTRIBUTE_LIMITS,
    MAX_EXTENSION_VALUE_CHARS,
    MAX_EXTENSIONS,
    MAX_TIME,
    MIN_TIME,
    CloudEvent,
    from_kafka,
)
from shared.contracts.inbound import CustomerEvent
from shared.contracts.registry import INBOUND
from shared.db.engine import make_engine
from shared.errors import InvalidEvent
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.memory import MemoryBus
from shared.messaging.pipeline import BatchResult, DeadLetter, Incoming, Pipeline
from shared.messaging.transport import OutgoingRecord, Record
from tests.support.corpus import CODES, hostile_records, valid_cancellations
from tests.support.services import eventually

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
HANDLER = IngestHandler(FrozenClock(NOW), "com.example", 300, "domain")
MAX_EVENT_BYTES = 256 * 1024


def decode(data: dict[str, Any], type: str = "subscription.cancelled") -> ev.Inbound:
    event = CloudEvent(id="e1", source="/s", type=f"com.example.{type}", time=NOW, data=data)
    return HANDLER.decode(event)


def refused(data: dict[str, Any], type: str = "subscription.cancelled") -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode(data, type)
    return info.value


# -- payload limits ---------------------------------------------------------------------------
STRING_FIELDS = [
    ("subscription.cancelled", "customer_id", 200),
    ("subscription.cancelled", "reason", 200),
    ("subscription.cancelled", "feature", 200),
    ("subscription.cancelled", "competitor", 200),
    ("subscription.cancelled", "comment", 5000),
    ("subscription.reactivated", "plan", 200),
    ("trial.expired", "reason", 200),
    ("lead.lost", "competitor", 200),
    ("feature.released", "feature", 200),
    ("feature.released", "name", 200),
    ("feature.released", "description", 2000),
    ("customer.updated", "customer.name", 200),
    ("customer.updated", "customer.plan", 200),
    ("customer.updated", "customer.crm_owner", 200),
]


def with_field(type: str, path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {} if type == "feature.released" else {"customer_id": "c1"}
    if type == "feature.released" and path != "feature":
        data["feature"] = "sso"
    if path.startswith("customer."):
        data["customer"] = {path.split(".", 1)[1]: value}
    else:
        data[path] = value
    return data


@pytest.mark.parametrize(("type", "path", "limit"), STRING_FIELDS)
def test_every_payload_string_has_a_length_limit(type: str, path: str, limit: int) -> None:
    decode(with_field(type, path, "a" * limit), type)
    error = refused(with_field(type, path, "a" * (limit + 1)), type)
    assert (error.code, error.field) == ("invalid_payload", f"data.{path}")


@pytest.mark.parametrize(("type", "path", "limit"), STRING_FIELDS)
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85"])
def test_every_payload_string_refuses_nul_and_control_characters(
    type: str, path: str, limit: int, char: str
) -> None:
    error = refused(with_field(type, path, f"a{char}b"), type)
    assert (error.code, error.field) == ("invalid_payload", f"data.{path}")


@pytest.mark.parametrize(
    ("type", "path"),
    [("subscription.cancelled", "comment"), ("feature.released", "description")],
)
def test_free_text_keeps_line_breaks_and_tabs(type: str, path: str) -> None:
    text = "first line\r\nsecond\tline"
    payload = decode(with_field(type, path, text), type).payload
    assert getattr(payload, path) == text


def test_a_single_line_field_refuses_a_line_break_inside() -> None:
    error = refused({"customer_id": "c1", "customer": {"name": "Ann\nSmith"}})
    assert error.field == "data.customer.name"


@pytest.mark.parametrize(
    "since",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "1969-12-31T23:59:59Z",
        "2200-01-01T00:00:00Z",
        -1,
        253402300800000,  # milliseconds: year 9999
    ],
)
def test_customer_since_outside_the_time_range_is_refused(since: Any) -> None:
    error = refused({"customer_id": "c1", "customer": {"customer_since": since}})
    assert (error.code, error.field) == ("invalid_payload", "data.customer.customer_since")


def test_customer_since_inside_the_range_is_kept_in_utc() -> None:
    inbound = decode(
        {"customer_id": "c1", "customer": {"customer_since": "1970-01-01T02:00:00+02:00"}}
    )
    assert isinstance(inbound.payload, CustomerEvent)
    since = inbound.payload.customer.customer_since
    assert since == MIN_TIME
    assert since.utcoffset() == timedelta(0)


@pytest.mark.parametrize("path", ["mrr_minor", "customer.mrr_minor"])
def test_money_fits_a_postgresql_bigint(path: str) -> None:
    assert decode(with_field("subscription.cancelled", path, 2**63 - 1)) is not None
    for over in (2**63, 2**64, 10**30):
        error = refused(with_field("subscription.cancelled", path, over))
        assert (error.code, error.field) == ("invalid_payload", f"data.{path}")


def test_days_inactive_is_bounded() -> None:
    error = refused({"customer_id": "c1", "days_inactive": 2**62}, "user.inactive")
    assert error.field == "data.days_inactive"


@pytest.mark.parametrize(
    "zone", ["America", "posix/../Europe/Helsinki", "a" * 65, "Europe/Helsinki\x00", "zone.tab"]
)
def test_a_timezone_must_be_an_iana_name(zone: str) -> None:
    error = refused({"customer_id": "c1", "customer": {"timezone": zone}})
    assert error.field == "data.customer.timezone"


@pytest.mark.parametrize("currency", ["ÄÖÜ", "E1R", "EURO"])
def test_a_currency_is_three_ascii_letters(currency: str) -> None:
    assert refused({"customer_id": "c1", "currency": currency}).field == "data.currency"


def test_a_bad_consent_channel_names_the_field_not_a_union_member() -> None:
    error = refused({"customer_id": "c1", "channel": "pigeon"}, "consent.withdrawn")
    assert error.field == "data.channel"


# -- the hostile-record corpus, through the consumer's own decode -------------------------------
def runner() -> ConsumerRunner:
    """The real ConsumerRunner and Pipeline with ingest's handler; decoding touches neither the
    bus nor the database (the engine never connects)."""
    pipeline = Pipeline(
        make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none", pool_size=1),
        "ingest",
        HANDLER,
        FrozenClock(NOW),
        "dlq",
        "/winback/ingest",
    )
    return ConsumerRunner(
        MemoryBus().subscription("ingest", ["in"]), pipeline, max_event_bytes=MAX_EVENT_BYTES
    )


def as_record(value: bytes | None, headers: Any, key: bytes | None = None) -> Record:
    return Record("in", 0, 0, key, value, tuple(headers))


CORPUS = hostile_records(max_event_bytes=MAX_EVENT_BYTES)


@pytest.mark.parametrize("hostile", CORPUS, ids=[h.name for h in CORPUS])
def test_each_hostile_record_is_refused_with_its_code_and_field(hostile: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        runner().decode(as_record(hostile.value, hostile.headers, hostile.key))
    assert (info.value.code, info.value.field) == (hostile.code, hostile.field)
    assert hostile.code in CODES


def test_the_corpus_is_deterministic_and_covers_every_code_it_lists() -> None:
    again = hostile_records(max_event_bytes=MAX_EVENT_BYTES)
    assert again == CORPUS
    assert {h.code for h in CORPUS} == set(CODES)
    assert len({h.name for h in CORPUS}) == len(CORPUS)
    assert hostile_records(seed=10) != CORPUS  # the seed is what the random bytes come from
    sizes = {h.name: len(h.value or b"") for h in hostile_records(oversize_bytes=900_000)}
    assert 900_000 <= sizes["value_near_broker_limit"] <= 900_010
    assert "value_near_broker_limit" not in {h.name for h in hostile_records(oversize_bytes=None)}


def test_valid_cancellations_are_accepted_and_distinct() -> None:
    good = valid_cancellations(5)
    decoded = [runner().decode(as_record(g.value, g.headers, g.key)) for g in good]
    assert [d.payload.payload.customer_id for d in decoded] == [g.customer_id for g in good]
    assert len({d.event.id for d in decoded}) == 5
    assert valid_cancellations(5) == good


# -- the consumer turns ANY decoding failure into a dead letter ---------------------------------
class RecordingPipeline(Pipeline):
    """Ingest's real decoding; the database transaction replaced by a record of what it got
    (the integration tests run the real one on PostgreSQL)."""

    def __init__(self) -> None:
        super().__init__(
            make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none", pool_size=1),
            "ingest",
            HANDLER,
            FrozenClock(NOW),
            "dlq",
            "/winback/ingest",
        )
        self.handled: list[Incoming[Any]] = []
        self.dead: list[DeadLetter] = []

    async def transact_reliably(
        self,
        items: Sequence[Incoming[Any]],
        dead: Sequence[DeadLetter] = (),
        stopping: asyncio.Event | None = None,
    ) -> BatchResult:
        self.handled.extend(items)
        self.dead.extend(dead)
        return BatchResult(len(items), 0, len(dead))


async def test_the_consumer_dead_letters_every_decoding_failure_and_keeps_consuming() -> None:
    bus = MemoryBus(clock=FrozenClock(NOW), max_record_bytes=2 * 1024 * 1024)
    await bus.ensure_topics(["in"], 1)
    pipeline = RecordingPipeline()
    subscription = bus.subscription("ingest", ["in"])
    ingest = ConsumerRunner(subscription, pipeline, max_event_bytes=MAX_EVENT_BYTES)

    def decode_with_a_bug(record: Record) -> Incoming[Any]:
        if record.key == b"bug":
            raise ZeroDivisionError("a bug meeting input it did not expect")
        return ingest.decode(record)

    consumer = ConsumerRunner(subscription, pipeline, poll_timeout_ms=20, decode=decode_with_a_bug)
    good = valid_cancellations(3)
    records = [OutgoingRecord("in", g.key, g.value, tuple(g.headers)) for g in good[:2]]
    records += [
        OutgoingRecord("in", h.key, h.value, tuple((str(n), v) for n, v in h.headers))
        for h in CORPUS
        if not h.raw_header_names
    ]
    records.append(OutgoingRecord("in", b"bug", good[2].value, tuple(good[2].headers)))
    publisher = bus.publisher()
    await publisher.start()
    await publisher.publish(records)
    await publisher.stop()

    task = asyncio.create_task(consumer.run())

    async def committed() -> int:
        return bus.committed("ingest").get(("in", 0), 0)

    assert await eventually(committed, lambda n: n == len(records), timeout=10) == len(records)
    assert not task.done(), "the consumer stopped"
    consumer.stop()
    await asyncio.wait_for(task, 5)
    bus.close()

    assert [i.event.id for i in pipeline.handled] == [g.event_id for g in good[:2]]
    codes = [letter.error.code for letter in pipeline.dead]
    expected = [h.code for h in CORPUS if not h.raw_header_names]
    assert codes == [*expected, "decode_error"]
    bug = pipeline.dead[-1].error
    assert bug.reason.startswith("ZeroDivisionError: a bug meeting")


# -- the property: nothing but InvalidEvent, and what passes can be stored -------------------
def storable(inbound: ev.Inbound, event: CloudEvent) -> None:
    """What ``shared/db/tables.py`` can hold, and what the limits promise."""
    for name, limit in ATTRIBUTE_LIMITS.items():
        value = getattr(event, name)
        assert value is None or (len(value) <= limit and "\x00" not in value)
    assert len(event.extensions) <= MAX_EXTENSIONS
    for value in event.extensions.values():
        assert len(value) <= MAX_EXTENSION_VALUE_CHARS
        assert "\x00" not in value
    assert event.time is None or MIN_TIME <= event.time < MAX_TIME
    assert MIN_TIME <= inbound.occurred_at < MAX_TIME
    payload: BaseModel = inbound.payload
    stack: list[Any] = [payload.model_dump()]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, str):
            assert "\x00" not in value
            assert len(value) <= 5000
            value.encode("utf-8")
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            assert -(2**63) <= value < 2**63
        elif isinstance(value, datetime):
            assert MIN_TIME <= value < MAX_TIME


def dumps(value: Any) -> bytes:
    """JSON as any producer may write it: integers of any size, lone surrogates escaped."""
    return json.dumps(value).encode()


def check(value: bytes | None, headers: list[tuple[str | bytes, bytes | None]]) -> None:
    try:
        event = from_kafka(value, headers)
        inbound = HANDLER.decode(event)
    except InvalidEvent as exc:
        exc.reason.encode()
        (exc.field or "").encode()
        return
    storable(inbound, event)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "\x00"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = [
    "customer_id", "reason", "comment", "feature", "competitor", "mrr_minor", "currency", "plan",
    "days_inactive", "usage_drop_percent", "name", "description", "channel", "customer",
]  # fmt: skip
PROFILE = [
    "email", "phone", "name", "locale", "timezone", "plan", "mrr_minor", "currency",
    "customer_since", "engagement", "crm_owner",
]  # fmt: skip
TYPES = [f"com.example.{name}" for name in INBOUND] + ["com.example.nope", "", "x"]
payloads = st.fixed_dictionaries(
    {},
    optional={
        **{f: json_values for f in FIELDS},
        "customer_id": st.text(max_size=210),
        "customer": st.fixed_dictionaries({}, optional={p: json_values for p in PROFILE})
        | json_values,
    },
)
times = st.sampled_from(
    ["2026-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]
) | st.text(max_size=40)
envelopes = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0") | json_values,
        "id": st.text(max_size=300) | json_values,
        "source": st.text(max_size=600) | json_values,
        "type": st.sampled_from(TYPES) | json_values,
    },
    optional={
        "time": times | json_values,
        "subject": st.text(max_size=300) | json_values,
        "data": payloads | json_values,
        "correlationid": json_values,
        "datacontenttype": st.text(max_size=40),
        "data_base64": json_values,
    },
)
# leaning towards valid events, so that the "what passes can be stored" half is exercised
in_range = st.datetimes(
    min_value=datetime(1969, 12, 31), max_value=datetime(2200, 1, 2), timezones=st.just(UTC)
)
plausible_times = in_range.map(lambda t: t.isoformat())
printable = st.characters(categories=["L", "N", "P", "S", "Zs"])


def plausible_text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(printable, min_size=min_size, max_size=max_size) | st.text(
        min_size=min_size, max_size=max_size
    )


SAMPLES = {
    "email": st.sampled_from(["a@example.com", "A.B+c@Example.COM", "x@y", "bad"]),
    "phone": st.sampled_from(["+358 40 123 4567", "+14155552671", "12"]),
    "locale": st.sampled_from(["fi-FI", "en", "x", "fi_FI_x"]),
    "timezone": st.sampled_from(["Europe/Helsinki", "UTC", "America", "Mars/Base"]),
    "currency": st.sampled_from(["eur", "USD", "ÄÖÜ", "EURO"]),
    "engagement": st.sampled_from(["high", "low", "extreme"]),
    "customer_since": plausible_times,
    "mrr_minor": st.integers(min_value=-1, max_value=2**64),
    "days_inactive": st.integers(min_value=-1, max_value=2**40),
    "usage_drop_percent": st.floats(min_value=-1, max_value=101),
    "channel": st.sampled_from(["email", "sms", "all", "pigeon"]),
}
plausible_profile = st.fixed_dictionaries(
    {}, optional={p: SAMPLES.get(p, plausible_text(0, 210)) for p in PROFILE}
)
plausible_payloads = st.fixed_dictionaries(
    {"customer_id": plausible_text(1, 210)},
    optional={
        **{f: SAMPLES.get(f, plausible_text(0, 5010)) for f in FIELDS if f != "customer_id"},
        "feature": plausible_text(1, 210),
        "customer": plausible_profile,
    },
)
plausible_envelopes = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0"),
        "id": plausible_text(1, 300),
        "source": plausible_text(1, 600),
        "type": st.sampled_from([f"com.example.{name}" for name in INBOUND]),
        "data": plausible_payloads,
    },
    optional={
        "time": plausible_times | times,
        "subject": plausible_text(0, 300),
        "correlationid": st.text(max_size=1100) | st.integers() | st.booleans(),
    },
)
header_names = (
    st.sampled_from(
        [
            "content-type",
            "ce_id",
            "ce_source",
            "ce_specversion",
            "ce_type",
            "ce_time",
            "ce_x",
            "CE_ID",
        ]
    )
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
header_values = (
    st.binary(max_size=40)
    | st.sampled_from(
        [b"application/cloudevents+json", b"application/json", b"1.0", b"com.example.user.active"]
    )
    | st.none()
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(value=st.binary(max_size=300) | st.none(), headers=header_lists)
def test_arbitrary_bytes_and_headers_raise_nothing_but_invalid_event(
    value: bytes | None, headers: list[tuple[str | bytes, bytes | None]]
) -> None:
    check(value, headers)


@SETTINGS
@given(value=json_values)
def test_arbitrary_json_values_raise_nothing_but_invalid_event(value: Any) -> None:
    check(dumps(value), [("content-type", b"application/cloudevents+json")])


@SETTINGS
@given(event=envelopes)
def test_arbitrary_event_shaped_json_raises_nothing_but_invalid_event(event: Any) -> None:
    check(dumps(event), [("content-type", b"application/cloudevents+json")])


@SETTINGS
@given(event=envelopes, extra=header_lists)
def test_arbitrary_binary_mode_events_raise_nothing_but_invalid_event(
    event: dict[str, Any], extra: list[tuple[str | bytes, bytes | None]]
) -> None:
    headers: list[tuple[str | bytes, bytes | None]] = [
        (f"ce_{k}", v.encode("utf-8", "surrogatepass") if isinstance(v, str) else dumps(v))
        for k, v in event.items()
        if k != "data"
    ]
    headers += extra
    check(dumps(event.get("data")), [*headers, ("content-type", b"application/json")])


@SETTINGS
@given(event=plausible_envelopes)
def test_plausible_events_raise_nothing_but_invalid_event_and_what_passes_is_storable(
    event: Any,
) -> None:
    check(dumps(event), [("content-type", b"application/cloudevents+json")])
