"""Right before a send the dispatcher looks again: a closed case, withdrawn consent or a
suppressed address stops the message (``message.suppressed`` with the reason). Also: a
message that cannot be rendered fails naming the field, GDPR erasure, and the embedded file
provider end to end through Kafka."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model, store
from services.dispatcher.bootstrap import DispatcherService
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.db.tables import cases
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import (
    T0,
    command,
    delivery_rows,
    emitted,
    seed,
    send_commands,
    service,
    started,
    suppression_rows,
    with_dispatcher,
)
from tests.support.services import eventually

pytestmark = pytest.mark.integration


async def accept(svc: DispatcherService, *events: dict[str, Any]) -> None:
    items = [svc.pipeline.decode_payload(from_json_dict(e), None, None) for e in events]
    await svc.pipeline.transact_reliably(items)


async def suppressed_reasons(svc: DispatcherService, engine: AsyncEngine) -> dict[str, str]:
    events = await emitted(engine, svc.core.settings.topics.outcomes, model.MESSAGE_SUPPRESSED)
    return {e["data"]["customer_id"]: e["data"]["reason"] for e in events}


async def test_a_case_closed_after_the_command_gets_nothing(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_back")
    await accept(dispatcher, command("cus_back", case))
    async with engine.begin() as conn:  # the customer came back a second ago
        await conn.execute(update(cases).where(cases.c.id == case).values(status="closed"))
    await dispatcher.sender.drain()
    assert not fake.requests
    (row,) = await delivery_rows(engine)
    assert (row.state, row.error) == ("suppressed", "case closed")
    assert await suppressed_reasons(dispatcher, engine) == {"cus_back": "case closed"}


@pytest.mark.parametrize(
    ("profile", "channel", "reason"),
    [
        ({"consent": {"email": False}}, "email", "consent withdrawn for email"),
        ({"opted_out_all": True}, "email", "customer opted out of all messages"),
        ({"phone": "+358401112223"}, "sms", "no consent recorded for sms"),
    ],
)
async def test_withdrawn_consent_stops_the_send(
    dispatcher: DispatcherService,
    engine: AsyncEngine,
    fake: FakeProviderServer,
    profile: dict[str, Any],
    channel: str,
    reason: str,
) -> None:
    case = await seed(engine, "cus_consent", **profile)
    step = {"email": ("d0_we_miss_you", "we_miss_you"), "sms": ("d1_sms", "we_miss_you")}
    key, template = step[channel]
    await accept(
        dispatcher,
        command(
            "cus_consent", case, key, channel=channel, template=template, phone="+358401112223"
        ),
    )
    await dispatcher.sender.drain()
    assert not fake.requests
    assert await suppressed_reasons(dispatcher, engine) == {"cus_consent": reason}


async def test_a_suppressed_address_is_not_sent_to(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_bounced")
    other = await seed(engine, "cus_fine")
    async with engine.begin() as conn:
        await store.add_suppressions(
            conn,
            [
                store.Suppression(
                    "email",
                    model.address_hash("email", " CUS_BOUNCED@example.com "),
                    "hard bounce",
                    None,
                )
            ],
            T0,
        )
    await accept(dispatcher, command("cus_bounced", case), command("cus_fine", other))
    await dispatcher.sender.drain()
    assert await suppressed_reasons(dispatcher, engine) == {
        "cus_bounced": "suppressed: hard bounce"
    }
    (request,) = fake.requests_for("sendgrid")
    assert request.json["personalizations"][0]["to"] == [{"email": "cus_fine@example.com"}]


async def test_a_customer_without_a_name_is_sent_the_message_greeted_without_one(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_noname", name=None)
    await accept(dispatcher, command("cus_noname", case, name=None))
    await dispatcher.sender.drain()
    (request,) = fake.requests_for("sendgrid")
    text, html = (c["value"] for c in request.json["content"])
    assert text.startswith("Hi there,\n")
    assert "<p>Hi there,</p>" in html
    assert request.json["subject"] == "We miss you at Acme Analytics"
    (row,) = await delivery_rows(engine)
    assert row.state == "sent"
    topic = dispatcher.core.settings.topics.outcomes
    assert len(await emitted(engine, topic, model.MESSAGE_SENT)) == 1


async def test_a_missing_template_field_fails_the_message_naming_it(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_nooffer")
    await accept(dispatcher, command("cus_nooffer", case, template="special_offer", offer=None))
    await dispatcher.sender.drain()
    assert not fake.requests
    (row,) = await delivery_rows(engine)
    assert row.state == "failed"
    (failed,) = await emitted(
        engine, dispatcher.core.settings.topics.outcomes, model.MESSAGE_FAILED
    )
    assert failed["data"]["reason"] == (
        "template 'special_offer' (email) is missing field(s): offer, valid_until"
    )


async def test_the_rendered_email_carries_one_click_unsubscribe_and_the_visible_link(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_render")
    await accept(
        dispatcher,
        command(
            "cus_render", case, offer="free_month", template="special_offer", step_key="d7_offer"
        ),
    )
    await dispatcher.sender.drain()
    (request,) = fake.requests_for("sendgrid")
    body = request.json
    header = body["headers"]["List-Unsubscribe"]
    assert header.startswith("<https://winback.example.com/u/1.")
    assert header.endswith(">, <mailto:unsubscribe@acme.example>")
    assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = header[1 : header.index(">")]
    text, html = (c["value"] for c in body["content"])
    assert url in text
    assert url in html
    claim = dispatcher.tokens.verify(url.rsplit("/", 1)[1])
    assert (claim.customer_id, claim.channel) == ("cus_render", "email")
    assert "Mannerheimintie 1" in text
    assert "free month" in text.lower()
    assert "utm_campaign=special_offer" in text
    assert "@" not in str(body["custom_args"])
    (row,) = await delivery_rows(engine)
    assert row.subject == body["subject"]


async def test_erasure_suppresses_the_addresses_and_forgets_the_contact_points(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_gone")
    await accept(dispatcher, command("cus_gone", case))
    await dispatcher.sender.drain()
    await accept(
        dispatcher, command("cus_gone", case, "d3_what_you_missed", template="what_you_missed")
    )
    erased = {
        "specversion": "1.0",
        "id": "erase-1",
        "source": "/winback/scheduler",
        "type": de.CUSTOMER_ERASED,
        "data": {
            "customer_id": "cus_gone",
            "address_hashes": {"email": model.address_hash("email", "cus_gone@example.com")},
            "erased_at": T0.isoformat(),
        },
    }
    await accept(dispatcher, erased)
    await dispatcher.sender.drain()
    sent, queued = await delivery_rows(engine)
    assert sent.state == "sent"
    assert (queued.state, queued.error) == ("suppressed", "customer erased")
    for row in (sent, queued):
        assert row.subject is None
        assert row.body is None
        customer = row.command["customer"]
        assert (customer["email"], customer["phone"], customer["name"]) == (None, None, None)
        assert "example.com" not in orjson.dumps(row.command).decode()
    (suppressed,) = await suppression_rows(engine)
    assert (suppressed.channel, suppressed.reason) == ("email", "erased")
    assert len(fake.requests_for("sendgrid")) == 1
    assert await suppressed_reasons(dispatcher, engine) == {"cus_gone": "customer erased"}


async def test_the_embedded_file_provider_writes_an_eml_with_every_header(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Default settings (file providers), real broker: a command becomes a .eml file."""
    folder = tmp_path / "messages"
    configured = with_dispatcher(
        settings,
        {
            "email": {"primary": {"kind": "file", "directory": str(folder)}},
            "public_base_url": "https://winback.example.com",
            "poll_seconds": 0.02,
        },
    )
    case = await seed(engine, "cus_file")
    svc = service(configured, engine, FrozenClock(T0), sender_loop=True)
    async with started(svc):
        await send_commands(configured, command("cus_file", case))
        rows = await eventually(
            lambda: delivery_rows(engine), lambda rows: bool(rows) and rows[0].state == "sent"
        )
    (row,) = rows
    (path,) = (folder / "email").glob("*.eml")
    assert path.stem == row.provider_message_id
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "cus_file@example.com"
    assert message["List-Unsubscribe"].startswith("<https://winback.example.com/u/1.")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["X-Winback-Idempotency-Key"] == f"{case}:d0_we_miss_you"
    assert message["Message-ID"] == f"<{row.provider_message_id}@example.com>"
    assert message["Date"]
    assert message["Subject"] == row.subject
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    assert text is not None
    assert "Unsubscribe" in text.get_content()
    assert message.get_body(("html",)) is not None


async def test_a_crm_step_becomes_a_hubspot_task_for_the_account_owner(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_crm", mrr_minor=24900)
    await accept(
        dispatcher,
        command("cus_crm", case, "d2_call", channel="crm", template="crm_personal_outreach"),
    )
    await dispatcher.sender.drain()
    (request,) = fake.accepted("hubspot")
    properties = request.json["properties"]
    assert properties["hubspot_owner_id"] == "owner-7"
    assert properties["winback_idempotency_key"] == f"{case}:d2_call"
    assert properties["hs_timestamp"] == "2026-05-05T09:00:00.000Z"  # due a day later
    assert "€249.00" in properties["hs_task_body"]
    assert "high value" in properties["hs_task_body"]
    # associated with the contact found by the customer's email
    contact = fake.hubspot_contacts["cus_crm@example.com"]
    assert request.json["associations"][0]["to"] == {"id": contact}
    assert "Email: cus_crm@example.com" in properties["hs_task_body"]
    (row,) = await delivery_rows(engine)
    assert (row.state, row.provider, row.provider_message_id) == ("sent", "hubspot", "1")


HELSINKI_DAY = {"start": "09:00", "end": "20:00", "timezone": "Europe/Helsinki"}


async def test_a_late_delivery_waits_for_the_customers_send_window(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    clock = dispatcher.core.clock
    assert isinstance(clock, FrozenClock)
    # the scheduler fired it at 19:58 in Helsinki; the dispatcher only gets to it at 23:00
    # (a backlog, or retry rounds through a provider outage)
    late = datetime(2026, 5, 4, 20, 0, tzinfo=UTC)  # 23:00 EEST
    clock.set(late)
    case = await seed(engine, "cus_night")
    await accept(dispatcher, command("cus_night", case, send_window=HELSINKI_DAY))
    assert await dispatcher.sender.drain() == 0
    (row,) = await delivery_rows(engine)
    opens = datetime(2026, 5, 5, 6, 0, tzinfo=UTC)  # 09:00 EEST next morning
    assert (row.state, row.not_before, row.attempts) == ("queued", opens, 0)
    assert not fake.requests
    clock.set(opens - timedelta(minutes=1))
    assert await dispatcher.sender.drain() == 0  # still quiet hours: not even claimed
    clock.set(opens)
    assert await dispatcher.sender.drain() == 1
    (row,) = await delivery_rows(engine)
    assert row.state == "sent"
    assert len(fake.accepted("sendgrid")) == 1


async def test_a_delivery_a_little_past_the_window_still_goes(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    clock = dispatcher.core.clock
    assert isinstance(clock, FrozenClock)
    clock.set(datetime(2026, 5, 4, 17, 5, tzinfo=UTC))  # 20:05 EEST: within the 15 min grace
    case = await seed(engine, "cus_late")
    await accept(dispatcher, command("cus_late", case, send_window=HELSINKI_DAY))
    assert await dispatcher.sender.drain() == 1
    (row,) = await delivery_rows(engine)
    assert row.state == "sent"


async def test_an_expired_step_is_suppressed_not_sent(
    dispatcher: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    case = await seed(engine, "cus_old")
    await accept(
        dispatcher,
        command("cus_old", case, send_window=HELSINKI_DAY, expires_at=T0 - timedelta(seconds=1)),
    )
    await dispatcher.sender.drain()
    (row,) = await delivery_rows(engine)
    assert row.state == "suppressed"
    assert not fake.requests
    reasons = await suppressed_reasons(dispatcher, engine)
    assert reasons == {"cus_old": "step expired before it could be sent"}
