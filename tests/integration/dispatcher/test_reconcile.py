"""No send stays unknown, on real PostgreSQL and the fake provider over real HTTP: a dispatcher
that dies between the provider call and recording its answer leaves the delivery ``sending``;
the next one recovers it as ``unknown`` (not ``failed``) and reconciles it — confirmed by the
provider's signed webhook (``sent``, ``message.sent`` once, one provider request), by a resend
with the same key to a provider that deduplicates (``sent``, one accepted message), or not at
all within the window (``failed``, ``unconfirmed``; never re-sent without a key).

The crash is in-process: the test claims and sends through the dispatcher's own sender and
stops before ``record`` (what a SIGKILL at that moment leaves), then starts a second
dispatcher on the same database."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model, store
from services.dispatcher.bootstrap import DispatcherService
from services.dispatcher.queries.messages import reconciliation
from services.dispatcher.reconcile import UNCONFIRMED
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.db.tables import delivery_attempts
from shared.settings import DEV_SECRET, Settings
from tests.fakes.provider_server import FakeProviderServer, Fault
from tests.support.dispatcher import (
    T0,
    command,
    delivery_rows,
    dispatcher_config,
    emitted,
    seed,
    service,
    with_dispatcher,
)
from tests.support.http import serve

pytestmark = pytest.mark.integration

PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY = base64.b64encode(
    PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
KEY = {"Authorization": f"Bearer {DEV_SECRET}"}
WINDOW = 600  # dispatcher.unknown_reconcile_seconds
STALE = 60  # dispatcher.stale_sending_seconds (tests/support/dispatcher.py)


def reconciled(outcome: str) -> float:
    value = REGISTRY.get_sample_value("winback_reconciled_total", {"outcome": outcome})
    return value or 0.0


def unknown_gauge() -> float | None:
    return REGISTRY.get_sample_value("winback_deliveries_unknown")


@dataclass
class Harness:
    settings: Settings
    engine: AsyncEngine
    fake: FakeProviderServer
    clock: FrozenClock

    def dispatcher(self) -> DispatcherService:
        return service(self.settings, self.engine, self.clock)

    @property
    def outcomes(self) -> str:
        return self.settings.topics.outcomes

    async def crash_mid_send(self, customer: str, channel: str = "email") -> Any:
        """A dispatcher claims and sends a step, the provider accepts it, and the process dies
        before recording the answer: the row stays ``sending``."""
        case = await seed(self.engine, customer, consent={channel: True})
        doomed = self.dispatcher()
        try:
            event = command(customer, case, channel=channel)
            items = [doomed.pipeline.decode_payload(from_json_dict(event), None, None)]
            await doomed.pipeline.transact_reliably(items)
            (claimed,) = await doomed.sender.claim()
            outcome = await doomed.sender.send(claimed)
            assert outcome.result is not None  # the provider has the message...
        finally:
            await doomed.aclose()  # ... and nothing recorded it
        (row,) = [r for r in await delivery_rows(self.engine) if r.customer_id == customer]
        assert row.state == "sending"
        return row

    async def row(self, customer: str) -> Any:
        (row,) = [r for r in await delivery_rows(self.engine) if r.customer_id == customer]
        return row

    async def events(self, type: str, customer: str) -> list[dict[str, Any]]:
        found = await emitted(self.engine, self.outcomes, type)
        return [e for e in found if e["data"]["customer_id"] == customer]

    async def attempts(self, delivery_id: int) -> list[tuple[int, str, str]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    delivery_attempts.c.attempt,
                    delivery_attempts.c.outcome,
                    delivery_attempts.c.response_class,
                )
                .where(delivery_attempts.c.delivery_id == delivery_id)
                .order_by(delivery_attempts.c.id)
            )
            return [tuple(r) for r in rows]


@pytest.fixture
def harness(
    settings: Settings, engine: AsyncEngine, fake: FakeProviderServer, tmp_path: Path
) -> Harness:
    config = dispatcher_config(
        fake,
        tmp_path,
        webhooks={"sendgrid_public_key": PUBLIC_KEY},
        unknown_reconcile_seconds=WINDOW,
    )
    return Harness(with_dispatcher(settings, config), engine, fake, FrozenClock(T0))


async def post_sendgrid(http: httpx.AsyncClient, clock: FrozenClock, events: Any) -> None:
    body = json.dumps(events).encode()
    ts = str(int(clock.now().timestamp()))
    signature = PRIVATE_KEY.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    response = await http.post(
        "/v1/webhooks/sendgrid",
        content=body,
        headers={
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": ts,
        },
    )
    assert response.status_code == 200, response.text


async def test_a_delivery_left_sending_is_recovered_as_unknown_not_failed(
    harness: Harness,
) -> None:
    row = await harness.crash_mid_send("cus_unknown")
    restarted = harness.dispatcher()
    try:
        assert await restarted.sender.drain() == 0  # not stale yet: left alone
        assert (await harness.row("cus_unknown")).state == "sending"
        harness.clock.advance(timedelta(seconds=STALE + 1))
        assert await restarted.sender.recover_stale() == 1
        await restarted.sender.drain()  # SendGrid has no key: no resend, it waits
    finally:
        await restarted.aclose()
    after = await harness.row("cus_unknown")
    assert (after.state, after.error) == (store.UNKNOWN, None)
    assert after.unknown_since == harness.clock.now()
    assert await harness.events(model.MESSAGE_FAILED, "cus_unknown") == []
    assert await harness.events(model.MESSAGE_SENT, "cus_unknown") == []
    assert await harness.attempts(row.id) == [(1, "unknown", "unknown")]
    assert len(harness.fake.requests_for("sendgrid")) == 1
    assert unknown_gauge() == 1


async def test_a_provider_webhook_confirms_an_unknown_delivery_sent_once(
    harness: Harness,
) -> None:
    """The issue's "done when": killed between the provider call and the record, the provider
    accepting — the delivery ends ``sent`` after reconciliation, after one provider request."""
    row = await harness.crash_mid_send("cus_hooked")
    (request,) = harness.fake.requests_for("sendgrid")
    assert request.idempotency_key == row.idempotency_key  # our key rode along as a custom arg
    harness.clock.advance(timedelta(seconds=STALE + 1))
    restarted = harness.dispatcher()
    before = reconciled("webhook")
    try:
        await restarted.sender.drain()
        assert (await harness.row("cus_hooked")).state == store.UNKNOWN
        delivered = {
            "email": "cus_hooked@example.com",
            "timestamp": int(T0.timestamp()),
            "event": "delivered",
            "sg_event_id": "evt-delivered-1",
            "sg_message_id": "sgmsg-77.filterdrecv-1",
            "idempotency_key": row.idempotency_key,
        }
        opened = {**delivered, "event": "open", "sg_event_id": "evt-open-1"}
        async with (
            serve(restarted.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            waiting = await http.get("/v1/messages/reconciliation", headers=KEY)
            await post_sendgrid(http, harness.clock, [delivered])
            await post_sendgrid(http, harness.clock, [delivered, opened])  # one repeat, one new
            log = await http.get("/v1/customers/cus_hooked/messages", headers=KEY)
            settled = await http.get("/v1/messages/reconciliation", headers=KEY)
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    after = await harness.row("cus_hooked")
    assert (after.state, after.error) == ("sent", None)
    assert (after.provider, after.provider_message_id) == ("sendgrid", "sgmsg-77")
    assert after.sent_at == harness.clock.now()
    (sent,) = await harness.events(model.MESSAGE_SENT, "cus_hooked")
    assert sent["data"]["step_key"] == "d0_we_miss_you"
    assert sent["data"]["provider_message_id"] == "sgmsg-77"
    assert sent["data"]["confirmed_by"] == "webhook"
    types = [e["type"] for e in await emitted(harness.engine, harness.outcomes)]
    assert types.index(model.MESSAGE_SENT) < types.index(model.MESSAGE_DELIVERED)
    assert await harness.events(model.MESSAGE_FAILED, "cus_hooked") == []
    assert len(await harness.events(model.MESSAGE_OPENED, "cus_hooked")) == 1
    assert len(harness.fake.requests_for("sendgrid")) == 1  # one provider request, ever
    assert await harness.attempts(row.id) == [(1, "unknown", "unknown"), (1, "sent", "reconciled")]
    assert reconciled("webhook") == before + 1
    assert unknown_gauge() == 0
    # the reconciliation counts and the message log show it
    assert waiting.json() == {
        "unknown": 1,
        "reconciled": 0,
        "unconfirmed": 0,
        "oldest_unknown_since": harness.clock.now().isoformat().replace("+00:00", "Z"),
    }
    assert settled.json() == {
        "unknown": 0,
        "reconciled": 1,
        "unconfirmed": 0,
        "oldest_unknown_since": None,
    }
    # the message log shows it was reconciled
    assert log.status_code == 200, log.text
    (message,) = log.json()["messages"]
    assert message["state"] == "sent"
    assert message["unknown_since"] is not None
    assert [(a["outcome"], a["response_class"]) for a in message["attempts"]] == [
        ("unknown", "unknown"),
        ("sent", "reconciled"),
    ]


async def test_a_resend_with_the_same_key_confirms_and_the_provider_keeps_one_message(
    harness: Harness,
) -> None:
    row = await harness.crash_mid_send("cus_resend", channel="webhook")
    harness.clock.advance(timedelta(seconds=STALE + 1))
    restarted = harness.dispatcher()
    before = reconciled("resend")
    try:
        await restarted.sender.drain()
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    after = await harness.row("cus_resend")
    assert (after.state, after.attempts) == ("sent", 2)
    requests = harness.fake.requests_for("webhook")
    assert len(requests) == 2
    assert {r.idempotency_key for r in requests} == {row.idempotency_key}
    assert len(harness.fake.accepted("webhook")) == 1  # the receiver deduplicated on our key
    assert requests[1].replayed
    (sent,) = await harness.events(model.MESSAGE_SENT, "cus_resend")
    assert sent["data"]["provider"] == "webhook"
    assert sent["data"]["confirmed_by"] == "resend"
    assert await harness.attempts(row.id) == [(1, "unknown", "unknown"), (2, "sent", "2xx")]
    assert reconciled("resend") == before + 1


async def test_an_unknown_delivery_nothing_confirms_in_the_window_fails_unconfirmed(
    harness: Harness,
) -> None:
    await harness.crash_mid_send("cus_silent")
    harness.clock.advance(timedelta(seconds=STALE + 1))
    restarted = harness.dispatcher()
    before = reconciled(UNCONFIRMED)
    try:
        await restarted.sender.drain()
        harness.clock.advance(timedelta(seconds=WINDOW - 1))
        await restarted.sender.drain()
        assert (await harness.row("cus_silent")).state == store.UNKNOWN
        harness.clock.advance(timedelta(seconds=1))
        await restarted.sender.drain()
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    after = await harness.row("cus_silent")
    assert (after.state, after.error) == ("failed", UNCONFIRMED)
    (failed,) = await harness.events(model.MESSAGE_FAILED, "cus_silent")
    assert failed["data"]["reason"] == UNCONFIRMED
    assert await harness.events(model.MESSAGE_SENT, "cus_silent") == []
    assert len(harness.fake.requests_for("sendgrid")) == 1  # never re-sent without a key
    # Postmark (the secondary) was only searched, and had nothing
    searches = harness.fake.requests_for("postmark")
    assert searches
    assert {(r.method, r.status) for r in searches} == {("GET", 200)}
    assert reconciled(UNCONFIRMED) == before + 1
    async with harness.engine.connect() as conn:
        counts = await reconciliation(conn)
    assert (counts.unknown, counts.reconciled, counts.unconfirmed) == (0, 0, 1)


async def test_postmarks_outbound_search_confirms_an_unknown_delivery(harness: Harness) -> None:
    """Postmark has the message (it went there after SendGrid failed): the search by our key
    in its Metadata finds it; one message was sent."""
    harness.fake.fail_next("sendgrid", Fault.http(401, {"errors": [{"message": "bad key"}]}))
    row = await harness.crash_mid_send("cus_searched")
    (post,) = [r for r in harness.fake.requests_for("postmark") if r.method == "POST"]
    assert post.idempotency_key == row.idempotency_key
    harness.clock.advance(timedelta(seconds=STALE + 1))
    restarted = harness.dispatcher()
    before = reconciled("search")
    try:
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    after = await harness.row("cus_searched")
    assert (after.state, after.provider) == ("sent", "postmark")
    requests = harness.fake.requests_for("postmark")
    assert [r.method for r in requests] == ["POST", "GET"]
    assert f"metadata_idempotency_key={row.idempotency_key}".replace(":", "%3A") in (
        requests[1].path
    )
    assert len(harness.fake.accepted("postmark")) == 1
    (sent,) = await harness.events(model.MESSAGE_SENT, "cus_searched")
    assert after.provider_message_id is not None
    assert sent["data"]["provider_message_id"] == after.provider_message_id
    assert sent["data"]["confirmed_by"] == "search"
    assert reconciled("search") == before + 1


async def test_a_webhook_that_came_while_the_row_was_still_sending_confirms_it_once_unknown(
    harness: Harness,
) -> None:
    """The usual order: SendGrid reports ``delivered`` seconds after the send, long before the
    dead dispatcher's row is stale; the message log kept the event, and the first
    reconciliation pass after the recovery confirms the delivery from it."""
    row = await harness.crash_mid_send("cus_early")
    restarted = harness.dispatcher()
    try:
        delivered = {
            "email": "cus_early@example.com",
            "timestamp": int(T0.timestamp()),
            "event": "delivered",
            "sg_event_id": "evt-early-1",
            "sg_message_id": "sgmsg-88.filterdrecv-1",
            "idempotency_key": row.idempotency_key,
        }
        async with (
            serve(restarted.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            await post_sendgrid(http, harness.clock, [delivered])
        assert (await harness.row("cus_early")).state == "sending"  # not stale: left alone
        harness.clock.advance(timedelta(seconds=STALE + 1))
        await restarted.sender.drain()
        await restarted.sender.drain()
    finally:
        await restarted.aclose()
    after = await harness.row("cus_early")
    assert (after.state, after.provider, after.error) == ("sent", "sendgrid", None)
    assert after.unknown_since is not None
    (sent,) = await harness.events(model.MESSAGE_SENT, "cus_early")
    assert sent["data"]["provider"] == "sendgrid"
    assert sent["data"]["confirmed_by"] == "webhook"
    assert len(await harness.events(model.MESSAGE_DELIVERED, "cus_early")) == 1
    assert len(harness.fake.requests_for("sendgrid")) == 1
