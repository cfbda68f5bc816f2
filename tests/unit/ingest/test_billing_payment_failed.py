"""Involuntary churn end to end in the pure parts: each provider's way of saying "ended after
failed payments" becomes the reason ``payment_failed``, and every segment with that reason gets
the payment_failed track, which never offers a discount."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.billing import chargebee, stripe
from services.ingest.reasons import normalise_reason
from services.scheduler.domain.loader import load_playbooks
from services.scheduler.domain.model import Segment
from services.scheduler.domain.planning import choose_playbook
from shared.churn import CHURN_REASONS
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

ROOT = Path(__file__).parents[3]
PLAYBOOKS = load_playbooks(
    ROOT / "services" / "scheduler" / "playbooks", templates=TEMPLATE_NAMES, offers=OFFERS
)
FIXTURES = ROOT / "tests" / "fixtures" / "billing"


def stripe_dunned() -> dict[str, Any]:
    sub: dict[str, Any] = json.loads((FIXTURES / "stripe" / "subscription.json").read_text())
    sub.update(
        {
            "status": "canceled",
            "trial_end": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": "payment_failed"},
        }
    )
    return {
        "id": "evt_dunned",
        "type": "customer.subscription.deleted",
        "created": 1_780_000_000,
        "data": {"object": sub},
    }


def chargebee_not_paid() -> dict[str, Any]:
    event: dict[str, Any] = json.loads(
        (FIXTURES / "chargebee" / "subscription_cancelled.json").read_text()
    )
    return event


@pytest.mark.parametrize(
    "mapped",
    [stripe.map_event(stripe_dunned()), chargebee.map_event(chargebee_not_paid())],
    ids=["stripe", "chargebee"],
)
def test_each_providers_involuntary_churn_normalises_to_payment_failed(mapped: Any) -> None:
    assert mapped.name == "subscription.cancelled"
    assert normalise_reason(mapped.data["reason"]) == "payment_failed"


def test_payment_failed_is_part_of_the_shared_vocabulary() -> None:
    assert "payment_failed" in CHURN_REASONS
    for words in ("payment_failed", "Payment failed", "card declined twice"):
        assert normalise_reason(words) == "payment_failed"


def test_every_payment_failed_segment_gets_its_own_track_without_a_discount() -> None:
    for value, engagement, tenure, rechurn in itertools.product(
        ["high", "medium", "low", "unknown"],
        ["high", "medium", "low", "unknown"],
        ["new", "established", "long_term", "unknown"],
        [False, True],
    ):
        segment = Segment(
            lifecycle="churned_customer",
            reason="payment_failed",
            value_tier=value,  # type: ignore[arg-type]
            engagement=engagement,  # type: ignore[arg-type]
            tenure=tenure,  # type: ignore[arg-type]
            is_rechurn=rechurn,
        )
        chosen = choose_playbook(PLAYBOOKS, segment)
        assert chosen is not None
        assert chosen.name == "payment_failed", segment
        assert not any(step.is_discount or step.offer for step in chosen.steps)
