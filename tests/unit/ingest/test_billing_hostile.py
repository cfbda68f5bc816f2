"""Whatever a billing system (or someone holding its secret) sends, the mappings either refuse
it as not the provider's shape (``BillingPayloadError``: a 400) or produce data our inbound
contract takes as it is — never another exception (a 500) and never data ingest would refuse
field by field (only a customer id it cannot store, which ingest dead-letters)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.ingest.billing import chargebee, paddle, stripe
from services.ingest.billing.common import BillingPayloadError, Mapped
from shared.contracts.inbound import INBOUND

FIXTURES = Path(__file__).parents[2] / "fixtures" / "billing"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.sampled_from(["", "month", "year", "week", "day", "FI", "us", "+358401234567", "0", "-1"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def mutated(value: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """``value`` with any part kept, dropped to ``None`` or replaced by arbitrary JSON."""
    if isinstance(value, dict) and depth < 4:
        return st.fixed_dictionaries(
            {k: st.one_of(mutated(v, depth + 1), json_values) for k, v in value.items()}
        )
    if isinstance(value, list) and value and depth < 4:
        return st.lists(st.one_of(*(mutated(v, depth + 1) for v in value)), max_size=4)
    return st.one_of(st.just(value), json_values)


def load(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def stripe_event(kind: str, obj: Any) -> dict[str, Any]:
    return {"id": "evt_h", "type": kind, "created": 1_780_000_000, "data": {"object": obj}}


def paddle_event(kind: str, data: Any) -> dict[str, Any]:
    return {
        "event_id": "evt_h",
        "event_type": kind,
        "occurred_at": "2024-04-12T11:24:55.061812Z",
        "data": data,
    }


def check(read: Callable[..., Mapped], event: Any) -> None:
    for key in (None, "0"):  # with a customer id key too (mutated metadata may hold "0")
        held(read, event, key)


def held(read: Callable[..., Mapped], event: Any, key: str | None) -> None:
    try:
        mapped = read(event, id_key=key)
    except BillingPayloadError:
        return
    if mapped.name is None:
        return
    errors: list[Any] = []
    try:
        INBOUND[mapped.name].model_validate(mapped.data)
    except ValidationError as exc:
        errors = list(exc.errors())
    assert {e["loc"][0] for e in errors} <= {"customer_id"}, errors


SLOW = settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
STRIPE_TYPES = st.sampled_from(stripe.TYPES)


@SLOW
@given(STRIPE_TYPES, mutated(load("stripe/subscription.json")))
def test_stripe_subscriptions(kind: str, obj: Any) -> None:
    check(stripe.map_event, stripe_event(kind, obj))


@SLOW
@given(STRIPE_TYPES, mutated(load("stripe/customer.json")))
def test_stripe_customers(kind: str, obj: Any) -> None:
    check(stripe.map_event, stripe_event(kind, obj))


@SLOW
@given(st.sampled_from(paddle.TYPES), mutated(load("paddle/subscription.canceled.json")))
def test_paddle_subscriptions(kind: str, data: Any) -> None:
    check(paddle.map_event, paddle_event(kind, data))


@SLOW
@given(st.sampled_from(paddle.TYPES), mutated(load("paddle/customer.created.json")))
def test_paddle_customers(kind: str, data: Any) -> None:
    check(paddle.map_event, paddle_event(kind, data))


@SLOW
@given(st.sampled_from(chargebee.TYPES), mutated(load("chargebee/subscription_cancelled.json")))
def test_chargebee_events(kind: str, event: Any) -> None:
    if isinstance(event, dict):
        event["event_type"] = kind
    check(chargebee.map_event, event)


@SLOW
@given(json_values)
def test_anything_at_all(body: Any) -> None:
    for read in (stripe.map_event, paddle.map_event, chargebee.map_event):
        check(read, body)
