"""The error hierarchy, Retry-After parsing and the shapes adapters build (no network)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from services.dispatcher.errors import (
    CircuitOpenError,
    DeliveryFailedError,
    FailedAttempt,
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TemplateError,
    TransientSendError,
)
from services.dispatcher.providers import (
    CrmTaskDetails,
    HubSpotTaskProvider,
    OutboundMessage,
    PostmarkProvider,
    Provider,
    SendGridProvider,
    TwilioProvider,
    WebhookProvider,
    parse_retry_after,
)
from services.dispatcher.rendering import Channel, RenderedMessage

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def test_hierarchy() -> None:
    assert issubclass(TransientSendError, SendError)
    assert issubclass(CircuitOpenError, TransientSendError)
    assert issubclass(PermanentSendError, SendError)
    assert issubclass(ProviderConfigurationError, PermanentSendError)
    assert issubclass(TemplateError, PermanentSendError)
    assert ProviderConfigurationError("x").provider_fault
    assert not PermanentSendError("x").provider_fault
    assert not TemplateError("x").suppress


def test_error_text_names_provider_status_and_code() -> None:
    error = PermanentSendError(
        "recipient replied STOP", provider="twilio", status_code=400, error_code="21610"
    )
    assert str(error) == "[twilio] recipient replied STOP (HTTP 400) (code 21610)"


def test_delivery_failed_needs_attempts_and_reads_the_last_one() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DeliveryFailedError([])
    config = ProviderConfigurationError("bad token", provider="sendgrid")
    refused = PermanentSendError("inactive", provider="postmark", suppress=True)
    error = DeliveryFailedError(
        [FailedAttempt("sendgrid", 1, config), FailedAttempt("postmark", 1, refused)]
    )
    assert error.permanent
    assert error.suppress
    assert error.retry_after is None
    only_config = DeliveryFailedError([FailedAttempt("sendgrid", 1, config)])
    assert not only_config.permanent  # our account is broken, not the message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-5", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def rendered(channel: Channel = Channel.EMAIL) -> RenderedMessage:
    return RenderedMessage("special_offer", channel, "en", "Subject", "Text body", "<p>HTML</p>")


@pytest.mark.parametrize(
    "tags",
    [{"customer_id": "aino@example.com"}, {"phone": "+358401234567"}, {"bad key!": "x"}],
)
def test_outbound_message_refuses_pii_in_tags(tags: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="tag"):
        OutboundMessage("k1", Channel.EMAIL, "a@example.com", rendered(), tags=tags)


def test_list_unsubscribe_headers_follow_rfc_8058() -> None:
    message = OutboundMessage(
        "k1",
        Channel.EMAIL,
        "a@example.com",
        rendered(),
        unsubscribe_url="https://w.example/u/t",
        unsubscribe_mailto="unsub@w.example",
    )
    assert message.list_unsubscribe_headers() == {
        "List-Unsubscribe": "<https://w.example/u/t>, <mailto:unsub@w.example>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert (
        OutboundMessage("k1", Channel.EMAIL, "a@b.example", rendered()).list_unsubscribe_headers()
        == {}
    )


async def test_every_adapter_satisfies_the_provider_protocol() -> None:
    async with httpx.AsyncClient() as client:
        adapters: list[Provider] = [
            SendGridProvider(client, api_key="k", from_email="w@example.com"),
            PostmarkProvider(client, server_token="t", from_address="w@example.com"),
            TwilioProvider(client, account_sid="AC1", auth_token="t", from_number="+15005550006"),
            HubSpotTaskProvider(client, access_token="t"),
            WebhookProvider(client, url="https://hooks.example/x", secret=b"s" * 16),
        ]
        assert all(isinstance(a, Provider) for a in adapters)
        assert [a.channel for a in adapters] == [
            Channel.EMAIL,
            Channel.EMAIL,
            Channel.SMS,
            Channel.CRM,
            Channel.WEBHOOK,
        ]


async def test_adapters_refuse_undeliverable_recipients_before_calling() -> None:
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as client:
        email = SendGridProvider(
            client, api_key="k", from_email="w@example.com", base_url="http://127.0.0.1:9"
        )
        sms = TwilioProvider(client, account_sid="AC1", auth_token="t", from_number="+15005550006")
        with pytest.raises(PermanentSendError) as bad_email:
            await email.send(OutboundMessage("k", Channel.EMAIL, "not-an-address", rendered()))
        with pytest.raises(PermanentSendError) as bad_number:
            await sms.send(OutboundMessage("k", Channel.SMS, "040 123 4567", rendered(Channel.SMS)))
    assert bad_email.value.suppress
    assert bad_number.value.suppress


async def test_twilio_refuses_an_oversized_body_and_needs_one_sender() -> None:
    async with httpx.AsyncClient() as client:
        sms = TwilioProvider(client, account_sid="AC1", auth_token="t", messaging_service_sid="MG1")
        long = RenderedMessage("x", Channel.SMS, "en", None, "x" * 1601, None)
        with pytest.raises(PermanentSendError, match="1601"):
            sms.build_request(OutboundMessage("k", Channel.SMS, "+358401234567", long))
        with pytest.raises(ValueError, match="exactly one"):
            TwilioProvider(client, account_sid="AC1", auth_token="t")


async def test_hubspot_needs_task_details_and_sends_utc_time() -> None:
    async with httpx.AsyncClient() as client:
        hubspot = HubSpotTaskProvider(client, access_token="t")
    # build_request makes no call: the client may be closed
    content = RenderedMessage("crm_personal_outreach", Channel.CRM, "en", "Call", "a\n<b>", None)
    with pytest.raises(PermanentSendError, match="crm_task"):
        hubspot.build_request(OutboundMessage("k", Channel.CRM, "101", content))
    due = datetime(2026, 5, 4, 15, 30, tzinfo=UTC).astimezone()
    body = hubspot.build_request(
        OutboundMessage("k", Channel.CRM, "101", content, crm_task=CrmTaskDetails("77", due))
    )
    properties = body["properties"]
    assert isinstance(properties, dict)
    assert properties["hs_timestamp"] == "2026-05-04T15:30:00.000Z"
    assert properties["hs_task_body"] == "a<br>&lt;b&gt;"
    with pytest.raises(ValueError, match="timezone-aware"):
        CrmTaskDetails("77", datetime(2026, 5, 4, 15, 30))
