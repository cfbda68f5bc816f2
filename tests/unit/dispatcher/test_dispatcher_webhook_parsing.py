"""Provider webhook payloads → provider events: what each provider's event means for us."""

from __future__ import annotations

from typing import Any

import pytest

from services.dispatcher.webhooks import (
    IGNORED,
    ProviderEvent,
    parse_postmark,
    parse_sendgrid,
    parse_twilio,
)


def sendgrid(event: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": "a@example.com",
        "timestamp": 1777888000,
        "event": event,
        "sg_event_id": f"ev-{event}",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filterdrecv-p3mdw1-756b7-18-5F5FC1BC-4.0",
        "idempotency_key": "case-1:d0",
        **extra,
    }


@pytest.mark.parametrize(
    ("raw", "kind", "suppress", "reason"),
    [
        (sendgrid("processed"), IGNORED, False, None),
        (sendgrid("deferred"), IGNORED, False, None),
        (sendgrid("delivered"), "delivered", False, None),
        (sendgrid("open"), "opened", False, None),
        (sendgrid("click", url="https://x"), "clicked", False, None),
        (sendgrid("bounce", type="bounce", status="5.1.1"), "bounced", True, "hard bounce (5.1.1)"),
        (sendgrid("bounce", type="blocked"), "bounced", False, "soft bounce"),
        (sendgrid("spamreport"), "complained", True, None),
        (sendgrid("unsubscribe"), "unsubscribed", True, "SendGrid unsubscribe"),
        (sendgrid("group_unsubscribe"), "unsubscribed", True, "SendGrid group unsubscribe"),
        (
            sendgrid("dropped", reason="Bounced Address"),
            "failed",
            True,
            "dropped by SendGrid: Bounced Address",
        ),
        (
            sendgrid("dropped", reason="Exceeded daily quota"),
            "failed",
            False,
            "dropped by SendGrid: Exceeded daily quota",
        ),
    ],
)
def test_sendgrid_events(
    raw: dict[str, Any], kind: str, suppress: bool, reason: str | None
) -> None:
    (event,) = parse_sendgrid([raw])
    assert (event.kind, event.suppress, event.reason) == (kind, suppress, reason)
    assert event.event_id == raw["sg_event_id"]
    assert event.idempotency_key == "case-1:d0"
    assert event.address == "a@example.com"
    assert event.channel == "email"
    # SendGrid's message id is the X-Message-Id we stored, plus a suffix
    assert "14c5d75ce93.dfd.64b469" in event.message_ids


def test_a_sendgrid_event_without_an_id_gets_a_stable_one() -> None:
    raw = sendgrid("open")
    del raw["sg_event_id"]
    assert parse_sendgrid([raw])[0].event_id == parse_sendgrid([dict(raw)])[0].event_id


@pytest.mark.parametrize("payload", [{}, [{"email": "a@example.com"}], "x"])
def test_a_sendgrid_body_of_the_wrong_shape_is_refused(payload: Any) -> None:
    with pytest.raises(ValueError, match="SendGrid"):
        parse_sendgrid(payload)


POSTMARK_ID = "883953f4-6105-42a2-a16a-77a8eac79483"


@pytest.mark.parametrize(
    ("payload", "kind", "suppress"),
    [
        ({"RecordType": "Delivery", "Recipient": "a@example.com"}, "delivered", False),
        (
            {"RecordType": "Bounce", "ID": 1, "Type": "HardBounce", "Email": "a@x.io"},
            "bounced",
            True,
        ),
        (
            {"RecordType": "Bounce", "ID": 2, "Type": "SoftBounce", "Email": "a@x.io"},
            "bounced",
            False,
        ),
        (
            {"RecordType": "Bounce", "ID": 3, "Type": "Transient", "Inactive": True},
            "bounced",
            True,
        ),
        ({"RecordType": "SpamComplaint", "ID": 4, "Email": "a@x.io"}, "complained", True),
        ({"RecordType": "Open", "ReceivedAt": "2026-05-04T10:00:00Z"}, "opened", False),
        ({"RecordType": "Click", "OriginalLink": "https://x"}, "clicked", False),
        (
            {
                "RecordType": "SubscriptionChange",
                "SuppressSending": True,
                "SuppressionReason": "ManualSuppression",
            },
            "unsubscribed",
            True,
        ),
        ({"RecordType": "SubscriptionChange", "SuppressSending": False}, IGNORED, False),
        ({"RecordType": "Inbound"}, IGNORED, False),
    ],
)
def test_postmark_events(payload: dict[str, Any], kind: str, suppress: bool) -> None:
    payload = {
        "MessageID": POSTMARK_ID,
        "Metadata": {"idempotency_key": "case-1:d0"},
        **payload,
    }
    (event,) = parse_postmark(payload)
    assert (event.kind, event.suppress) == (kind, suppress)
    assert event.message_ids == (POSTMARK_ID,)
    assert event.idempotency_key == "case-1:d0"
    assert event.event_id


def test_postmark_event_ids_tell_repeats_from_new_events() -> None:
    bounce = {"RecordType": "Bounce", "ID": 7, "MessageID": POSTMARK_ID, "Type": "HardBounce"}
    assert parse_postmark(bounce)[0].event_id == parse_postmark(dict(bounce))[0].event_id
    first = {"RecordType": "Open", "MessageID": POSTMARK_ID, "ReceivedAt": "2026-05-04T10:00:00Z"}
    later = {**first, "ReceivedAt": "2026-05-05T10:00:00Z"}
    assert parse_postmark(first)[0].event_id != parse_postmark(later)[0].event_id


@pytest.mark.parametrize(
    ("form", "kind", "suppress"),
    [
        ({"MessageStatus": "queued"}, IGNORED, False),
        ({"MessageStatus": "sent"}, IGNORED, False),
        ({"MessageStatus": "delivered"}, "delivered", False),
        ({"MessageStatus": "undelivered", "ErrorCode": "30003"}, "bounced", False),
        ({"MessageStatus": "failed", "ErrorCode": "30006"}, "bounced", True),
        ({"MessageStatus": "undelivered", "ErrorCode": "21610"}, "unsubscribed", True),
    ],
)
def test_twilio_status_callbacks(form: dict[str, str], kind: str, suppress: bool) -> None:
    (event,) = parse_twilio({"MessageSid": "SM1", "To": "+358401234567", **form}, None)
    assert (event.kind, event.suppress) == (kind, suppress)
    assert event.channel == "sms"
    assert event.message_ids == ("SM1",)
    assert event.address == "+358401234567"


def test_twilio_callbacks_are_deduplicated_by_its_idempotency_token_or_sid_and_status() -> None:
    form = {"MessageSid": "SM1", "MessageStatus": "delivered"}
    assert parse_twilio(form, "tok-1")[0].event_id == "tok-1"
    assert (
        parse_twilio(form, None)[0].event_id
        != parse_twilio({**form, "MessageStatus": "undelivered"}, None)[0].event_id
    )
    with pytest.raises(ValueError, match="MessageSid"):
        parse_twilio({"MessageStatus": "delivered"}, None)


def test_provider_events_survive_the_trip_through_a_cloudevent() -> None:
    (event,) = parse_sendgrid([sendgrid("bounce", type="bounce")])
    assert ProviderEvent.from_data(event.to_data()) == event
