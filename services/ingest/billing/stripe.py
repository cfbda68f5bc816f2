"""Stripe events → our inbound lifecycle events. Pure: a function over the event's JSON.

- ``customer.subscription.deleted``: the subscription ended. Ended during its trial (or at
  its end, never paid) → ``trial.expired``; otherwise ``subscription.cancelled`` with the raw
  reason (``cancellation_details.feedback``, else ``.reason``; ``payment_failed`` when Stripe
  ended it after failed payments — involuntary churn), the comment, and the MRR it had.
- ``customer.subscription.created`` (active or trialing), ``.updated`` from ``incomplete`` to
  active → ``subscription.created``; ``.resumed`` → ``subscription.reactivated``: a churned
  customer coming back is a return.
- ``customer.subscription.updated`` from ``trialing`` to ``paused`` (the trial ended without a
  payment method) → ``trial.expired``.
- ``customer.created`` / ``customer.updated`` → ``customer.updated`` with the profile.
- Every other type: ignored.

A subscription whose ``customer`` is expanded (an object, not an id) gives its profile too.
The customer id is Stripe's (``cus_…``), or the merchant's own under ``id_key`` in the
subscription's (or expanded customer's) metadata, the customer's on customer events. The
event time is the event's ``created``.
"""

from __future__ import annotations

from datetime import timedelta
from fractions import Fraction
from typing import Any

from services.ingest.billing.common import (
    BillingPayloadError,
    Mapped,
    as_int,
    comment,
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

PROVIDER = "stripe"
TYPES = (
    "customer.subscription.deleted",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.resumed",
    "customer.created",
    "customer.updated",
)
"""The event types to subscribe the endpoint to (the others are answered 200 and ignored)."""
LIVE = frozenset({"active", "trialing", "past_due"})
TRIAL_GRACE = timedelta(days=1)
"""A subscription that ends within this long after its trial's end never converted."""


def map_event(event: Any, id_key: str | None = None) -> Mapped:
    """Read one Stripe event (the parsed webhook body); ``id_key``: the metadata key holding
    the merchant's own customer id, if they use one."""
    if not isinstance(event, dict):
        raise BillingPayloadError("a Stripe event is a JSON object")
    event_id, kind = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str):
        raise BillingPayloadError("a Stripe event needs an id and a type")
    created = unix_time(event.get("created"))
    if created is None:
        raise BillingPayloadError("a Stripe event needs created (Unix seconds)")
    base = Mapped(PROVIDER, event_id, kind, created)
    data = obj(event.get("data"))
    sub = obj(data.get("object"))
    name: str | None = None
    payload: dict[str, Any] = {}
    if kind == "customer.subscription.deleted":
        name, payload = _ended(sub)
    elif kind == "customer.subscription.created" and text(sub.get("status")) in LIVE:
        name, payload = "subscription.created", _started(sub)
    elif kind == "customer.subscription.resumed":
        name, payload = "subscription.reactivated", _started(sub)
    elif kind == "customer.subscription.updated":
        before = obj(data.get("previous_attributes")).get("status")
        status = text(sub.get("status"))
        if before == "incomplete" and status in LIVE:
            name, payload = "subscription.created", _started(sub)
        elif before == "trialing" and status == "paused":
            name, payload = "trial.expired", _trial_expired(sub)
    elif kind in ("customer.created", "customer.updated"):
        name, payload = "customer.updated", profile_event(sub)
    if name is None:
        return base
    expanded = sub.get("customer")
    mine = own_id(id_key, sub.get("metadata"), obj(expanded).get("metadata"))
    if mine is not None:
        payload["customer_id"] = mine
    if not payload.get("customer_id"):
        raise BillingPayloadError(f"a Stripe {kind} event names no customer")
    if "customer" not in payload and isinstance(expanded, dict):
        payload["customer"] = profile_event(expanded)["customer"]
    return Mapped(PROVIDER, event_id, kind, created, name, conform(name, payload))


def customer_id(sub: dict[str, Any]) -> str | None:
    customer = sub.get("customer")
    if isinstance(customer, dict):  # expanded
        customer = customer.get("id")
    return customer if isinstance(customer, str) and customer else None


def mrr(sub: dict[str, Any]) -> tuple[int | None, str | None]:
    """The subscription's monthly recurring revenue in minor units and its currency: each
    item's unit amount x quantity, its price's interval normalised to a month. Items without a
    per-unit amount (tiered, metered) count as nothing; ``None`` when no item has one."""
    total: Fraction | None = None
    currency = text(sub.get("currency"), 3)
    for item in items(obj(sub.get("items")).get("data")):
        price = obj(item.get("price")) or obj(item.get("plan"))
        amount = as_int(price.get("unit_amount", price.get("amount")))
        recurring = obj(price.get("recurring")) or price
        interval = recurring.get("interval")
        count = as_int(recurring.get("interval_count")) or 1
        quantity = as_int(item.get("quantity"))
        if amount is None or not isinstance(interval, str):
            continue
        part = monthly(amount, 1 if quantity is None else quantity, interval, count)
        if part is None:
            continue
        total = (total or 0) + part
        currency = currency or text(price.get("currency"), 3)
    amount = None if total is None else round_half_up(total)
    return amount, (currency.upper() if currency else None)


def plan_name(sub: dict[str, Any]) -> str | None:
    for item in items(obj(sub.get("items")).get("data")):
        price = obj(item.get("price")) or obj(item.get("plan"))
        product = price.get("product")
        if isinstance(product, dict):
            product = product.get("name") or product.get("id")
        for candidate in (price.get("nickname"), price.get("lookup_key"), product):
            name = text(candidate)
            if name:
                return name
    return None


def _ended(sub: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    details = obj(sub.get("cancellation_details"))
    trial_end = unix_time(sub.get("trial_end"))
    ended = unix_time(sub.get("ended_at")) or unix_time(sub.get("canceled_at"))
    if trial_end is not None and ended is not None and ended <= trial_end + TRIAL_GRACE:
        return "trial.expired", _trial_expired(sub)
    why = text(details.get("reason"))
    reason = "payment_failed" if why == "payment_failed" else text(details.get("feedback")) or why
    amount, currency = mrr(sub)
    return "subscription.cancelled", compact(
        {
            "customer_id": customer_id(sub),
            "reason": reason,
            "comment": comment(details.get("comment")),
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def _trial_expired(sub: dict[str, Any]) -> dict[str, Any]:
    details = obj(sub.get("cancellation_details"))
    return compact(
        {
            "customer_id": customer_id(sub),
            "reason": text(details.get("feedback")),
            "comment": comment(details.get("comment")),
        }
    )


def _started(sub: dict[str, Any]) -> dict[str, Any]:
    amount, currency = mrr(sub)
    return compact(
        {
            "customer_id": customer_id(sub),
            "plan": plan_name(sub),
            "mrr_minor": amount,
            "currency": currency,
        }
    )


def profile_event(customer: dict[str, Any]) -> dict[str, Any]:
    """A Stripe Customer → ``customer.updated``: email, name, phone (E.164, a local number read
    in the address country), the first preferred locale, a time zone from the phone or the
    address country, and ``customer_since`` from ``created``."""
    cid = customer.get("id")
    address = obj(customer.get("address")) or obj(obj(customer.get("shipping")).get("address"))
    country = text(address.get("country"), 2)
    phone = phone_e164(customer.get("phone"), country)
    locales = customer.get("preferred_locales")
    since = unix_time(customer.get("created"))
    profile = compact(
        {
            "email": text(customer.get("email"), 254),
            "name": text(customer.get("name")),
            "phone": phone,
            "locale": locale_of(locales[0]) if isinstance(locales, list) and locales else None,
            "timezone": zone_for(phone, country),
            "customer_since": since.isoformat() if since is not None else None,
        }
    )
    return {"customer_id": cid if isinstance(cid, str) else None, "customer": profile}
