"""Helpers for tests that run the dispatcher (its fixtures are in tests/integration/conftest.py).

A dispatcher wired to the fake provider server, rows the re-check reads (the scheduler's
customer view and cases), dispatch commands on the real broker, and readers for what the
dispatcher wrote (deliveries, suppressions, outbox)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import DispatcherService, bootstrap
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.db.tables import cases, deliveries, outbox, scheduler_customers, suppressions
from shared.settings import DispatcherSettings, Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.kafka import produce
from tests.support.services import running

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
ACCOUNT_SID = "AC" + "7" * 32
TWILIO_TOKEN = "twilio-auth-token-for-tests"
WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"
UNSUBSCRIBE_KEY = "unsubscribe-key-for-tests-0123456789abcdef"


def dispatcher_config(server: FakeProviderServer, files: Path, **overrides: Any) -> dict[str, Any]:
    """Every channel on the fake: email SendGrid → Postmark, SMS Twilio, CRM HubSpot, webhook;
    fast retries (one round) so failures show quickly."""
    base = server.base_url
    config: dict[str, Any] = {
        "email": {
            "primary": {
                "kind": "sendgrid",
                "base_url": base,
                "api_key": "SG.test-key",
                "from_address": "hello@acme.example",
            },
            "secondary": {
                "kind": "postmark",
                "base_url": base,
                "api_key": "pm-test-token",
                "from_address": "hello@acme.example",
            },
        },
        "sms": {
            "primary": {
                "kind": "twilio",
                "base_url": base,
                "account_sid": ACCOUNT_SID,
                "api_key": TWILIO_TOKEN,
                "from_address": "+15005550006",
            }
        },
        "crm": {
            "primary": {
                "kind": "hubspot",
                "base_url": base,
                "api_key": "hubspot-test-token",
                "idempotency_property": "winback_idempotency_key",
            }
        },
        "webhook": {
            "primary": {
                "kind": "webhook",
                "base_url": server.webhook_url,
                "api_key": WEBHOOK_SECRET,
            }
        },
        "public_base_url": "https://winback.example.com",
        "unsubscribe_keys": [UNSUBSCRIBE_KEY],
        "unsubscribe_mailto": "unsubscribe@acme.example",
        "company_name": "Acme Oy",
        "postal_address": "Mannerheimintie 1, 00100 Helsinki, Finland",
        "product_name": "Acme Analytics",
        "http": {"clients": 2, "connect_timeout": 1.0, "read_timeout": 2.0},
        "retry": {
            "max_attempts": 2,
            "base_delay": 0.01,
            "max_delay": 0.05,
            "max_retry_after": 1.0,
            "rounds": 1,
        },
        "circuit": {"consecutive_failures": 50, "failure_ratio": None, "cooldown_seconds": 30},
        "stale_sending_seconds": 60,
        "poll_seconds": 0.02,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    # the file provider (when a test picks it) writes under the test's own folder
    for channel in ("email", "sms", "crm", "webhook"):
        for position in ("primary", "secondary"):
            provider = config[channel].get(position)
            if isinstance(provider, dict) and provider.get("kind", "file") == "file":
                provider.setdefault("directory", str(files))
    return config


def with_dispatcher(settings: Settings, config: dict[str, Any]) -> Settings:
    return settings.model_copy(
        update={"dispatcher": DispatcherSettings.model_validate(config), "environment": "test"}
    )


def service(
    settings: Settings,
    engine: AsyncEngine,
    clock: FrozenClock,
    *,
    sender_loop: bool = False,
) -> DispatcherService:
    """A dispatcher; without ``sender_loop`` the test drives ``sender.drain()`` itself."""
    svc = bootstrap(settings, engine=engine, clock=clock)
    if not sender_loop:
        svc.core.runtime.extra_parts = [
            p for p in svc.core.runtime.extra_parts if p[0] != "delivery-sender"
        ]
    return svc


@asynccontextmanager
async def started(svc: DispatcherService) -> AsyncIterator[DispatcherService]:
    try:
        async with running(svc.core.runtime):
            yield svc
    finally:
        await svc.aclose()


async def seed(
    engine: AsyncEngine,
    customer_id: str,
    *,
    case_id: str | None = None,
    case_status: str = "open",
    email: str | None = None,
    phone: str | None = None,
    name: str | None = "Aino",
    consent: dict[str, bool] | None = None,
    opted_out_all: bool = False,
    crm_owner: str | None = "owner-7",
    mrr_minor: int = 4900,
) -> str:
    """The scheduler's rows the re-check reads: the customer view and an open case."""
    case_id = case_id or str(uuid.uuid4())
    async with engine.begin() as conn:
        await conn.execute(
            scheduler_customers.insert().values(
                id=customer_id,
                email=email if email is not None else f"{customer_id}@example.com",
                phone=phone,
                name=name,
                locale="en",
                timezone="Europe/Helsinki",
                mrr_minor=mrr_minor,
                currency="EUR",
                crm_owner=crm_owner,
                consent=consent or {},
                opted_out_all=opted_out_all,
            )
        )
        await conn.execute(
            cases.insert().values(
                id=case_id,
                customer_id=customer_id,
                episode_id=f"ep-{case_id}",
                status=case_status,
                playbook="price_discount",
                playbook_version=1,
                segment={
                    "lifecycle": "subscription_cancelled",
                    "reason": "price",
                    "labels": ["high_value"],
                },
                episode={"reason": "price"},
                churned_at=T0 - timedelta(days=1),
                opened_at=T0 - timedelta(days=1),
                expires_at=T0 + timedelta(days=365),
            )
        )
    return case_id


def command(
    customer_id: str,
    case_id: str,
    step_key: str = "d0_we_miss_you",
    *,
    channel: str = "email",
    template: str = "we_miss_you",
    event_id: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    name: str | None = "Aino",
    offer: str | None = None,
    send_window: dict[str, str] | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """A ``dispatch.requested`` CloudEvent as the scheduler writes it."""
    data = {
        "idempotency_key": f"{case_id}:{step_key}",
        "case_id": case_id,
        "step_id": 11,
        "step_key": step_key,
        "playbook": "price_discount",
        "playbook_version": 1,
        "channel": channel,
        "template": template,
        "offer": offer,
        "is_discount": offer is not None,
        "variant": "control",
        "valid_until": (T0 + timedelta(days=14)).isoformat() if offer else None,
        "customer": {
            "id": customer_id,
            "email": email if email is not None else f"{customer_id}@example.com",
            "phone": phone,
            "name": name,
            "locale": "en-GB",
            "timezone": "Europe/Helsinki",
            "plan": "pro",
            "crm_owner": "owner-7",
        },
        "reason": "price",
        "features": ["Dashboards"],
        "feature_description": None,
        "requested_at": T0.isoformat(),
    }
    if send_window is not None:
        data["send_window"] = send_window
    if expires_at is not None:
        data["expires_at"] = expires_at.isoformat()
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": "/winback/scheduler",
        "type": de.DISPATCH_REQUESTED,
        "time": T0.isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }


async def send_commands(settings: Settings, *events: dict[str, Any]) -> None:
    await produce(
        settings.kafka.bootstrap_servers,
        settings.topics.dispatch,
        [
            (
                e["data"]["customer"]["id"].encode(),
                orjson.dumps(e),
                [("content-type", b"application/cloudevents+json")],
            )
            for e in events
        ],
    )


async def delivery_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(await conn.execute(deliveries.select().order_by(deliveries.c.id)))


async def suppression_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(await conn.execute(suppressions.select()))


async def emitted(engine: AsyncEngine, topic: str, type: str | None = None) -> list[dict[str, Any]]:
    """Events the dispatcher wrote to the outbox for ``topic`` (in order)."""
    async with engine.connect() as conn:
        values = (
            await conn.execute(
                select(outbox.c.value).where(outbox.c.topic == topic).order_by(outbox.c.id)
            )
        ).scalars()
        events = [orjson.loads(v) for v in values]
    return [e for e in events if type is None or e["type"] == type]
