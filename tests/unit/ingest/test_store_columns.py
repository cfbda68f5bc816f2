"""The customers and episodes as the batch statements take them: one list per column."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from services.ingest import events as ev
from services.ingest import store
from services.ingest.customer import CustomerState, Draft, OpenEpisode, apply
from shared.contracts.inbound import INBOUND

T0 = datetime(2026, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)


def test_customer_columns_are_the_upserts_columns_in_the_customers_order() -> None:
    first = CustomerState(
        id="c1",
        profile={"plan": "pro", "mrr_minor": 4900, "customer_since": T0 - timedelta(days=400)},
        profile_times={"plan": T0, "mrr_minor": T0 - timedelta(hours=1)},
        lifecycle="churned",
        lifecycle_at=T0,
        activity="inactive",
        activity_at=T0 - timedelta(days=2),
        consent={"sms": False},
        open_episodes=(OpenEpisode("e1", "subscription_cancelled", T0),),
    )
    second = Draft.new("c2")
    now = T0 + timedelta(minutes=1)
    columns = store.customer_columns([first, second], now)

    assert list(columns) == [name for name, _ in store._CUSTOMER_COLUMNS]
    assert columns["id"] == ["c1", "c2"]
    assert columns["plan"] == ["pro", None]
    assert columns["customer_since"] == [T0 - timedelta(days=400), None]
    assert columns["status"] == ["churned", "unknown"]
    assert columns["lifecycle_at"] == [T0, second.lifecycle_at]
    assert columns["consent"] == ['{"sms":false}', "{}"]
    assert columns["updated_at"] == [now, now]
    # read back as store.load does
    times = {
        k: datetime.fromisoformat(v) for k, v in orjson.loads(columns["profile_times"][0]).items()
    }
    assert times == first.profile_times
    assert orjson.loads(columns["profile_times"][0])["plan"] == T0.isoformat()


def test_episode_columns_are_the_inserts_columns() -> None:
    payload = INBOUND["subscription.cancelled"].model_validate(
        {"customer_id": "c1", "reason": "too_expensive"}
    )
    effects = apply(
        None, ev.Inbound(name="subscription.cancelled", payload=payload, occurred_at=T0), "/b", "e"
    )
    assert effects.new_episode is not None
    columns = store.episode_columns([effects.new_episode])
    assert list(columns) == [name for name, _ in store._EPISODE_COLUMNS]
    assert columns["reason"] == ["price"]
    assert columns["occurred_at"] == [T0]
