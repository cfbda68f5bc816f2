"""Chargebee events → our inbound events (services/ingest/billing/chargebee.py), on Chargebee's
documented sample event (tests/fixtures/billing/chargebee/)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.ingest.billing import chargebee as mapping
from services.ingest.billing.common import BillingPayloadError
from services.ingest.reasons import normalise_reason
from shared.contracts.inbound import INBOUND

FIXTURES = Path(__file__).parents[2] / "fixtures" / "billing" / "chargebee"


def sample(**changes: Any) -> dict[str, Any]:
    """Chargebee's subscription_cancelled sample; ``changes`` go into the subscription."""
    event: dict[str, Any] = json.loads((FIXTURES / "subscription_cancelled.json").read_text())
    event["content"]["subscription"].update(changes)
    return event


def retyped(event: dict[str, Any], event_type: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event["event_type"] = event_type
    return event


def test_a_cancellation_for_non_payment_is_involuntary_with_the_items_monthly_revenue() -> None:
    mapped = mapping.map_event(sample())
    assert mapped.name == "subscription.cancelled"
    assert mapped.event_id == "ev_16BSYinK2bebavxt"
    assert mapped.occurred_at == datetime.fromtimestamp(1762406872, UTC)
    # plan 2 x 1000 + addon 500 a month; the one-off setup charge is not recurring revenue
    assert mapped.data == {
        "customer_id": "__test__XpbTXGTSRp3ELNCY",
        "reason": "not_paid",
        "mrr_minor": 2500,
        "currency": "USD",
        # the event's customer rides along: the cancellation alone says whom to write to
        "customer": {
            "email": "john@acme-test.com",
            "name": "John Doe",
            "locale": "en-US",
            "timezone": "America/New_York",
            "customer_since": datetime.fromtimestamp(1517505731, UTC).isoformat(),
        },
    }
    assert normalise_reason(mapped.data["reason"]) == "payment_failed"
    INBOUND["subscription.cancelled"].model_validate(mapped.data)


def test_the_sites_own_reason_code_is_the_raw_reason_of_a_voluntary_cancellation() -> None:
    mapped = mapping.map_event(sample(cancel_reason=None, cancel_reason_code="Too Expensive"))
    assert mapped.data["reason"] == "Too Expensive"
    assert normalise_reason(mapped.data["reason"]) == "price"


def test_a_yearly_subscription_counts_a_twelfth_and_chargebees_mrr_is_the_fallback() -> None:
    yearly = sample(billing_period_unit="year")["content"]["subscription"]
    assert mapping.mrr(yearly) == (208, "USD")  # (2000 + 500) / 12, rounded
    plain = sample(subscription_items=[], mrr=4200)["content"]["subscription"]
    assert mapping.mrr(plain) == (4200, "USD")
    cancelled = sample(subscription_items=[], mrr=0)["content"]["subscription"]
    assert mapping.mrr(cancelled) == (None, "USD")


def test_a_trial_never_activated_is_an_expired_trial() -> None:
    mapped = mapping.map_event(
        sample(activated_at=None, trial_end=1762406872, cancel_reason="no_card")
    )
    assert mapped.name == "trial.expired"
    assert mapped.data["reason"] == "no_card"
    assert mapped.data["customer"]["email"] == "john@acme-test.com"


@pytest.mark.parametrize(
    ("event_type", "status", "name"),
    [
        ("subscription_created", "active", "subscription.created"),
        ("subscription_created", "in_trial", "subscription.created"),
        ("subscription_activated", "active", "subscription.created"),
        ("subscription_reactivated", "active", "subscription.reactivated"),
        ("subscription_resumed", "active", "subscription.reactivated"),
        ("subscription_created", "future", None),
        ("payment_failed", "active", None),
        ("subscription_trial_end_reminder", "in_trial", None),
    ],
)
def test_starts_and_returns(event_type: str, status: str, name: str | None) -> None:
    mapped = mapping.map_event(retyped(sample(status=status, cancelled_at=None), event_type))
    assert mapped.name == name
    if name is not None:
        assert {k: v for k, v in mapped.data.items() if k != "customer"} == {
            "customer_id": "__test__XpbTXGTSRp3ELNCY",
            "plan": "basic-USD-monthly",
            "mrr_minor": 2500,
            "currency": "USD",
        }


def test_a_customer_is_a_profile_with_a_zone_from_the_billing_country() -> None:
    event = retyped(sample(), "customer_changed")
    event["content"]["customer"]["phone"] = "(415) 555-0132"  # local: read in the country
    mapped = mapping.map_event(event)
    assert mapped.name == "customer.updated"
    assert mapped.data == {
        "customer_id": "__test__XpbTXGTSRp3ELNCY",
        "customer": {
            "email": "john@acme-test.com",
            "name": "John Doe",
            "phone": "+14155550132",
            "locale": "en-US",
            "timezone": "America/Los_Angeles",  # the phone's area beats the country's zone
            "customer_since": datetime.fromtimestamp(1517505731, UTC).isoformat(),
        },
    }
    del event["content"]["customer"]["phone"]
    assert mapping.map_event(event).data["customer"]["timezone"] == "America/New_York"


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"event_type": "subscription_cancelled", "occurred_at": 1762406872},
        {"id": "ev_1", "event_type": "subscription_cancelled", "occurred_at": "now"},
        {"id": "ev_1", "event_type": "subscription_cancelled", "occurred_at": 1, "content": {}},
    ],
)
def test_what_is_not_a_chargebee_event_is_refused(body: Any) -> None:
    with pytest.raises(BillingPayloadError):
        mapping.map_event(body)


def test_the_merchants_own_customer_id_from_meta_data_when_configured() -> None:
    event = sample()
    event["content"]["customer"]["meta_data"] = {"app_user_id": 4242}
    mapped = mapping.map_event(event, id_key="app_user_id")
    assert mapped.data["customer_id"] == "4242"
    assert mapped.data["customer"]["email"] == "john@acme-test.com"  # still their profile
    assert mapping.map_event(event).data["customer_id"] == "__test__XpbTXGTSRp3ELNCY"
