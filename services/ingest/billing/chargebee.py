"""Chargebee events → our inbound lifecycle events. Pure: a function over the event's JSON
(``id``, ``event_type``, ``occurred_at``, ``content.subscription``, ``content.customer``).

- ``subscription_cancelled``: never activated (a trial that did not convert) →
  ``trial.expired``; otherwise ``subscription.cancelled`` with the raw reason
  (``cancel_reason_code``, the site's own reason, else ``cancel_reason``, Chargebee's:
  ``not_paid`` and ``no_card`` are involuntary churn and normalise to ``payment_failed``), and
  the MRR it had (the items' unit price x quantity over the billing period, else ``mrr``).
- ``subscription_created`` (active or in trial), ``subscription_activated`` →
  ``subscription.created``; ``subscription_reactivated``, ``subscription_resumed`` →
  ``subscription.reactivated``.
- ``customer_created`` / ``customer_changed`` → ``customer.updated`` (email, name, phone,
  locale, a time zone from the phone or billing address country, ``customer_since``).
- Every other type: ignored.

A subscription event's ``content.customer`` gives its profile too, so a cancellation alone
carries the email to write to. The customer id is Chargebee's, or the merchant's own under
``id_key`` in the subscription's or the customer's ``meta_data``. The event time is
``occurred_at``: retries and reordering (Chargebee has both) change nothing.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from services.ingest.billing.common import (
    BillingPayloadError,
    Mapped,
    as_int,
    compact,
    conform,
    items,
    locale_of,
    monthly,
    obj,
    own_id,
    phone_e164,
    round_half_up,
    text,
    unix_time,
    zone_for,
)

PROVIDER = "chargebee"
TYPES = (
    "subscription_cancelled",
    "subscription_created",
    "subscription_activated",
    "subscription_reactivated",
    "subscription_resumed",
    "customer_created",
    "customer_changed",
)
"""The event types to select for the webhook."""
LIVE = frozenset({"active", "in_trial", "non_renewing"})


def map_event(event: Any, id_key: str | None = None) -> Mapped:
    """Read one Chargebee event (the parsed webhook body); ``id_key``: the ``meta_data`` key
    holding the merchant's own customer id, if they use one."""
    if not isinstance(event, dict):
        raise BillingPayloadError("a Chargebee event is a JSON object")
    event_id, kind = event.get("id"), event.get("event_type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str):
        raise BillingPayloadError("a Chargebee event needs an id and an event_type")
    occurred = unix_time(event.get("occurred_at"))
    if occurred is None:
        raise BillingPayloadError("a Chargebee event needs occurred_at (Unix seconds)")
    base = Mapped(PROVIDER, event_id, kind, occurred)
    content = obj(event.get("content"))
    sub, customer = obj(content.get("subscription")), obj(content.get("customer"))
    name: str | None = None
    payload: dict[str, Any] = {}
    if kind == "subscription_cancelled":
        name, payload = _cancelled(sub)
    elif kind == "subscription_activated" or (
        kind == "subscription_created" and text(sub.get("status")) in LIVE
    ):
        name, payload = "subscription.created", _started(sub)
    elif kind in ("subscription_reactivated", "subscription_resumed"):
        name, payload = "subscription.reactivated", _started(sub)
    elif kind in ("customer_created", "customer_changed"):
        name, payload = "customer.updated", profile_event(customer)
    if name is None:
        return base
    if not isinstance(payload.get("customer_id"), str) or not payload["customer_id"]:
        payload["customer_id"] = customer.get("id")
    if not isinstance(payload.get("customer_id"), str) or not payload["customer_id"]:
        raise BillingPayloadError(f"a Chargebee {kind} event names no customer")
    if "customer" not in payload and customer.get("id") == payload["customer_id"]:
        # subscription events carry the customer too: the profile rides along
        payload["customer"] = profile_event(customer)["customer"]
    mine = own_id(id_key, sub.get("meta_data"), customer.get("meta_data"))
    if mine is not None:
        payload["customer_id"] = mine
    return Mapped(PROVIDER, event_id, kind, occurred, name, conform(name, payload))


def mrr(sub: dict[str, Any]) -> tuple[int | None, str | None]:
    """Monthly recurring revenue in minor units: each plan or addon item's unit price x
    quantity over the subscription's billing period (one-off charges left out); Chargebee's
    own ``mrr`` when no item says (it is 0 once a subscription is cancelled)."""
    currency = text(sub.get("currency_code"), 3)
    unit = sub.get("billing_period_unit")
    period = as_int(sub.get("billing_period")) or 1
    total: Fraction | None = None
    for item in items(sub.get("subscription_items")):
        if item.get("item_type") == "charge" or not isinstance(unit, str):
            continue
        amount = as_int(item.get("unit_price"))
        quantity = as_int(item.get("quantity"))
        if amount is None:
            continue
        part = monthly(amount, 1 if quantity is None else quantity, unit, period)
        if part is not None:
            total = (total or 0) + part
    if total is not None:
        return round_half_up(total), (currency.upper() if currency else None)
    own = as_int(sub.get("mrr"))
    return (own or None), (currency.upper() if currency else None)


def _cancelled(sub: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    reason = text(sub.get("cancel_reason_code")) or text(sub.get("cancel_reason"))
    if sub.get("activated_at") is None and sub.get("trial_end") is not None:
        return "trial.expired", compact({"customer_id": sub.get("customer_id"), "reason": reason})
    if text(sub.get("cancel_reason")) in ("not_paid", "no_card"):
        reason = text(sub.get("cancel_reason"))  # involuntary, whatever the site's code says
    amount, currency = mrr(sub)
    return "subscription.cancelled", compact(
        {
            "customer_id": sub.get("customer_id"),
            "reason": reason,
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def _started(sub: dict[str, Any]) -> dict[str, Any]:
    amount, currency = mrr(sub)
    plan = next(
        (
            text(i.get("item_price_id"))
            for i in items(sub.get("subscription_items"))
            if i.get("item_type") == "plan"
        ),
        None,
    )
    return compact(
        {
            "customer_id": sub.get("customer_id"),
            "plan": plan or text(sub.get("plan_id")),
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def profile_event(customer: dict[str, Any]) -> dict[str, Any]:
    address = obj(customer.get("billing_address"))
    country = text(address.get("country"), 2)
    phone = phone_e164(customer.get("phone") or address.get("phone"), country)
    name = " ".join(
        n for n in (text(customer.get("first_name")), text(customer.get("last_name"))) if n
    )
    since = unix_time(customer.get("created_at"))
    profile = compact(
        {
            "email": text(customer.get("email"), 254),
            "name": text(name),
            "phone": phone,
            "locale": locale_of(customer.get("locale")),
            "timezone": zone_for(phone, country),
            "customer_since": since.isoformat() if since is not None else None,
        }
    )
    return {"customer_id": customer.get("id"), "customer": profile}
