"""Dispatch commands, the re-check before a send, and suppression keys: pure decisions."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.dispatcher.model import (
    OUTCOME_MODELS,
    Delivery,
    DispatchCommand,
    SendState,
    address_hash,
    cause_of,
    customer_key_hash,
    outcome,
    parse_command,
    recheck,
    send_timing,
    suppression_keys,
)
from services.dispatcher.webhooks import KIND_TYPES
from services.scheduler.store import address_hash as scheduler_address_hash
from shared import domain_events as de
from shared.channels import ChannelSpec, registered
from shared.contracts import examples, registry
from shared.errors import InvalidEvent

_HELSINKI = ZoneInfo("Europe/Helsinki")


EXAMPLE = examples.PUBLISHED["dispatch.requested"]


def command(**changes: Any) -> dict[str, Any]:
    """A dispatch command as the scheduler writes it (the contract's example), without a send
    window or expiry unless given."""
    data: dict[str, Any] = copy.deepcopy(EXAMPLE)
    del data["send_window"], data["expires_at"]
    data.update(
        idempotency_key="case-1:d0",
        case_id="case-1",
        step_id=4,
        step_key="d0",
        channel="email",
        template="we_miss_you",
        variant="control",
        offer=None,
        customer={**EXAMPLE["customer"], "id": "cus_1", "email": "a@example.com"}
        | {"crm_owner": "o-1"},
        features=[],
    )
    data.update(changes)
    return data


def test_a_valid_command_is_read_whole() -> None:
    parsed = parse_command(command())
    assert parsed == DispatchCommand(
        idempotency_key="case-1:d0",
        case_id="case-1",
        step_key="d0",
        customer_id="cus_1",
        channel="email",
        template="we_miss_you",
        variant="control",
        crm_owner="o-1",
        data=command(),
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"idempotency_key": ""}, "data.idempotency_key"),
        ({"case_id": None}, "data.case_id"),
        ({"step_key": "x" * 101}, "data.step_key"),
        ({"channel": "pigeon"}, "data.channel"),
        ({"template": 3}, "data.template"),
        ({"customer": "cus_1"}, "data.customer"),
        ({"customer": {"email": "a@example.com"}}, "data.customer.id"),
        ({"features": "Dashboards"}, "data.features"),
        ({"offer": 50}, "data.offer"),
        ({"customer": {**EXAMPLE["customer"], "phone": 5}}, "data.customer.phone"),
        ({"playbook_version": 0}, "data.playbook_version"),
        ({"requested_at": "yesterday"}, "data.requested_at"),
    ],
)
def test_a_bad_command_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_command(command(**changes))
    assert info.value.code == "invalid_payload"
    assert info.value.field == field


def test_empty_variant_and_owner_read_as_none_and_unknown_fields_are_dropped() -> None:
    """A newer scheduler may add a field: the command is still taken (tolerant decoding)."""
    data = command(variant="", customer={**command()["customer"], "crm_owner": ""}, new=1)
    parsed = parse_command(data)
    assert (parsed.variant, parsed.crm_owner) == (None, None)
    assert parsed.data == data


def test_a_command_for_a_channel_registered_beyond_the_builtins_is_taken() -> None:
    push = ChannelSpec(
        name="push_test",
        address_field=None,
        template_dir="push",
        template_parts=("txt",),
        provider_kinds=("push",),
        suppressible=False,
        unsubscribe_link=False,
    )
    with pytest.raises(InvalidEvent) as info:
        parse_command(command(channel="push_test"))
    assert info.value.field == "data.channel"
    assert "unknown channel" in info.value.reason
    with registered(push):
        assert parse_command(command(channel="push_test")).channel == "push_test"


def test_the_stored_event_reference_becomes_the_cause_of_outcomes() -> None:
    cause = cause_of({"_event": {"id": "e1", "source": "/s", "correlation": "corr-9"}})
    assert cause is not None
    assert (cause.id, cause.source, cause.correlation_id) == ("e1", "/s", "corr-9")
    assert cause_of({}) is None


OPEN = SendState(case_status="open", customer_found=True, consent={})
DEFAULTS = ("email", "crm")


@pytest.mark.parametrize(
    ("state", "channel", "reason"),
    [
        (OPEN, "email", None),
        (OPEN, "crm", None),
        (SendState(case_status=None, customer_found=True), "email", "case not found"),
        (SendState(case_status="closed", customer_found=True), "email", "case closed"),
        (SendState(case_status="paused", customer_found=True), "email", "case paused"),
        (SendState(case_status="open", customer_found=False), "email", "customer not found"),
        (SendState("open", True, erased=True), "email", "customer erased"),
        (
            SendState("open", True, opted_out_all=True),
            "email",
            "customer opted out of all messages",
        ),
        (SendState("open", True, consent={"email": False}), "email", "consent withdrawn for email"),
        (SendState("open", True, consent={}), "sms", "no consent recorded for sms"),
        (SendState("open", True, consent={"sms": True}), "sms", None),
        (
            SendState("open", True, suppressed_channels=["email"]),
            "email",
            "email suppressed for this customer",
        ),
        (
            SendState("open", True, suppressed_reason="hard bounce"),
            "email",
            "suppressed: hard bounce",
        ),
    ],
)
def test_the_recheck_before_a_send(state: SendState, channel: str, reason: str | None) -> None:
    assert recheck(channel, state, DEFAULTS) == reason


@given(st.sampled_from(["email", "sms"]), st.text(min_size=1, max_size=60))
def test_address_hashes_equal_the_schedulers(channel: str, address: str) -> None:
    """An erasure's hashes (computed by the scheduler) must meet ours."""
    assert address_hash(channel, address) == scheduler_address_hash(channel, address)


def test_email_hashes_ignore_case_and_spaces_but_phone_hashes_keep_digits() -> None:
    assert address_hash("email", " A@Example.COM ") == address_hash("email", "a@example.com")
    assert address_hash("sms", "+358401") != address_hash("sms", "+358402")
    assert address_hash("email", "x") != address_hash("sms", "x")


def test_suppression_keys_hold_the_customer_and_the_address() -> None:
    assert suppression_keys("email", "cus_1", "a@example.com") == [
        customer_key_hash("email", "cus_1"),
        address_hash("email", "a@example.com"),
    ]
    assert suppression_keys("crm", "cus_1", None) == [customer_key_hash("crm", "cus_1")]
    assert customer_key_hash("email", "cus_1") != customer_key_hash("sms", "cus_1")


# --- the send window and expiry at send time --------------------------------------------------

WINDOW = {"start": "09:00", "end": "20:00", "timezone": "Europe/Helsinki"}
GRACE = timedelta(minutes=15)


def at(hour: int, minute: int = 0, day: int = 4) -> datetime:
    """A UTC instant in May 2026 (Helsinki is UTC+3)."""
    return datetime(2026, 5, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (at(9), None),  # 12:00 local
        (at(16, 59), None),  # 19:59 local
        (at(17, 14), None),  # 20:14 local: within the grace after closing
        (at(17, 16), at(6, day=5)),  # 20:16 local: held until 09:00 tomorrow
        (at(23), at(6, day=5)),  # 02:00 local the next day: held until 09:00 that day
        (at(5, 59), at(6)),  # 08:59 local: held a minute
    ],
)
def test_a_delivery_outside_the_send_window_is_held_until_it_opens(
    now: datetime, expected: datetime | None
) -> None:
    assert send_timing(command(send_window=WINDOW), now, GRACE) == expected


def test_no_window_means_any_time_and_expiry_still_applies() -> None:
    assert send_timing(command(), at(23), GRACE) is None
    expired = command(expires_at=at(10).isoformat())
    assert send_timing(expired, at(10), GRACE) == "step expired before it could be sent"
    assert send_timing(expired, at(9, 59), GRACE) is None


def test_a_step_that_expires_before_the_window_opens_is_never_held() -> None:
    closing = command(send_window=WINDOW, expires_at=at(5, day=5).isoformat())
    assert send_timing(closing, at(23), GRACE) == (
        "step expires before the customer's send window opens"
    )


@given(st.datetimes(timezones=st.just(UTC)))
def test_a_hold_is_always_a_later_moment_inside_the_window(now: datetime) -> None:
    held = send_timing(command(send_window=WINDOW), now, timedelta(0))
    if held is None:
        assert 9 <= now.astimezone(_HELSINKI).hour < 20
    else:
        assert isinstance(held, datetime)
        assert held > now
        local = held.astimezone(_HELSINKI)  # 09:00 always exists there (DST moves at 03:00)
        assert (local.hour, local.minute, local.second) == (9, 0, 0)
        assert held - now <= timedelta(hours=14)


@pytest.mark.parametrize(
    ("window", "field"),
    [
        ({**WINDOW, "timezone": "Mars/Olympus"}, "data.send_window.timezone"),
        ({**WINDOW, "start": "9am"}, "data.send_window.start"),
        ({**WINDOW, "start": "21:00"}, "data.send_window.end"),
        ("09-20", "data.send_window"),
    ],
)
def test_a_bad_send_window_is_named(window: object, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_command(command(send_window=window))
    assert info.value.field == field


def test_a_bad_expiry_is_named() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_command(command(expires_at="next tuesday"))
    assert info.value.field == "data.expires_at"


# --- outcome events, built with their contracts ------------------------------------------------

DELIVERY = Delivery(
    id=1,
    idempotency_key="case-1:d0",
    case_id="case-1",
    step_key="d0",
    customer_id="cus_1",
    channel="email",
    template="we_miss_you",
    variant="control",
    crm_owner=None,
    command={"step_id": 4, "playbook": "price_discount"},
)


@pytest.mark.parametrize("type", [*de.MESSAGE_OUTCOMES, de.CUSTOMER_UNSUBSCRIBED])
def test_every_outcome_is_built_with_its_registered_model_and_passes_it_strictly(
    type: str,
) -> None:
    built = outcome(type, DELIVERY, provider="sendgrid", provider_message_id="m-1", reason="why")
    assert isinstance(built, registry.PUBLISHED[type].model)
    data = built.to_data()
    assert registry.decode(type, data, tolerant=False).to_data() == data
    assert data == {
        "idempotency_key": "case-1:d0",
        "case_id": "case-1",
        "step_key": "d0",
        "step_id": 4,
        "customer_id": "cus_1",
        "channel": "email",
        "provider": "sendgrid",
        "provider_message_id": "m-1",
        "template": "we_miss_you",
        "variant": "control",
        "crm_owner": None,
        "playbook": "price_discount",
        "reason": "why",
    }


def test_an_outcome_writes_a_reason_only_when_given_and_a_webhook_report_always() -> None:
    sent = outcome(de.MESSAGE_SENT, DELIVERY, provider="sendgrid", provider_message_id="m-1")
    assert "reason" not in sent.to_data()
    assert "occurred_at" not in sent.to_data()
    opened = outcome(
        de.MESSAGE_OPENED,
        DELIVERY,
        provider="sendgrid",
        provider_message_id="m-1",
        reported=(None, "sg-event-9"),
    ).to_data()
    assert (opened["occurred_at"], opened["provider_event_id"]) == (None, "sg-event-9")
    assert "reason" not in opened


def test_an_outcome_refuses_what_its_contract_does_not_declare() -> None:
    with pytest.raises(KeyError):
        outcome(de.CASE_CLOSED, DELIVERY, provider=None, provider_message_id=None)
    with pytest.raises(ValidationError, match="unknown channel"):
        outcome(
            de.MESSAGE_SENT,
            replace(DELIVERY, channel="pigeon"),
            provider=None,
            provider_message_id=None,
        )


def test_every_type_the_webhooks_and_the_sender_emit_has_its_contract() -> None:
    assert set(KIND_TYPES.values()) <= set(OUTCOME_MODELS)
    assert set(OUTCOME_MODELS) == {*de.MESSAGE_OUTCOMES, de.CUSTOMER_UNSUBSCRIBED}
