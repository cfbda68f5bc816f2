"""The backfill's pure parts: a canceled subscription read as its webhook event, who is left
alone, the checkpoint file and the progress line."""

from __future__ import annotations

import copy
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.ingest.billing import backfill
from services.ingest.billing import stripe as stripe_mapping
from services.ingest.billing.common import BillingPayloadError
from shared.contracts.inbound import INBOUND

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "billing" / "stripe"
ENDED = 1_790_000_000  # 2026-09-21


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return value


def canceled(**changes: Any) -> dict[str, Any]:
    """Stripe's Subscription fixture, canceled at ``ENDED`` after its trial, customer expanded."""
    sub = fixture("subscription")
    customer = fixture("customer")
    customer.update({"address": {**customer["address"], "country": "FI"}, "email": "a@b.fi"})
    sub.update(
        {
            "status": "canceled",
            "trial_end": None,
            "canceled_at": ENDED,
            "ended_at": ENDED,
            "customer": customer,
            "cancellation_details": {
                "comment": "too dear",
                "feedback": "too_expensive",
                "feedback_option": None,
                "reason": "cancellation_requested",
            },
        }
    )
    sub.update(changes)
    return sub


def test_a_canceled_subscription_maps_as_its_deleted_webhook_does() -> None:
    sub = canceled()
    mapped = backfill.map_canceled_subscription(copy.deepcopy(sub))
    webhook = stripe_mapping.map_event(
        {
            "id": "evt_1",
            "type": "customer.subscription.deleted",
            "created": ENDED,
            "data": {"object": copy.deepcopy(sub)},
        }
    )
    assert mapped.event_id == "backfill:stripe:sub_123:cancelled"
    assert mapped.occurred_at == datetime.fromtimestamp(ENDED, UTC)
    assert (mapped.name, mapped.data) == (webhook.name, webhook.data)
    assert mapped.name == "subscription.cancelled"
    assert mapped.data["reason"] == "too_expensive"
    assert mapped.data["customer"]["timezone"] == "Europe/Helsinki"
    INBOUND["subscription.cancelled"].model_validate(mapped.data)


def test_the_webhooks_own_event_id_and_time_are_used_while_stripe_keeps_the_event() -> None:
    mapped = backfill.map_canceled_subscription(canceled(), "evt_9", ENDED + 3)
    assert mapped.event_id == "evt_9"
    assert mapped.occurred_at == datetime.fromtimestamp(ENDED + 3, UTC)


def test_the_end_time_is_ended_at_else_canceled_at() -> None:
    assert backfill.ended_at(canceled(ended_at=None, canceled_at=ENDED - 5)) == ENDED - 5
    with pytest.raises(BillingPayloadError, match="ended_at"):
        backfill.map_canceled_subscription(canceled(ended_at=None, canceled_at=None))
    with pytest.raises(BillingPayloadError):
        backfill.map_canceled_subscription(["not", "a", "subscription"])


def test_a_subscription_ended_in_its_trial_is_an_expired_trial() -> None:
    mapped = backfill.map_canceled_subscription(canceled(trial_end=ENDED))
    assert mapped.name == "trial.expired"


def test_a_customer_with_another_live_subscription_is_active_again() -> None:
    def with_subscriptions(*subs: dict[str, Any]) -> dict[str, Any]:
        sub = canceled()
        sub["customer"]["subscriptions"] = {"object": "list", "data": list(subs)}
        return sub

    assert backfill.active_again(with_subscriptions({"id": "sub_other", "status": "active"}))
    assert backfill.active_again(with_subscriptions({"id": "sub_other", "status": "trialing"}))
    # the canceled one itself (stripe-mock lists it as active), or another one that ended
    assert not backfill.active_again(with_subscriptions({"id": "sub_123", "status": "active"}))
    assert not backfill.active_again(with_subscriptions({"id": "sub_2", "status": "canceled"}))
    assert not backfill.active_again(canceled(customer="cus_1"))  # not expanded


def test_the_checkpoint_round_trips_and_a_broken_file_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "stripe.json"
    checkpoint = backfill.Checkpoint(path)
    assert checkpoint.load() == backfill.State()
    started = datetime(2026, 11, 1, tzinfo=UTC)
    since = datetime(2025, 11, 1, tzinfo=UTC)
    state = backfill.State(
        after="sub_9",
        counts=backfill.Counts(read=5, published=3, before_since=2),
        since=since,
        started_at=started,
        covered=[(datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))],
    )
    checkpoint.save(state)
    loaded = checkpoint.load()
    assert loaded.after == "sub_9"
    assert (loaded.counts.read, loaded.counts.published, loaded.counts.before_since) == (5, 3, 2)
    assert (loaded.since, loaded.started_at) == (since, started)
    assert loaded.finished_at is None
    assert loaded.covered == state.covered
    assert [p.name for p in path.parent.iterdir()] == ["stripe.json"]  # no temporary left
    path.write_text("{not json")
    assert checkpoint.load() == backfill.State()


def test_a_checkpoint_is_per_account_and_topic_and_never_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_CACHE_DIR", str(tmp_path))
    one = backfill.checkpoint_path("stripe", "sk_live_secret1", "billing")
    assert one.parent == tmp_path / "backfill"
    assert "sk_live" not in str(one)
    assert one != backfill.checkpoint_path("stripe", "sk_live_secret2", "billing")
    assert one != backfill.checkpoint_path("stripe", "sk_live_secret1", "other")
    assert one != backfill.checkpoint_path("paddle", "sk_live_secret1", "billing")


def test_a_run_publishes_from_since_except_what_a_finished_run_published() -> None:
    since = datetime(2025, 6, 1, tzinfo=UTC)
    earlier = (datetime(2025, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    window = backfill.Window(since, (earlier,))
    assert window.skip(since - timedelta(seconds=1)) == "before_since"
    assert window.skip(since) is None  # before what the earlier run covered
    assert window.skip(datetime(2025, 10, 31, 23, tzinfo=UTC)) is None
    assert window.skip(earlier[0]) == "earlier_run"
    assert window.skip(earlier[1] - backfill.OVERLAP - timedelta(seconds=1)) == "earlier_run"
    # its last day again (a subscription that ended just before it may not have been listed)
    assert window.skip(earlier[1] - backfill.OVERLAP) is None
    assert window.skip(earlier[1] + timedelta(days=3)) is None
    assert window.skip(None) is None  # no end time: the mapping refuses it, naming why


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar_with_counts_and_eta() -> None:
    stream = Tty()
    now = [0.0]
    show = backfill.progress_to(stream, "stripe", clock=lambda: now[0])
    counts = backfill.Counts(total=400)
    show(counts, False)
    counts.read, counts.published, counts.before_since = 100, 90, 10
    now[0] = 10.0  # 10 subscriptions a second: 300 left is 30 s
    show(counts, False)
    line = stream.getvalue().split("\r")[-1]
    assert "[#######" in line
    assert "100/400" in line
    assert "90 published, 10 skipped" in line
    assert "ETA 0:00:30" in line
    show(counts, True)
    assert stream.getvalue().endswith("\n")


def test_progress_elsewhere_is_one_count_line_per_page() -> None:
    stream = io.StringIO()
    show = backfill.progress_to(stream, "stripe", clock=lambda: 1.0)
    counts = backfill.Counts()  # no total: no bar, no ETA
    show(counts, False)
    counts.read, counts.published = 100, 100
    show(counts, False)
    show(counts, True)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "backfill stripe: 0 read, 0 published, 0 skipped, 0.0/s",
        "backfill stripe: 100 read, 100 published, 0 skipped, 0.0/s",
    ]
