"""From a dispatch command to a rendered message: context, recipient, unsubscribe, tags."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from services.dispatcher.compose import Composer, Profile
from services.dispatcher.errors import PermanentSendError, UnknownChannelError
from services.dispatcher.rendering import Brand, Channel, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared.clock import FrozenClock

NOW = datetime(2026, 5, 4, 21, 30, tzinfo=UTC)
KEY = b"k" * 32


@pytest.fixture(scope="module")
def renderer() -> TemplateRenderer:
    return TemplateRenderer(Brand("Acme Oy", "Mannerheimintie 1, Helsinki"))


@pytest.fixture
def composer(renderer: TemplateRenderer) -> Composer:
    return Composer(
        renderer,
        UnsubscribeTokens([KEY], FrozenClock(NOW)),
        public_base_url="https://winback.example.com/",
        product="Acme Analytics",
        cta_url="https://app.acme.example/back?ref=mail",
        highlights=["Faster reports"],
        unsubscribe_mailto="unsubscribe@acme.example",
        crm_default_owner="owner-default",
    )


def command(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "idempotency_key": "case-1:d7",
        "case_id": "case-1",
        "step_id": 1234567,
        "step_key": "d7",
        "channel": "email",
        "template": "special_offer",
        "variant": "b",
        "offer": "free_month",
        "valid_until": "2026-05-18T21:30:00+00:00",
        "customer": {
            "id": "cus_1",
            "email": "aino@example.com",
            "phone": "+358401234567",
            "name": "Aino",
            "locale": "fi-FI",
            "timezone": "Europe/Helsinki",
            "crm_owner": None,
        },
        "reason": "price",
        "features": [],
    }
    data.update(changes)
    return data


def test_an_email_gets_its_unsubscribe_link_headers_and_safe_tags(composer: Composer) -> None:
    message = composer.compose(command(), Profile(), NOW)
    assert message.to == "aino@example.com"
    assert message.content.locale == "fi"
    headers = message.list_unsubscribe_headers()
    url = message.unsubscribe_url
    assert url is not None
    assert url.startswith("https://winback.example.com/u/1.")
    assert headers["List-Unsubscribe"] == f"<{url}>, <mailto:unsubscribe@acme.example>"
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert url in message.content.text
    assert message.content.html is not None
    assert url in message.content.html
    claim = composer.tokens.verify(url.rsplit("/", 1)[1])
    assert (claim.customer_id, claim.channel) == ("cus_1", "email")
    assert message.tags == {
        "customer_id": "cus_1",
        "case_id": "case-1",
        "step_key": "d7",
        "step_id": "1234567",
        "template": "special_offer",
        "variant": "b",
    }


def test_the_context_fills_in_product_highlights_and_the_local_offer_date(
    composer: Composer,
) -> None:
    ctx = composer.context(command(), Profile(), "email")
    # 21:30 UTC on 18 May is already 19 May in Helsinki
    assert ctx["valid_until"] == date(2026, 5, 19)
    assert ctx["product"] == "Acme Analytics"
    assert ctx["new_features"] == ["Faster reports"]
    assert ctx["cta_url"] == (
        "https://app.acme.example/back?ref=mail&utm_source=winback&utm_medium=email"
        "&utm_campaign=special_offer&utm_content=b"
    )
    named = composer.context(command(features=["SSO login"]), Profile(), "email")
    assert named["new_features"] == ["SSO login"]


def test_a_missing_name_degrades_to_a_greeting_without_one(composer: Composer) -> None:
    customer = {**command()["customer"], "name": None}
    nameless = composer.compose(command(customer=customer), Profile(), NOW)
    assert nameless.content.subject == "Erikoistarjous sinulle"
    assert nameless.content.text.startswith("Hei,\n")
    assert nameless.to == "aino@example.com"
    # the scheduler's profile can fill the gap
    message = composer.compose(command(customer=customer), Profile(name="Aino P."), NOW)
    assert "Aino P." in message.content.text


@pytest.mark.parametrize(
    ("channel", "field", "what"),
    [("email", "email", "email address"), ("sms", "phone", "phone number")],
)
def test_no_address_is_a_permanent_error(
    composer: Composer, channel: str, field: str, what: str
) -> None:
    customer = {**command()["customer"], field: None}
    with pytest.raises(PermanentSendError, match=what):
        composer.compose(
            command(channel=channel, template="we_miss_you", customer=customer), Profile(), NOW
        )


def test_an_sms_has_no_unsubscribe_header_and_goes_to_the_number(composer: Composer) -> None:
    message = composer.compose(
        command(channel="sms", template="we_miss_you", offer=None), Profile(), NOW
    )
    assert message.channel is Channel.SMS
    assert message.to == "+358401234567"
    assert message.unsubscribe_url is None
    assert message.list_unsubscribe_headers() == {}


def test_a_crm_task_has_owner_due_date_and_the_customers_value(composer: Composer) -> None:
    profile = Profile(
        mrr_minor=24900,
        currency="eur",
        segment={"labels": ["high_value", "low_engagement"], "reason": "price"},
    )
    message = composer.compose(
        command(channel="crm", template="crm_personal_outreach"), profile, NOW
    )
    assert message.crm_task is not None
    assert message.crm_task.owner_id == "owner-default"
    assert message.crm_task.due_at == NOW + timedelta(hours=24)
    assert "249,00" in message.content.text  # fi locale formats the money
    assert "high value, low engagement" in message.content.text
    assert composer.context(command(channel="crm"), profile, "crm")["mrr"] == Decimal("249.00")


def test_a_crm_task_without_any_owner_fails(composer: Composer) -> None:
    composer.crm_default_owner = None
    with pytest.raises(PermanentSendError, match="CRM owner"):
        composer.compose(
            command(channel="crm", template="crm_personal_outreach"),
            Profile(mrr_minor=100, currency="EUR", segment={"reason": "price"}),
            NOW,
        )


def test_tags_never_carry_an_address(composer: Composer) -> None:
    customer = {**command()["customer"], "id": "aino@example.com"}
    message = composer.compose(command(customer=customer), Profile(), NOW)
    assert "customer_id" not in message.tags
    assert all("@" not in v for v in message.tags.values())


@pytest.mark.parametrize("channel", ["fax", "", "Email"])
def test_an_unknown_channel_is_refused_for_good_not_sent_like_a_webhook(
    composer: Composer, channel: str
) -> None:
    with pytest.raises(UnknownChannelError, match="unknown channel") as caught:
        composer.compose(command(channel=channel), Profile(), NOW)
    assert isinstance(caught.value, PermanentSendError)
    assert caught.value.channel == channel
