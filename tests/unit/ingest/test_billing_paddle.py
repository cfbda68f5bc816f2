"""Paddle Billing notifications → our inbound events (services/ingest/billing/paddle.py), on the
Paddle SDK's own fixtures (tests/fixtures/billing/paddle/)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from paddle_billing.Entities.Notifications import (  # type: ignore[import-untyped]
    NotificationEvent,
)

from services.ingest.billing import paddle as mapping
from services.ingest.billing.common import BillingPayloadError
from shared.contracts.inbound import INBOUND

FIXTURES = Path(__file__).parents[2] / "fixtures" / "billing" / "paddle"
OCCURRED = "2024-04-12T11:24:55.061812Z"


def data(event_type: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{event_type}.json").read_text())
    return loaded


def notification(event_type: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The notification Paddle posts: the envelope around the entity."""
    return {
        "event_id": "evt_01hv8x2acma2gz5my3fsc7jwqm",
        "event_type": event_type,
        "occurred_at": OCCURRED,
        "notification_id": "ntf_01hv8x2af8hbyyt8bk1cjbmtkr",
        "data": payload if payload is not None else data(event_type),
    }


@pytest.mark.parametrize(
    "event_type",
    [
        "subscription.canceled",
        "subscription.created",
        "subscription.activated",
        "subscription.resumed",
        "subscription.trialing",
        "customer.created",
        "address.updated",
    ],
)
def test_the_fixtures_are_what_the_sdk_reads(event_type: str) -> None:
    event = NotificationEvent.from_dict(notification(event_type))
    assert event.event_type == event_type
    assert event.data.to_dict()["id"] == data(event_type)["id"]


def test_a_cancellation_carries_the_monthly_revenue_of_its_recurring_items() -> None:
    mapped = mapping.map_event(notification("subscription.canceled"))
    assert mapped.name == "subscription.cancelled"
    assert mapped.event_id == "evt_01hv8x2acma2gz5my3fsc7jwqm"
    assert mapped.occurred_at == datetime(2024, 4, 12, 11, 24, 55, 61812, tzinfo=UTC)
    # 20 seats x 3000 + 1 x 10000 + 1 x 25000, all monthly
    assert mapped.data == {
        "customer_id": "ctm_01hv6y1jedq4p1n0yqn5ba3ky4",
        "mrr_minor": 95_000,
        "currency": "USD",
    }
    INBOUND["subscription.cancelled"].model_validate(mapped.data)


def test_a_reason_the_merchant_keeps_in_custom_data_is_used() -> None:
    sub = data("subscription.canceled")
    sub["custom_data"] = {"cancellation_reason": "too_expensive", "cancellation_comment": "Pricey"}
    mapped = mapping.map_event(notification("subscription.canceled", sub))
    assert (mapped.data["reason"], mapped.data["comment"]) == ("too_expensive", "Pricey")


def test_a_yearly_price_counts_a_twelfth() -> None:
    sub = data("subscription.canceled")
    sub["items"] = sub["items"][:1]
    sub["items"][0]["price"]["billing_cycle"] = {"interval": "year", "frequency": 1}
    sub["items"][0]["price"]["unit_price"]["amount"] = "36000"
    sub["items"][0]["quantity"] = 1
    assert mapping.mrr(sub) == (3000, "USD")
    sub["items"][0]["recurring"] = False
    assert mapping.mrr(sub) == (None, "USD")


def test_a_subscription_cancelled_before_it_was_ever_billed_is_an_expired_trial() -> None:
    sub = data("subscription.trialing")
    sub.update({"status": "canceled", "canceled_at": "2024-04-26T11:30:29.637000Z"})
    mapped = mapping.map_event(notification("subscription.canceled", sub))
    assert mapped.name == "trial.expired"
    assert mapped.data == {"customer_id": sub["customer_id"]}


@pytest.mark.parametrize(
    ("event_type", "name"),
    [
        ("subscription.created", "subscription.created"),
        ("subscription.activated", "subscription.created"),
        ("subscription.resumed", "subscription.reactivated"),
    ],
)
def test_new_activated_and_resumed_subscriptions_are_returns(event_type: str, name: str) -> None:
    mapped = mapping.map_event(notification(event_type))
    assert mapped.name == name
    assert mapped.data["customer_id"] == "ctm_01hv6y1jedq4p1n0yqn5ba3ky4"
    assert mapped.data["plan"] == "AeroEdit Pro"
    assert mapped.data["currency"] == "USD"
    INBOUND[name].model_validate(mapped.data)


def test_a_customer_is_a_profile_and_an_address_gives_the_zone() -> None:
    customer = mapping.map_event(notification("customer.created"))
    assert customer.name == "customer.updated"
    assert customer.data == {
        "customer_id": "ctm_01hv6y1jedq4p1n0yqn5ba3ky4",
        "customer": {
            "email": "jo@example.com",
            "name": "Jo Brown",
            "locale": "en",
            "customer_since": "2024-04-11T15:57:24.813000+00:00",
        },
    }
    address = data("address.updated")
    address["country_code"] = "FI"
    zoned = mapping.map_event(notification("address.updated", address))
    assert zoned.data == {
        "customer_id": "ctm_01hv6y1jedq4p1n0yqn5ba3ky4",
        "customer": {"timezone": "Europe/Helsinki"},
    }


def test_other_notifications_are_ignored() -> None:
    for event_type, payload in (
        ("subscription.trialing", data("subscription.trialing")),
        ("subscription.past_due", data("subscription.canceled")),
        ("transaction.completed", {"id": "txn_1"}),
    ):
        assert mapping.map_event(notification(event_type, payload)).name is None
    created = copy.deepcopy(data("subscription.created"))
    created["status"] = "paused"
    assert mapping.map_event(notification("subscription.created", created)).name is None


@pytest.mark.parametrize(
    "body",
    [
        "x",
        {"event_type": "subscription.canceled", "occurred_at": OCCURRED},
        {"event_id": "evt_1", "event_type": "subscription.canceled", "occurred_at": "yesterday"},
        {"event_id": "evt_1", "event_type": "subscription.canceled", "occurred_at": OCCURRED},
    ],
)
def test_what_is_not_a_paddle_notification_is_refused(body: Any) -> None:
    with pytest.raises(BillingPayloadError):
        mapping.map_event(body)


def test_the_merchants_own_customer_id_from_custom_data_when_configured() -> None:
    address = data("address.updated")  # its custom_data holds {"crm_id": "08bcfb7a-…"}
    address["country_code"] = "FI"
    mapped = mapping.map_event(notification("address.updated", address), id_key="crm_id")
    assert mapped.data["customer_id"] == "08bcfb7a-41d8-4747-9ade-3d885c287d0f"
    cancelled = mapping.map_event(notification("subscription.canceled"), id_key="crm_id")
    assert cancelled.data["customer_id"] == "ctm_01hv6y1jedq4p1n0yqn5ba3ky4"  # none there
