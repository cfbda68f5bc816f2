"""Provider webhooks over real HTTP: signatures checked against independently computed
vectors (valid accepted; forged, stale and replayed refused or absorbed), provider events
deduplicated by their id, mapped to outcome events on the delivery, and hard bounces, spam
complaints and STOP replies put on the suppression list."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import DispatcherService
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import (
    T0,
    TWILIO_TOKEN,
    command,
    delivery_rows,
    dispatcher_config,
    emitted,
    seed,
    service,
    suppression_rows,
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
TWILIO_URL = "https://winback.example.com/v1/webhooks/twilio"


@dataclass
class Harness:
    svc: DispatcherService
    http: httpx.AsyncClient
    engine: AsyncEngine
    fake: FakeProviderServer
    clock: FrozenClock

    @property
    def outcomes(self) -> str:
        return self.svc.core.settings.topics.outcomes

    async def sent(self, customer: str, channel: str = "email", **profile: Any) -> Any:
        """A delivered-to-the-provider message to attach webhook events to."""
        case = await seed(self.engine, customer, **profile)
        step = "d1_sms" if channel == "sms" else "d0_we_miss_you"
        event = command(customer, case, step, channel=channel, phone=profile.get("phone"))
        items = [self.svc.pipeline.decode_payload(from_json_dict(event), None, None)]
        await self.svc.pipeline.transact_reliably(items)
        await self.svc.sender.drain()
        rows = [r for r in await delivery_rows(self.engine) if r.customer_id == customer]
        assert rows[0].state == "sent"
        return rows[0]

    async def sendgrid(
        self, events: list[dict[str, Any]], *, timestamp: int | None = None, key: Any = None
    ) -> httpx.Response:
        body = json.dumps(events).encode()
        ts = str(timestamp if timestamp is not None else int(self.clock.now().timestamp()))
        signature = (key or PRIVATE_KEY).sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
        return await self.http.post(
            "/v1/webhooks/sendgrid",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": ts,
            },
        )

    async def twilio(self, params: dict[str, str], token: str = TWILIO_TOKEN) -> httpx.Response:
        # Twilio's documented scheme, computed here independently of the code under test
        signed = TWILIO_URL + "".join(k + v for k, v in sorted(params.items()))
        digest = hmac.new(token.encode(), signed.encode(), hashlib.sha1).digest()
        return await self.http.post(
            "/v1/webhooks/twilio",
            content=urlencode(params).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": base64.b64encode(digest).decode(),
            },
        )


@pytest.fixture
async def harness(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> AsyncIterator[Harness]:
    clock = FrozenClock(T0)
    async with FakeProviderServer() as fake:
        config = dispatcher_config(
            fake,
            tmp_path,
            webhooks={
                "sendgrid_public_key": PUBLIC_KEY,
                "postmark_username": "postmark",
                "postmark_password": "hook-password",
            },
        )
        svc = service(with_dispatcher(settings, config), engine, clock)
        try:
            async with (
                serve(svc.app, lifespan="off") as url,
                httpx.AsyncClient(base_url=url) as http,
            ):
                yield Harness(svc, http, engine, fake, clock)
        finally:
            await svc.aclose()


def failures(provider: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "winback_dispatcher_webhook_signature_failures_total",
        {"provider": provider, "reason": reason},
    )
    return value or 0.0


def sendgrid_event(row: Any, event: str, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": row.command["customer"]["email"],
        "timestamp": int(T0.timestamp()),
        "event": event,
        "sg_event_id": event_id,
        "sg_message_id": f"{row.provider_message_id}.filterdrecv-5bd7d-1-5F3B-4.0",
        "idempotency_key": row.idempotency_key,
        **extra,
    }


async def test_a_signed_sendgrid_event_becomes_an_outcome_and_a_duplicate_has_no_effect(
    harness: Harness,
) -> None:
    row = await harness.sent("cus_sg")
    delivered = sendgrid_event(row, "delivered", "sg-ev-1")
    first = await harness.sendgrid([delivered])
    again = await harness.sendgrid([delivered])  # SendGrid retries: same event id
    assert first.status_code == 200
    assert first.json() == {"received": 1, "duplicates": 0, "ignored": 0}
    assert again.json()["duplicates"] == 1
    (event,) = await emitted(harness.engine, harness.outcomes, model.MESSAGE_DELIVERED)
    data = event["data"]
    assert {k: data[k] for k in ("case_id", "step_key", "customer_id", "channel")} == {
        "case_id": row.case_id,
        "step_key": row.step_key,
        "customer_id": "cus_sg",
        "channel": "email",
    }
    assert (data["provider"], data["provider_message_id"]) == ("sendgrid", row.provider_message_id)
    assert (data["template"], data["variant"], data["crm_owner"]) == (
        "we_miss_you",
        "control",
        "owner-7",
    )


async def test_sendgrid_events_match_by_message_id_when_custom_args_are_missing(
    harness: Harness,
) -> None:
    row = await harness.sent("cus_sgid")
    opened = sendgrid_event(row, "open", "sg-ev-open")
    del opened["idempotency_key"]
    assert (await harness.sendgrid([opened])).status_code == 200
    (event,) = await emitted(harness.engine, harness.outcomes, model.MESSAGE_OPENED)
    assert event["data"]["idempotency_key"] == row.idempotency_key


async def test_forged_stale_and_unsigned_sendgrid_requests_are_refused_with_401(
    harness: Harness,
) -> None:
    row = await harness.sent("cus_forged")
    event = [sendgrid_event(row, "spamreport", "sg-ev-2")]
    before = (failures("sendgrid", "invalid"), failures("sendgrid", "stale"))

    forged = await harness.sendgrid(event, key=ec.generate_private_key(ec.SECP256R1()))
    stale = await harness.sendgrid(event, timestamp=int(T0.timestamp()) - 3600)
    unsigned = await harness.http.post("/v1/webhooks/sendgrid", json=event)
    body = json.dumps(event).encode()
    ts = str(int(T0.timestamp()))
    good = base64.b64encode(
        PRIVATE_KEY.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()
    tampered = await harness.http.post(
        "/v1/webhooks/sendgrid",
        content=body.replace(b"spamreport", b"delivered "),
        headers={
            "X-Twilio-Email-Event-Webhook-Signature": good,
            "X-Twilio-Email-Event-Webhook-Timestamp": ts,
        },
    )

    for response in (forged, stale, unsigned, tampered):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 401
    assert failures("sendgrid", "invalid") == before[0] + 2
    assert failures("sendgrid", "stale") == before[1] + 1
    assert await emitted(harness.engine, harness.outcomes, model.MESSAGE_COMPLAINED) == []
    assert await suppression_rows(harness.engine) == []


async def test_a_replayed_sendgrid_request_is_absorbed_and_a_late_replay_refused(
    harness: Harness,
) -> None:
    row = await harness.sent("cus_replay")
    event = [sendgrid_event(row, "click", "sg-ev-click")]
    assert (await harness.sendgrid(event)).json()["duplicates"] == 0
    harness.clock.advance(timedelta(seconds=60))
    replay = await harness.sendgrid(event, timestamp=int(T0.timestamp()))
    assert replay.status_code == 200
    assert replay.json()["duplicates"] == 1
    harness.clock.advance(timedelta(minutes=10))
    late = await harness.sendgrid(event, timestamp=int(T0.timestamp()))
    assert late.status_code == 401
    assert len(await emitted(harness.engine, harness.outcomes, model.MESSAGE_CLICKED)) == 1


async def test_a_hard_bounce_suppresses_the_address_and_a_soft_one_does_not(
    harness: Harness,
) -> None:
    hard = await harness.sent("cus_hard")
    soft = await harness.sent("cus_soft")
    response = await harness.sendgrid(
        [
            sendgrid_event(hard, "bounce", "sg-b1", type="bounce", status="5.1.1"),
            sendgrid_event(soft, "bounce", "sg-b2", type="blocked", status="4.0.0"),
            sendgrid_event(soft, "processed", "sg-p1"),
        ]
    )
    assert response.json() == {"received": 3, "duplicates": 0, "ignored": 1}
    bounced = await emitted(harness.engine, harness.outcomes, model.MESSAGE_BOUNCED)
    assert {e["data"]["customer_id"]: e["data"]["reason"] for e in bounced} == {
        "cus_hard": "hard bounce (5.1.1)",
        "cus_soft": "soft bounce (4.0.0)",
    }
    (suppressed,) = await suppression_rows(harness.engine)
    assert suppressed.address_hash == model.address_hash("email", "cus_hard@example.com")


async def test_postmark_needs_its_credentials_and_a_spam_complaint_suppresses(
    harness: Harness,
) -> None:
    row = await harness.sent("cus_pm")
    complaint = {
        "RecordType": "SpamComplaint",
        "ID": 42,
        "MessageID": "4e2a2f8b-0000-4000-8000-000000000001",
        "Email": "cus_pm@example.com",
        "BouncedAt": T0.isoformat(),
        "Metadata": {"idempotency_key": row.idempotency_key},
    }
    wrong = await harness.http.post(
        "/v1/webhooks/postmark", json=complaint, auth=("postmark", "not-the-password")
    )
    missing = await harness.http.post("/v1/webhooks/postmark", json=complaint)
    assert (wrong.status_code, missing.status_code) == (401, 401)
    assert await suppression_rows(harness.engine) == []

    ok = await harness.http.post(
        "/v1/webhooks/postmark", json=complaint, auth=("postmark", "hook-password")
    )
    twice = await harness.http.post(
        "/v1/webhooks/postmark", json=complaint, auth=("postmark", "hook-password")
    )
    assert ok.status_code == 200
    assert twice.json()["duplicates"] == 1
    (event,) = await emitted(harness.engine, harness.outcomes, model.MESSAGE_COMPLAINED)
    assert event["data"]["case_id"] == row.case_id
    (suppressed,) = await suppression_rows(harness.engine)
    assert (suppressed.reason, suppressed.customer_id) == ("spam complaint", "cus_pm")


async def test_twilio_callbacks_are_verified_and_a_stop_reply_unsubscribes(
    harness: Harness,
) -> None:
    number = "+358405556667"
    row = await harness.sent("cus_tw", channel="sms", phone=number, consent={"sms": True})
    delivered = {
        "MessageSid": row.provider_message_id,
        "MessageStatus": "delivered",
        "To": number,
        "AccountSid": "AC" + "7" * 32,
    }
    assert (await harness.twilio(delivered)).status_code == 200
    forged = await harness.twilio(delivered, token="someone-elses-token")
    assert forged.status_code == 401
    stopped = {**delivered, "MessageStatus": "undelivered", "ErrorCode": "21610"}
    assert (await harness.twilio(stopped)).status_code == 200

    assert len(await emitted(harness.engine, harness.outcomes, model.MESSAGE_DELIVERED)) == 1
    (unsubscribed,) = await emitted(harness.engine, harness.outcomes, model.CUSTOMER_UNSUBSCRIBED)
    assert unsubscribed["data"]["customer_id"] == "cus_tw"
    assert unsubscribed["data"]["channel"] == "sms"
    hashes = {r.address_hash for r in await suppression_rows(harness.engine)}
    assert model.address_hash("sms", number) in hashes
    assert model.customer_key_hash("sms", "cus_tw") in hashes


async def test_an_unconfigured_webhook_answers_404(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    async with FakeProviderServer() as fake:
        config = dispatcher_config(fake, tmp_path, sms={"primary": {"kind": "file"}})
        svc = service(with_dispatcher(settings, config), engine, FrozenClock(T0))
        async with serve(svc.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
            for provider in ("sendgrid", "postmark", "twilio"):
                response = await http.post(f"/v1/webhooks/{provider}", content=b"[]")
                assert response.status_code == 404, provider
        await svc.aclose()
