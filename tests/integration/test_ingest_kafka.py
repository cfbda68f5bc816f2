"""Ingest end to end on the real broker and the real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import CONSUMER, bootstrap
from shared import domain_events
from shared.db.tables import churn_episodes, customers, inbox, outbox
from shared.messaging.kafka import KafkaTransport
from shared.settings import Settings
from tests.support.kafka import (
    binary,
    cloudevent,
    event_of,
    group_behind,
    header,
    produce,
    read_all,
    structured,
)
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration


def cancellation(customer: str, **data: Any) -> dict[str, Any]:
    body = {
        "customer_id": customer,
        "reason": "too_expensive",
        "comment": "Too pricey for our team, call me on +358401234567",
        "customer": {
            "email": f"{customer}@example.com",
            "phone": "+358 40 123 4567",
            "timezone": "Europe/Helsinki",
            "locale": "fi-FI",
            "mrr_minor": 4900,
            "currency": "eur",
            "customer_since": "2024-01-15T00:00:00Z",
            "engagement": "high",
            "crm_owner": "owner-7",
        },
    }
    body.update(data)
    return body


async def count(engine: AsyncEngine, table: Any, *where: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def customer_row(engine: AsyncEngine, cid: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(customers.select().where(customers.c.id == cid))).one_or_none()


async def test_both_bindings_record_customers_episodes_and_publish_domain_events(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    topic = settings.topics.inbound[0]
    e1 = cloudevent("subscription.cancelled", cancellation("cus_s"))
    e2 = cloudevent(
        "subscription.cancelled", cancellation("cus_b", reason="missing_features", feature="sso")
    )
    async with running(service.core.runtime):
        await produce(
            settings.kafka.bootstrap_servers,
            topic,
            [
                (b"cus_s", *structured(e1)),
                (b"cus_b", *binary(e2)),
            ],
        )
        n = await eventually(lambda: count(engine, churn_episodes), lambda v: v >= 2)
        assert n == 2
        published = await read_all(settings.kafka.bootstrap_servers, settings.topics.domain, 2)

    row = await customer_row(engine, "cus_s")
    assert row.status == "churned"
    assert row.phone == "+358401234567"
    assert row.currency == "EUR"
    assert row.timezone == "Europe/Helsinki"
    async with engine.connect() as conn:
        episodes = {r.customer_id: r for r in (await conn.execute(churn_episodes.select())).all()}
    assert episodes["cus_s"].reason == "price"
    assert episodes["cus_s"].reason_raw == "too_expensive"
    assert episodes["cus_s"].comment.startswith("Too pricey")
    assert episodes["cus_s"].mrr_at_churn_minor == 4900
    assert episodes["cus_b"].reason == "missing_feature"
    assert episodes["cus_b"].feature == "sso"

    assert sorted(r.key for r in published) == [b"cus_b", b"cus_s"]
    for record in published:
        assert header(record, "content-type") == "application/cloudevents+json"
        event = event_of(record)
        assert event["type"] == domain_events.CHURN_RECORDED
        assert event["data"]["customer"]["id"] == record.key.decode()
        assert "comment" not in event["data"]["episode"]
        # the correlation id is carried from the incoming event
        assert event["correlationid"] in (e1["id"], e2["id"])


async def test_same_event_twice_has_one_effect(settings: Settings, engine: AsyncEngine) -> None:
    service = bootstrap(settings, engine=engine)
    event = cloudevent("subscription.cancelled", cancellation("cus_dup"))
    # a later event of the same customer (same key, so after the copies in its partition):
    # once its effect shows, every copy before it has been handled
    marker = cloudevent(
        "customer.updated", {"customer_id": "cus_dup", "customer": {"plan": "marker"}}
    )
    async with running(service.core.runtime):
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [(b"cus_dup", *structured(event))] * 2,
        )
        # and the same (source, id) once more in the other binding, in a later batch
        await eventually(lambda: count(engine, inbox), lambda v: v >= 1)
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [(b"cus_dup", *binary(event)), (b"cus_dup", *structured(marker))],
        )
        row = await eventually(
            lambda: customer_row(engine, "cus_dup"), lambda r: r is not None and r.plan == "marker"
        )
        assert row.plan == "marker"
        published = await read_all(settings.kafka.bootstrap_servers, settings.topics.domain, 2)
    assert await count(engine, churn_episodes) == 1
    async with engine.connect() as conn:
        emitted = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars()
        emitted_types = [orjson.loads(v)["type"] for v in emitted]
    assert emitted_types == [domain_events.CHURN_RECORDED, domain_events.CUSTOMER_UPDATED]
    assert [event_of(r)["type"] for r in published] == emitted_types


class Killed(Exception):
    """Stands for the process dying."""


class CrashBeforeOffsetCommit:
    """Our own Subscription interface, wrapping the real Kafka one: the consumer dies right
    after its database transaction committed, before the offset commit."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.crashed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, positions: Any) -> None:
        self.crashed.set()
        raise Killed("killed before the offset commit")


async def test_consumer_killed_before_offset_commit_has_no_duplicate_effect_after_restart(
    settings: Settings, engine: AsyncEngine
) -> None:
    topic = settings.topics.inbound[0]
    first = bootstrap(settings, engine=engine)
    crashing = CrashBeforeOffsetCommit(first.consumer.subscription)
    first.consumer.subscription = crashing
    await first.core.runtime.publisher.start()
    await KafkaTransport(settings.kafka.bootstrap_servers).ensure_topics(
        [topic, *settings.topics.inbound, settings.topics.domain, settings.topics.dead_letter], 3
    )
    await produce(
        settings.kafka.bootstrap_servers,
        topic,
        [
            (
                f"cus_k{i}".encode(),
                *structured(cloudevent("subscription.cancelled", cancellation(f"cus_k{i}"))),
            )
            for i in range(20)
        ],
    )
    task = asyncio.create_task(first.consumer.run())
    await asyncio.wait_for(crashing.crashed.wait(), 60)
    with pytest.raises(Killed):
        await task
    committed_before_restart = await count(engine, churn_episodes)
    assert committed_before_restart >= 1  # the transaction did commit
    await crashing.inner.stop()
    await first.core.runtime.publisher.stop()

    second = bootstrap(settings, engine=engine)
    async with running(second.core.runtime):
        n = await eventually(lambda: count(engine, churn_episodes), lambda v: v >= 20)
        assert n == 20
        # the group committed past every record: a duplicate effect would be in the database
        behind = await eventually(
            lambda: group_behind(
                settings.kafka.bootstrap_servers, CONSUMER, topic, settings.topics.partitions
            ),
            lambda b: not b,
        )
        assert behind == {}
        assert await count(engine, churn_episodes) == 20
        assert await count(engine, outbox) == 20
        published = await read_all(settings.kafka.bootstrap_servers, settings.topics.domain, 20)
    assert len(published) == 20
    assert len({event_of(r)["id"] for r in published}) == 20


POISON = [
    ("malformed_json", b"{not json", [("content-type", b"application/cloudevents+json")]),
    (
        "missing_attribute",
        b'{"specversion":"1.0","source":"/x","type":"com.example.user.active",'
        b'"data":{"customer_id":"c"}}',
        [("content-type", b"application/cloudevents+json")],
    ),
    ("unknown_type", None, None),
    ("invalid_payload", None, None),
    ("oversize", None, None),
    ("future_time", None, None),
]


def poison_record(code: str, settings: Settings) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    for name, value, headers in POISON:
        if name == code and value is not None and headers is not None:
            return value, headers
    if code == "unknown_type":
        return structured(cloudevent("invoice.paid", {"customer_id": "c"}))
    if code == "invalid_payload":
        return structured(
            cloudevent("subscription.cancelled", {"customer_id": "c", "customer": {"phone": "12"}})
        )
    if code == "oversize":
        big = "x" * (settings.ingest.max_event_bytes + 10)
        return structured(
            cloudevent("subscription.cancelled", {"customer_id": "c", "comment": big})
        )
    if code == "future_time":
        return structured(
            cloudevent(
                "subscription.cancelled",
                {"customer_id": "c"},
                time=datetime.now(UTC) + timedelta(days=2),
            )
        )
    raise AssertionError(code)


async def test_each_kind_of_poison_goes_to_the_dead_letter_topic_and_consumption_goes_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    topic = settings.topics.inbound[0]
    codes = [name for name, _, _ in POISON]
    records = [(b"same-key", *poison_record(code, settings)) for code in codes]
    good = cloudevent("subscription.cancelled", cancellation("cus_after_poison"))
    records.append((b"same-key", *structured(good)))
    async with running(service.core.runtime):
        await produce(settings.kafka.bootstrap_servers, topic, records)
        dead = await read_all(
            settings.kafka.bootstrap_servers, settings.topics.dead_letter, expect=len(codes)
        )
        row = await eventually(
            lambda: customer_row(engine, "cus_after_poison"), lambda r: r is not None
        )
    assert row is not None
    assert row.status == "churned"
    assert sorted(header(r, "winback-dlq-error-code") or "" for r in dead) == sorted(codes)
    by_code = {header(r, "winback-dlq-error-code"): r for r in dead}
    for code, value, _ in POISON:
        record = by_code[code]
        assert header(record, "winback-dlq-source-topic") == topic
        assert header(record, "winback-dlq-source-partition") is not None
        assert header(record, "winback-dlq-source-offset") is not None
        assert header(record, "winback-dlq-error-reason")
        if value is not None:
            assert record.value == value  # the original bytes, untouched
            assert header(record, "content-type") == "application/cloudevents+json"
    assert header(by_code["missing_attribute"], "winback-dlq-error-field") == "id"
    assert header(by_code["invalid_payload"], "winback-dlq-error-field") == "data.customer.phone"
    assert header(by_code["unknown_type"], "winback-dlq-error-field") == "type"


async def test_reactivation_arriving_before_its_cancellation_leaves_the_customer_active(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    cancel = cloudevent("subscription.cancelled", cancellation("cus_o"), time=t0)
    back = cloudevent(
        "subscription.reactivated",
        {"customer_id": "cus_o", "plan": "pro", "mrr_minor": 9900},
        time=t0 + timedelta(days=3),
    )
    stale_update = cloudevent(
        "customer.updated",
        {"customer_id": "cus_o", "customer": {"plan": "basic"}},
        time=t0 - timedelta(days=30),
    )
    async with running(service.core.runtime):
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [
                (b"cus_o", *structured(back)),
                (b"cus_o", *structured(cancel)),
                (b"cus_o", *structured(stale_update)),
            ],
        )
        await eventually(lambda: count(engine, churn_episodes), lambda v: v >= 1)
        await eventually(lambda: count(engine, inbox), lambda v: v >= 3)
    row = await customer_row(engine, "cus_o")
    assert row.status == "active"
    assert row.plan == "pro"
    assert row.mrr_minor == 9900
    async with engine.connect() as conn:
        episode = (await conn.execute(churn_episodes.select())).one()
    assert episode.ended_at == t0 + timedelta(days=3)
    assert episode.end_reason == "returned"
    async with engine.connect() as conn:
        emitted = (await conn.execute(select(outbox.c.value))).scalars().all()
    assert not any(b"churn.recorded" in v for v in emitted)
