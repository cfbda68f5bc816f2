"""Every event the three services actually emit satisfies its contract (``shared.contracts``).

Ingest, scheduler and dispatcher run together on the in-process bus and the real database
(the dispatcher's providers are the fake provider server on loopback), and a scenario drives
every emit site: churns, a profile change, a consent withdrawal, inactivity and a return by
activity, a feature release, timed steps, sends, failed sends, provider webhooks, an
unsubscribe link, a case cancelled, a playbook migration, an erasure, a reactivation credited
as a win-back, the horizon. Then every record on every topic is read back and validated, by
its type through the registry, strictly (a field the contract does not declare fails), and
must be a fixed point of its model (what the model writes is byte for byte what was sent).
Nothing may have been dead-lettered: in particular the dispatcher accepted every command the
scheduler sent.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import DispatcherService
from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
from services.ingest.bootstrap import IngestService
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import SchedulerService
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from services.scheduler.domain import in_holdout
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.cloudevents import from_kafka
from shared.contracts import examples, registry
from shared.db.tables import case_steps, cases, deliveries, outbox, scheduler_customers
from shared.messaging.memory import MemoryBus
from shared.messaging.transport import OutgoingRecord, Record
from shared.settings import DEV_SECRET, Settings
from tests.fakes.provider_server import FakeProviderServer, Fault
from tests.support.dispatcher import dispatcher_config, with_dispatcher
from tests.support.http import serve
from tests.support.kafka import cloudevent, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday, 10:00 in Helsinki
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}
KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
PRICE = "price_discount"


def customer(tag: str, playbook: str = PRICE, share: float = 0.05) -> str:
    """A customer id outside the playbook's holdout (holdout cases send nothing)."""
    return next(
        cid
        for i in range(1000)
        if not in_holdout(cid := f"cus_ct_{tag}{i}", playbook, share)
        and not in_holdout(cid, "reonboarding_price", 0.05)
    )


def cancellation(cid: str, at: datetime, reason: str = "too_expensive", **extra: Any) -> Any:
    return cloudevent(
        "subscription.cancelled",
        {
            "customer_id": cid,
            "reason": reason,
            **extra,
            "customer": {
                "email": f"{cid}@example.com",
                "name": "Aino",
                "timezone": "Europe/Helsinki",
                "locale": "fi-FI",
                "engagement": "high",
                "mrr_minor": 2900,
                "currency": "EUR",
                "customer_since": "2024-05-01T00:00:00Z",
                "crm_owner": "owner-3",
            },
        },
        time=at,
    )


@dataclass
class System:
    settings: Settings
    engine: AsyncEngine
    clock: FrozenClock
    bus: MemoryBus
    ingest: IngestService
    scheduler: SchedulerService
    dispatcher: DispatcherService
    fake: FakeProviderServer
    scheduler_api: httpx.AsyncClient
    dispatcher_api: httpx.AsyncClient

    async def send(self, *events: dict[str, Any]) -> None:
        records = []
        for e in events:
            value, headers = structured(e)
            key = str(e["data"].get("customer_id") or e["data"].get("feature")).encode()
            records.append(
                OutgoingRecord(self.settings.topics.inbound[0], key, value, tuple(headers))
            )
        publisher = self.bus.publisher()
        await publisher.start()
        try:
            await publisher.publish(records)
        finally:
            await publisher.stop()

    async def case(self, cid: str, status: str | None = None) -> Any:
        async def probe() -> Any:
            async with self.engine.connect() as conn:
                return (
                    await conn.execute(
                        cases.select()
                        .where(cases.c.customer_id == cid, cases.c.purpose == "winback")
                        .order_by(cases.c.opened_at.desc())
                    )
                ).first()

        row = await eventually(probe, lambda r: r is not None and status in (None, r.status))
        assert row is not None, cid
        assert status in (None, row.status), (cid, status, row)
        return row

    async def fire_until(self, until: datetime, step: timedelta = timedelta(hours=1)) -> None:
        while self.clock.now() < until:
            self.clock.advance(step)
            while (await self.scheduler.firer.fire_once()).claimed:
                pass

    async def count(self, query: Any) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def relayed(self) -> None:
        """Every outbox row is on the bus and the dispatcher holds a delivery for every
        command: what the services emitted so far has been consumed."""
        unpublished = (
            select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        )
        await eventually(lambda: self.count(unpublished), lambda n: n == 0)
        commands = len(await all_records(self.bus, [self.settings.topics.dispatch]))
        queued = select(func.count()).select_from(deliveries)
        await eventually(lambda: self.count(queued), lambda n: n >= commands)

    async def delivery(self, cid: str) -> Any:
        async with self.engine.connect() as conn:
            rows = list(
                await conn.execute(
                    deliveries.select()
                    .where(deliveries.c.customer_id == cid)
                    .order_by(deliveries.c.id)
                )
            )
        assert rows, f"no delivery for {cid}"
        return rows[0]

    async def sendgrid(self, *events: dict[str, Any]) -> None:
        body = json.dumps(list(events)).encode()
        ts = str(int(self.clock.now().timestamp()))
        signature = KEY.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
        answer = await self.dispatcher_api.post(
            "/v1/webhooks/sendgrid",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": ts,
            },
        )
        assert answer.status_code < 300, answer.text


def sendgrid_event(row: Any, event: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": row.command["customer"]["email"],
        "timestamp": int(T0.timestamp()) + 60,
        "event": event,
        "sg_event_id": f"{row.idempotency_key}-{event}",
        "sg_message_id": f"{row.provider_message_id}.filterdrecv-5bd7d-1-5F3B-4.0",
        "idempotency_key": row.idempotency_key,
        **extra,
    }


async def all_records(bus: MemoryBus, topics: list[str]) -> list[Record]:
    """Every record on ``topics`` so far, read by a consumer group of its own."""

    async def no_hook(_: object) -> None:
        return None

    reader = bus.subscription(f"contract-reader-{uuid.uuid4().hex[:8]}", topics)
    await reader.start(no_hook)
    out: list[Record] = []
    try:
        while batch := await reader.poll(10_000, 0):
            out.extend(batch)
    finally:
        await reader.stop()
    return out


def migrated_playbooks(directory: Path, settings: Settings) -> Path:
    """The default playbooks plus a version 2 of price_discount: one step dropped, one added,
    one retimed, one changed."""
    directory.mkdir()
    for source in Path(settings.scheduler.playbooks_dir).glob("*.yaml"):
        (directory / source.name).write_text(source.read_text())
    v1 = (directory / "price_discount.yaml").read_text()
    v2 = v1.replace("version: 1", "version: 2")
    v2 = re.sub(r"  - key: d14_last_chance\n(    .*\n)+?(?=  - key)", "", v2)
    v2 = v2.replace("    offset: 9mo\n", "    offset: 10mo\n")
    v2 = v2.replace(
        "  - key: d90_whats_new\n    offset: 3mo\n    channel: email\n    template: whats_new\n",
        "  - key: d10_customer_story\n    offset: 10d\n    channel: email\n"
        "    template: customer_story\n"
        "  - key: d90_whats_new\n    offset: 3mo\n    channel: email\n    template: check_in\n",
    )
    assert v2.count("version: 2") == 1
    assert "d14_last_chance" not in v2
    (directory / "price_discount_v2.yaml").write_text(v2)
    return directory


@asynccontextmanager
async def system(settings: Settings, engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[System]:
    clock = FrozenClock(T0)
    bus = MemoryBus()
    async with AsyncExitStack() as stack:
        stack.callback(bus.close)
        fake = await stack.enter_async_context(FakeProviderServer())
        config = dispatcher_config(fake, tmp_path, webhooks={"sendgrid_public_key": PUBLIC_KEY})
        settings = with_dispatcher(settings, config)
        ingest = ingest_bootstrap(settings, engine=engine, clock=clock, transport=bus)
        scheduler = scheduler_bootstrap(settings, engine=engine, clock=clock, transport=bus)
        dispatcher = dispatcher_bootstrap(settings, engine=engine, clock=clock, transport=bus)
        stack.push_async_callback(dispatcher.aclose)
        # the test moves the clock, fires the timers and drains the sender itself
        scheduler.core.runtime.extra_parts = [
            p for p in scheduler.core.runtime.extra_parts if p[0] != "step-timer"
        ]
        dispatcher.core.runtime.extra_parts = [
            p for p in dispatcher.core.runtime.extra_parts if p[0] != "delivery-sender"
        ]
        for runtime in (ingest.core.runtime, scheduler.core.runtime, dispatcher.core.runtime):
            await stack.enter_async_context(running(runtime))
        scheduler_url = await stack.enter_async_context(serve(scheduler.app, lifespan="off"))
        dispatcher_url = await stack.enter_async_context(serve(dispatcher.app, lifespan="off"))
        scheduler_api = await stack.enter_async_context(
            httpx.AsyncClient(base_url=scheduler_url, headers=AUTH)
        )
        dispatcher_api = await stack.enter_async_context(httpx.AsyncClient(base_url=dispatcher_url))
        yield System(
            settings,
            engine,
            clock,
            bus,
            ingest,
            scheduler,
            dispatcher,
            fake,
            scheduler_api,
            dispatcher_api,
        )


async def test_every_event_the_services_emit_satisfies_its_contract(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    a, c, d, e, f, g, h, i = (customer(tag) for tag in "acdefghi")
    c = customer("c", "missing_feature", 0.1)
    b = "cus_ct_inactive"
    async with system(settings, engine, tmp_path) as s:
        # churns of every kind the scenario needs; a profile change and a consent withdrawal
        await s.send(
            *(cancellation(cid, T0) for cid in (a, d, e, f, g, h, i)),
            cancellation(c, T0 - timedelta(days=10), "missing_features", feature="SSO login"),
            cloudevent("user.inactive", {"customer_id": b, "days_inactive": 30}, time=T0),
        )
        for cid in (a, b, c, d, e, f, g, h, i):
            await s.case(cid)
        at = T0 + timedelta(minutes=1)
        await s.send(
            cloudevent(
                "customer.updated", {"customer_id": a, "customer": {"name": "Aino V"}}, time=at
            ),
            cloudevent("consent.withdrawn", {"customer_id": a, "channel": "sms"}, time=at),
        )

        # day 0: the first steps go out, and the providers report back
        await s.fire_until(T0 + timedelta(hours=1))
        await s.relayed()
        await s.dispatcher.sender.drain()
        row_a, row_d = await s.delivery(a), await s.delivery(d)
        await s.sendgrid(
            sendgrid_event(row_a, "delivered"),
            sendgrid_event(row_a, "open"),
            sendgrid_event(row_a, "click", url="https://acme.example/pricing"),
            sendgrid_event(row_d, "bounce", type="bounce", reason="550 5.1.1 unknown user"),
            sendgrid_event(row_d, "spamreport"),
            sendgrid_event(row_d, "dropped", reason="Bounced Address"),
            sendgrid_event(row_d, "unsubscribe"),
        )
        # e unsubscribes with the link in the email (RFC 8058 one-click)
        token = s.dispatcher.tokens.issue(e, "email")
        answer = await s.dispatcher_api.post(
            f"/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 200, answer.text
        await s.case(d, "closed")
        await s.case(e, "closed")

        # a feature ships: c's case gets its triggered step
        await s.send(
            cloudevent(
                "feature.released", {"feature": "sso_login", "name": "SSO"}, time=s.clock.now()
            )
        )
        await eventually(
            lambda: s.count(
                select(func.count()).select_from(cases).where(cases.c.feature_key.is_not(None))
            ),
            lambda n: n >= 1,
        )
        # a survey answer with tags only, a fix and a competitor's news that name no case
        now = s.clock.now()
        await s.send(
            cloudevent("feedback.received", {"customer_id": a, "tags": ["reports"]}, time=now),
            cloudevent("issue.resolved", {"issue": "ENG-9", "tags": ["nothing"]}, time=now),
            cloudevent("competitor.changed", {"competitor": "Nobody", "kind": "outage"}, time=now),
        )

        # i's case moves to price_discount v2 (through a scheduler deployed with it)
        directory = migrated_playbooks(tmp_path / "playbooks", settings)
        v2 = settings.model_copy(
            update={"scheduler": settings.scheduler.model_copy(update={"playbooks_dir": directory})}
        )
        deployed = scheduler_bootstrap(v2, engine=engine, clock=s.clock, transport=s.bus)
        async with (
            serve(deployed.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            moved = await http.post(
                f"/v1/playbooks/{PRICE}/migrations", json={"from_version": 1, "to_version": 2}
            )
        assert moved.status_code == 200, moved.text
        assert moved.json()["cases_migrated"] >= 1

        # day 3: g's case is cancelled and h erased while their steps wait in the queue; the
        # providers fail for everyone else
        await s.fire_until(T0 + timedelta(days=3, hours=1))
        await s.relayed()
        g_case = await s.case(g)
        cancelled = await s.scheduler_api.post(f"/v1/cases/{g_case.id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        erased = await s.scheduler_api.delete(f"/v1/customers/{h}")
        assert erased.status_code == 202, erased.text
        await s.relayed()
        s.fake.fail_always("sendgrid", Fault.http(400, {"errors": [{"message": "bad"}]}))
        s.fake.fail_always("postmark", Fault.http(422, {"ErrorCode": 300, "Message": "bad"}))
        await s.dispatcher.sender.drain()
        s.fake.heal()

        # a returns (credited to the last touch; re-onboarding opens), b is active again
        back = T0 + timedelta(days=5)
        s.clock.set(back)
        await s.send(
            cloudevent(
                "subscription.reactivated",
                {"customer_id": a, "plan": "pro", "mrr_minor": 3900},
                time=back,
            ),
            cloudevent("user.active", {"customer_id": b}, time=back),
        )
        await s.case(a, "closed")
        await s.case(b, "closed")

        # past every horizon
        s.clock.set(T0 + timedelta(days=800))
        await s.scheduler.firer.expire_cases()
        await s.relayed()

        topics = s.settings.topics
        records = await all_records(
            s.bus, [topics.domain, topics.dispatch, topics.outcomes, topics.erasure]
        )
        dead = await all_records(s.bus, [topics.dead_letter])
        async with engine.connect() as conn:
            delivered_keys = set(
                (await conn.execute(select(deliveries.c.idempotency_key))).scalars()
            )

    assert dead == [], [dict(r.headers) for r in dead]
    seen: dict[str, int] = {}
    variants: set[str] = set()
    commands: set[str] = set()
    for record in records:
        event = from_kafka(record.value, record.headers)
        contract = registry.contract_for(event.type)
        assert contract is not None, f"{event.type} has no contract"
        assert record.topic == getattr(topics, contract.topic), event.type
        # keyed by customer id (the subject), an announcement by its feature, issue, competitor
        assert record.key is not None
        announced = event.data.get("feature") or event.data.get("issue")
        key = event.subject or announced or event.data.get("competitor")
        assert record.key.decode() == key, event.type
        decoded = contract.decode(event.data, tolerant=False)  # strict: no undeclared field
        assert decoded.to_data() == event.data, f"{event.type} is not its model's form"
        seen[event.type] = seen.get(event.type, 0) + 1
        if event.type == de.CUSTOMER_UNSUBSCRIBED:
            variants.add("link" if "method" in event.data else "provider")
        if event.type == de.DISPATCH_REQUESTED:
            commands.add(event.data["idempotency_key"])
    assert set(registry.PUBLISHED) - set(seen) == set(), seen
    assert variants == {"link", "provider"}
    # the dispatcher took every command the scheduler sent
    assert commands
    assert commands <= delivered_keys


async def test_a_malformed_event_dead_letters_at_the_schedulers_decode_naming_the_field(
    settings: Settings, engine: AsyncEngine
) -> None:
    bus = MemoryBus()
    scheduler = scheduler_bootstrap(settings, engine=engine, clock=FrozenClock(T0), transport=bus)
    scheduler.core.runtime.extra_parts = [
        p for p in scheduler.core.runtime.extra_parts if p[0] != "step-timer"
    ]
    churn = copy.deepcopy(examples.PUBLISHED["churn.recorded"])
    churn["episode"]["occurred_at"] = "last tuesday"
    updated = examples.PUBLISHED["customer.updated"]

    def record(type: str, data: dict[str, Any]) -> OutgoingRecord:
        value, headers = structured(
            {
                "specversion": "1.0",
                "id": f"contract-{type}",
                "source": "/winback/ingest",
                "type": type,
                "data": data,
            }
        )
        return OutgoingRecord(settings.topics.domain, b"cus_42", value, tuple(headers))

    try:
        async with running(scheduler.core.runtime):
            publisher = bus.publisher()
            await publisher.start()
            await publisher.publish(
                [record(de.CHURN_RECORDED, churn), record(de.CUSTOMER_UPDATED, updated)]
            )
            await publisher.stop()
            dead = await eventually(
                lambda: _records(bus, settings.topics.dead_letter), lambda r: len(r) >= 1
            )
            stored = select(func.count()).select_from(scheduler_customers)

            async def customers() -> int:
                async with engine.connect() as conn:
                    return int(await conn.scalar(stored) or 0)

            kept = await eventually(customers, lambda n: n == 1)
    finally:
        bus.close()
    assert len(dead) == 1
    headers = {name: value.decode() for name, value in dead[0].headers}
    assert headers["winback-dlq-error-code"] == "invalid_payload"
    assert headers["winback-dlq-error-field"] == "data.episode.occurred_at"
    assert headers["winback-dlq-consumer"] == "scheduler"
    assert dead[0].value is not None
    assert orjson.loads(dead[0].value)["data"] == churn  # the original bytes, unchanged
    assert kept == 1  # the good event behind it was handled
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(cases)) == 0


async def _records(bus: MemoryBus, topic: str) -> list[Record]:
    return await all_records(bus, [topic])


async def test_a_step_whose_command_would_break_the_contract_is_skipped_naming_the_field(
    settings: Settings, engine: AsyncEngine
) -> None:
    """A value stored before today's limits (a 300-character name) must not stall the
    timer in a retry loop: that step is skipped with the reason, the others go."""
    clock = FrozenClock(T0)
    bus = MemoryBus()
    scheduler = scheduler_bootstrap(settings, engine=engine, clock=clock, transport=bus)
    scheduler.core.runtime.extra_parts = [
        p for p in scheduler.core.runtime.extra_parts if p[0] != "step-timer"
    ]
    bad, good = customer("bad"), customer("good")
    try:
        async with running(scheduler.core.runtime):
            ingest = ingest_bootstrap(settings, engine=engine, clock=clock, transport=bus)
            async with running(ingest.core.runtime):
                publisher = bus.publisher()
                await publisher.start()
                for cid in (bad, good):
                    value, headers = structured(cancellation(cid, T0))
                    await publisher.publish(
                        [
                            OutgoingRecord(
                                settings.topics.inbound[0], cid.encode(), value, tuple(headers)
                            )
                        ]
                    )
                await publisher.stop()
                opened = select(func.count()).select_from(cases)

                async def count() -> int:
                    async with engine.connect() as conn:
                        return int(await conn.scalar(opened) or 0)

                assert await eventually(count, lambda n: n == 2) == 2
            async with engine.begin() as conn:
                await conn.execute(
                    scheduler_customers.update()
                    .where(scheduler_customers.c.id == bad)
                    .values(name="A" * 300)
                )
            clock.advance(timedelta(hours=1))
            result = await scheduler.firer.fire_once()
            async with engine.connect() as conn:
                steps = {
                    (r.customer_id, r.state): r.state_reason
                    for r in await conn.execute(
                        case_steps.select().where(case_steps.c.state != "pending")
                    )
                }
    finally:
        bus.close()
    assert result.dispatched == 1
    assert result.skipped == 1
    assert (good, "dispatched") in steps
    reason = steps[(bad, "skipped")]
    assert reason is not None
    assert reason.startswith("invalid_command: data.customer.name: ")
