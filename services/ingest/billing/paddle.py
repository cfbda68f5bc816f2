"""Paddle Billing notifications → our inbound lifecycle events. Pure: a function over the
notification's JSON (``event_id``, ``event_type``, ``occurred_at``, ``data``).

- ``subscription.canceled``: never billed (``first_billed_at`` empty: a trial that did not
  convert) → ``trial.expired``; otherwise ``subscription.cancelled`` with the MRR it had.
  Paddle's notification carries no cancellation reason: a reason the merchant stores in the
  subscription's ``custom_data`` (``cancellation_reason``, ``cancellation_comment``) is used,
  else the reason is unknown.
- ``subscription.created`` (active or trialing), ``subscription.activated`` (the first payment)
  → ``subscription.created``; ``subscription.resumed`` → ``subscription.reactivated``.
- ``customer.created`` / ``customer.updated`` → ``customer.updated`` (email, name, locale,
  ``customer_since``); ``address.created`` / ``address.updated`` → the customer's time zone
  from the address country.
- Every other type: ignored.

The customer id is Paddle's (``ctm_…``), or the merchant's own under ``id_key`` in the
entity's ``custom_data``. The event time is ``occurred_at``. Amounts are strings
in minor units; each price's ``billing_cycle`` (``interval``, ``frequency``) normalises it to a
month.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from services.ingest.billing.common import (
    BillingPayloadError,
    Mapped,
    as_int,
    comment,
    compact,
    conform,
    iso_time,
    items,
    locale_of,
    monthly,
    obj,
    own_id,
    round_half_up,
    text,
    zone_for,
)

PROVIDER = "paddle"
TYPES = (
    "subscription.canceled",
    "subscription.created",
    "subscription.activated",
    "subscription.resumed",
    "customer.created",
    "customer.updated",
    "address.created",
    "address.updated",
)
"""The event types to subscribe the notification destination to."""
LIVE = frozenset({"active", "trialing", "past_due"})


def map_event(event: Any, id_key: str | None = None) -> Mapped:
    """Read one Paddle notification (the parsed webhook body); ``id_key``: the ``custom_data``
    key holding the merchant's own customer id, if they use one."""
    if not isinstance(event, dict):
        raise BillingPayloadError("a Paddle notification is a JSON object")
    event_id, kind = event.get("event_id"), event.get("event_type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str):
        raise BillingPayloadError("a Paddle notification needs event_id and event_type")
    occurred = iso_time(event.get("occurred_at"))
    if occurred is None:
        raise BillingPayloadError("a Paddle notification needs occurred_at (RFC 3339)")
    base = Mapped(PROVIDER, event_id, kind, occurred)
    data = obj(event.get("data"))
    name: str | None = None
    payload: dict[str, Any] = {}
    if kind == "subscription.canceled":
        name, payload = _canceled(data)
    elif kind == "subscription.activated" or (
        kind == "subscription.created" and text(data.get("status")) in LIVE
    ):
        name, payload = "subscription.created", _started(data)
    elif kind == "subscription.resumed":
        name, payload = "subscription.reactivated", _started(data)
    elif kind in ("customer.created", "customer.updated"):
        name, payload = "customer.updated", _customer(data)
    elif kind in ("address.created", "address.updated"):
        zone = zone_for(None, text(data.get("country_code"), 2))
        if zone is not None:
            name = "customer.updated"
            payload = {"customer_id": data.get("customer_id"), "customer": {"timezone": zone}}
    if name is None:
        return base
    mine = own_id(id_key, data.get("custom_data"))
    if mine is not None:
        payload["customer_id"] = mine
    if not isinstance(payload.get("customer_id"), str) or not payload["customer_id"]:
        raise BillingPayloadError(f"a Paddle {kind} notification names no customer")
    return Mapped(PROVIDER, event_id, kind, occurred, name, conform(name, payload))


def mrr(sub: dict[str, Any]) -> tuple[int | None, str | None]:
    """Monthly recurring revenue in minor units: each recurring item's unit price x quantity,
    normalised from its price's billing cycle to a month; ``None`` when no item has one."""
    total: Fraction | None = None
    currency = text(sub.get("currency_code"), 3)
    for item in items(sub.get("items")):
        if item.get("recurring") is False:
            continue
        price = obj(item.get("price"))
        unit = obj(price.get("unit_price"))
        cycle = obj(price.get("billing_cycle")) or obj(sub.get("billing_cycle"))
        amount = as_int(unit.get("amount"))
        interval = cycle.get("interval")
        quantity = as_int(item.get("quantity"))
        if amount is None or not isinstance(interval, str):
            continue
        count = as_int(cycle.get("frequency")) or 1
        part = monthly(amount, 1 if quantity is None else quantity, interval, count)
        if part is None:
            continue
        total = (total or 0) + part
        currency = currency or text(unit.get("currency_code"), 3)
    amount = None if total is None else round_half_up(total)
    return amount, (currency.upper() if currency else None)


def plan_name(sub: dict[str, Any]) -> str | None:
    for item in items(sub.get("items")):
        price = obj(item.get("price"))
        for candidate in (obj(item.get("product")).get("name"), price.get("name"), price.get("id")):
            name = text(candidate)
            if name:
                return name
    return None


def _canceled(sub: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    custom = obj(sub.get("custom_data"))
    reason = text(custom.get("cancellation_reason"))
    note = comment(custom.get("cancellation_comment"))
    if sub.get("first_billed_at") is None:
        return "trial.expired", compact(
            {"customer_id": sub.get("customer_id"), "reason": reason, "comment": note}
        )
    amount, currency = mrr(sub)
    return "subscription.cancelled", compact(
        {
            "customer_id": sub.get("customer_id"),
            "reason": reason,
            "comment": note,
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def _started(sub: dict[str, Any]) -> dict[str, Any]:
    amount, currency = mrr(sub)
    return compact(
        {
            "customer_id": sub.get("customer_id"),
            "plan": plan_name(sub),
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def _customer(customer: dict[str, Any]) -> dict[str, Any]:
    since = iso_time(customer.get("created_at"))
    profile = compact(
        {
            "email": text(customer.get("email"), 254),
            "name": text(customer.get("name")),
            "locale": locale_of(customer.get("locale")),
            "customer_since": since.isoformat() if since is not None else None,
        }
    )
    return {"customer_id": customer.get("id"), "customer": profile}
