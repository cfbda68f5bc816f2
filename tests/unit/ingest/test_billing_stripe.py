"""Stripe events → our inbound events (services/ingest/billing/stripe.py), on Stripe's own
fixtures (tests/fixtures/billing/stripe/, as stripe-mock serves them)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ingest.billing import stripe as mapping
from services.ingest.billing.common import BillingPayloadError, monthly_minor, zone_for
from shared.contracts.inbound import INBOUND

FIXTURES = Path(__file__).parents[2] / "fixtures" / "billing" / "stripe"
CREATED = 1_780_000_000  # 2026-05-28T20:26:40Z
ENDED = CREATED - 60


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def subscription(**changes: Any) -> dict[str, Any]:
    """stripe-mock's Subscription, as a cancelled one by default (no trial)."""
    sub = copy.deepcopy(fixture("subscription"))
    sub.update(
        {
            "customer": "cus_QXg1o8vcGmoR32",
            "status": "canceled",
            "trial_end": None,
            "trial_start": None,
            "canceled_at": ENDED,
            "ended_at": ENDED,
        }
    )
    sub.update(changes)
    return sub


def event(kind: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": "evt_1PqTest",
        "object": "event",
        "api_version": "2024-06-20",
        "created": CREATED,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def valid(name: str, data: dict[str, Any]) -> None:
    """What the mapping produces passes our inbound contract as it is."""
    INBOUND[name].model_validate(data)


def test_a_cancellation_carries_the_raw_reason_comment_and_monthly_revenue() -> None:
    sub = subscription(
        cancellation_details={
            "comment": "Too pricey for our team right now",
            "feedback": "too_expensive",
            "reason": "cancellation_requested",
        }
    )
    mapped = mapping.map_event(event("customer.subscription.deleted", sub))
    assert mapped.name == "subscription.cancelled"
    assert mapped.event_id == "evt_1PqTest"
    assert mapped.occurred_at == datetime.fromtimestamp(CREATED, UTC)
    assert mapped.data == {
        "customer_id": "cus_QXg1o8vcGmoR32",
        "reason": "too_expensive",
        "comment": "Too pricey for our team right now",
        "mrr_minor": 2000,  # the fixture's one item: 2000 a month, quantity 1
        "currency": "USD",
    }
    valid("subscription.cancelled", mapped.data)


def test_stripe_ending_it_after_failed_payments_is_a_payment_failed_cancellation() -> None:
    sub = subscription(
        cancellation_details={"comment": None, "feedback": None, "reason": "payment_failed"}
    )
    mapped = mapping.map_event(event("customer.subscription.deleted", sub))
    assert mapped.name == "subscription.cancelled"
    assert mapped.data["reason"] == "payment_failed"


def test_without_feedback_the_reason_is_stripes_own() -> None:
    sub = subscription(
        cancellation_details={"comment": None, "feedback": None, "reason": "cancellation_requested"}
    )
    mapped = mapping.map_event(event("customer.subscription.deleted", sub))
    assert mapped.data["reason"] == "cancellation_requested"
    assert "comment" not in mapped.data


def test_monthly_revenue_sums_items_each_normalised_to_a_month() -> None:
    sub = subscription()
    (item,) = sub["items"]["data"]
    yearly = copy.deepcopy(item)
    yearly["price"]["unit_amount"] = 12_000
    yearly["price"]["recurring"] = {"interval": "year", "interval_count": 1}
    yearly["quantity"] = 3
    metered = copy.deepcopy(item)
    metered["price"]["unit_amount"] = None  # tiered / metered: no per-unit amount
    quarterly = copy.deepcopy(item)
    quarterly["price"]["unit_amount"] = 3_000
    quarterly["price"]["recurring"] = {"interval": "month", "interval_count": 3}
    sub["items"]["data"] = [item, yearly, metered, quarterly]
    assert mapping.mrr(sub) == (2000 + 3000 + 1000, "USD")


def test_a_subscription_that_ends_with_its_trial_is_an_expired_trial() -> None:
    sub = subscription(trial_start=ENDED - 14 * 86_400, trial_end=ENDED)
    mapped = mapping.map_event(event("customer.subscription.deleted", sub))
    assert mapped.name == "trial.expired"
    assert mapped.data == {"customer_id": "cus_QXg1o8vcGmoR32"}
    # a trial long converted does not make a later cancellation an expired trial
    paid_for_months = subscription(trial_end=ENDED - 200 * 86_400)
    later = mapping.map_event(event("customer.subscription.deleted", paid_for_months))
    assert later.name == "subscription.cancelled"


def test_an_expanded_customer_gives_the_cancellation_its_profile() -> None:
    customer = {**fixture("customer"), "id": "cus_QXg1o8vcGmoR32", "email": "a@example.com"}
    mapped = mapping.map_event(
        event("customer.subscription.deleted", subscription(customer=customer))
    )
    assert mapped.data["customer_id"] == "cus_QXg1o8vcGmoR32"
    assert mapped.data["customer"]["email"] == "a@example.com"
    valid("subscription.cancelled", mapped.data)


def test_a_trial_paused_for_want_of_a_payment_method_is_an_expired_trial() -> None:
    sub = subscription(status="paused", ended_at=None, canceled_at=None)
    mapped = mapping.map_event(
        event("customer.subscription.updated", sub, previous={"status": "trialing"})
    )
    assert mapped.name == "trial.expired"


def test_a_new_or_resumed_subscription_is_a_return_with_its_plan_and_revenue() -> None:
    sub = subscription(status="active", ended_at=None, canceled_at=None)
    created = mapping.map_event(event("customer.subscription.created", sub))
    assert created.name == "subscription.created"
    assert created.data == {
        "customer_id": "cus_QXg1o8vcGmoR32",
        "plan": "prod_QXg1hqf4jFNsqG",  # no nickname or lookup key: the product
        "mrr_minor": 2000,
        "currency": "USD",
    }
    valid("subscription.created", created.data)
    resumed = mapping.map_event(event("customer.subscription.resumed", sub))
    assert resumed.name == "subscription.reactivated"
    paid = mapping.map_event(
        event("customer.subscription.updated", sub, previous={"status": "incomplete"})
    )
    assert paid.name == "subscription.created"


@pytest.mark.parametrize(
    ("kind", "status", "previous"),
    [
        ("customer.subscription.created", "incomplete", None),  # not paid yet
        ("customer.subscription.updated", "active", {"cancel_at_period_end": False}),
        ("customer.subscription.updated", "past_due", {"status": "active"}),
        ("invoice.paid", "active", None),
        ("charge.succeeded", "active", None),
    ],
)
def test_other_events_are_ignored(kind: str, status: str, previous: dict[str, Any] | None) -> None:
    sub = subscription(status=status, ended_at=None)
    mapped = mapping.map_event(event(kind, sub, previous))
    assert mapped.name is None
    assert mapped.provider_type == kind


def test_a_customer_becomes_a_profile_with_a_zone_from_the_address_country() -> None:
    customer = copy.deepcopy(fixture("customer"))
    customer.update(
        {
            "id": "cus_QXg1o8vcGmoR32",
            "email": "Aino.Virtanen@Example.FI",
            "name": "Aino Virtanen",
            "phone": "040 1234567",  # a local number: read in the address country
            "preferred_locales": ["fi-FI", "en"],
            "address": {**customer["address"], "country": "FI"},
        }
    )
    mapped = mapping.map_event(event("customer.created", customer))
    assert mapped.name == "customer.updated"
    assert mapped.data == {
        "customer_id": "cus_QXg1o8vcGmoR32",
        "customer": {
            "email": "Aino.Virtanen@Example.FI",
            "name": "Aino Virtanen",
            "phone": "+358401234567",
            "locale": "fi-FI",
            "timezone": "Europe/Helsinki",
            "customer_since": datetime.fromtimestamp(1234567890, UTC).isoformat(),
        },
    }
    valid("customer.updated", mapped.data)


def test_a_profile_field_our_contract_refuses_is_left_out_not_the_event() -> None:
    customer = copy.deepcopy(fixture("customer"))
    customer.update({"email": "not an address", "phone": "12", "name": "Ok\x00Name"})
    mapped = mapping.map_event(event("customer.updated", customer))
    assert mapped.name == "customer.updated"
    assert set(mapped.data["customer"]) == {"customer_since"}
    assert mapped.data["customer_id"] == "cus_123"


def test_the_fixture_customer_without_address_gets_no_zone() -> None:
    mapped = mapping.map_event(event("customer.updated", fixture("customer")))
    assert "timezone" not in mapped.data["customer"]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"type": "customer.subscription.deleted", "created": CREATED},
        {"id": "evt_1", "type": "customer.subscription.deleted", "created": "yesterday"},
        {"id": "evt_1", "type": "customer.subscription.deleted", "created": CREATED, "data": {}},
    ],
)
def test_what_is_not_a_stripe_event_is_refused(body: Any) -> None:
    with pytest.raises(BillingPayloadError):
        mapping.map_event(body)


@pytest.mark.parametrize(
    ("phone", "country", "zone"),
    [
        (None, "FI", "Europe/Helsinki"),
        (None, "us", "America/New_York"),
        ("+12065550100", "US", "America/Los_Angeles"),  # Seattle's area code beats the country
        (None, None, None),
        (None, "XX", None),
        (None, "Finland", None),
    ],
)
def test_zone_from_phone_area_then_country(
    phone: str | None, country: str | None, zone: str | None
) -> None:
    assert zone_for(phone, country) == zone


amounts = st.integers(min_value=0, max_value=10**9)
quantities = st.integers(min_value=0, max_value=10_000)


@given(amounts, quantities, st.integers(min_value=1, max_value=36))
def test_a_yearly_price_is_a_twelfth_a_month_and_counts_divide(
    amount: int, quantity: int, count: int
) -> None:
    assert monthly_minor(amount * 12, quantity, "year") == monthly_minor(amount, quantity, "month")
    exact = amount * quantity / count
    got = monthly_minor(amount, quantity, "month", count)
    assert got is not None
    assert abs(got - exact) <= 0.5


@given(amounts, quantities, st.sampled_from(["day", "week", "month", "year"]))
def test_monthly_revenue_grows_with_quantity_and_is_never_negative(
    amount: int, quantity: int, interval: str
) -> None:
    one = monthly_minor(amount, quantity, interval)
    more = monthly_minor(amount, quantity + 1, interval)
    assert one is not None
    assert more is not None
    assert 0 <= one <= more
    assert monthly_minor(amount, quantity, "fortnight") is None
    assert monthly_minor(amount, quantity, interval, 0) is None


def test_the_merchants_own_customer_id_from_metadata_when_configured() -> None:
    sub = subscription(metadata={"app_user_id": "user-42"})
    mine = mapping.map_event(event("customer.subscription.deleted", sub), id_key="app_user_id")
    assert mine.data["customer_id"] == "user-42"
    # not configured, or the key absent: Stripe's own id
    plain = mapping.map_event(event("customer.subscription.deleted", sub))
    assert plain.data["customer_id"] == "cus_QXg1o8vcGmoR32"
    other = mapping.map_event(event("customer.subscription.deleted", sub), id_key="crm_id")
    assert other.data["customer_id"] == "cus_QXg1o8vcGmoR32"
    customer = {**fixture("customer"), "metadata": {"app_user_id": "user-42"}}
    profile = mapping.map_event(event("customer.updated", customer), id_key="app_user_id")
    assert profile.data["customer_id"] == "user-42"
