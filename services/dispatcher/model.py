"""The dispatcher's plain data and decisions: dispatch commands, delivery rows, outcome events,
suppression keys and the re-check made right before a send. No I/O here."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared import channels
from shared import domain_events as de
from shared.channels import address_hash as address_hash  # the scheduler hashes with it too
from shared.cloudevents import CORRELATION, CloudEvent
from shared.errors import InvalidEvent
from shared.localtime import SendWindow

# --- outcome event types (topic: topics.outcomes, keyed by customer id) -----------------------
MESSAGE_SENT: Final = de.MESSAGE_SENT
MESSAGE_FAILED: Final = de.MESSAGE_FAILED
MESSAGE_SUPPRESSED: Final = de.MESSAGE_SUPPRESSED
MESSAGE_DELIVERED: Final = f"{de.PREFIX}.message.delivered"
MESSAGE_OPENED: Final = f"{de.PREFIX}.message.opened"
MESSAGE_CLICKED: Final = f"{de.PREFIX}.message.clicked"
MESSAGE_BOUNCED: Final = f"{de.PREFIX}.message.bounced"
MESSAGE_COMPLAINED: Final = f"{de.PREFIX}.message.complained"
CUSTOMER_UNSUBSCRIBED: Final = de.CUSTOMER_UNSUBSCRIBED

OUTCOME_UNKNOWN_AFTER_CRASH: Final = "outcome unknown after crash"

_LIMITS: Final = {
    "idempotency_key": 200,
    "case_id": 36,
    "step_key": 100,
    "template": 100,
}


@dataclass(frozen=True, slots=True)
class DispatchCommand:
    """A scheduler's ``dispatch.requested``: ``data`` is kept whole in the delivery row."""

    idempotency_key: str
    case_id: str
    step_key: str
    customer_id: str
    channel: str
    template: str
    variant: str | None
    crm_owner: str | None
    data: Mapping[str, Any]


def parse_command(data: Any) -> DispatchCommand:
    """Validate a dispatch command; ``InvalidEvent`` names the field at fault."""
    if not isinstance(data, dict):
        raise InvalidEvent("invalid_payload", "data must be a JSON object", "data")
    for name, limit in _LIMITS.items():
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidEvent("invalid_payload", "required string is missing", f"data.{name}")
        if len(value) > limit:
            raise InvalidEvent("invalid_payload", f"longer than {limit}", f"data.{name}")
    if data.get("channel") not in channels.REGISTRY:
        raise InvalidEvent(
            "invalid_payload",
            f"channel must be one of {', '.join(channels.names())}",
            "data.channel",
        )
    customer = data.get("customer")
    if not isinstance(customer, dict):
        raise InvalidEvent("invalid_payload", "customer must be an object", "data.customer")
    cid = customer.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 200:
        raise InvalidEvent("invalid_payload", "customer id is required", "data.customer.id")
    for name in ("variant", "offer", "reason", "valid_until"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InvalidEvent("invalid_payload", "must be a string", f"data.{name}")
    features = data.get("features")
    if features is not None and (
        not isinstance(features, list) or not all(isinstance(f, str) for f in features)
    ):
        raise InvalidEvent("invalid_payload", "must be a list of strings", "data.features")
    _check_timing(data)
    owner = customer.get("crm_owner")
    return DispatchCommand(
        idempotency_key=data["idempotency_key"],
        case_id=data["case_id"],
        step_key=data["step_key"],
        customer_id=cid,
        channel=data["channel"],
        template=data["template"],
        variant=(data.get("variant") or None),
        crm_owner=owner if isinstance(owner, str) and owner else None,
        data=data,
    )


def _check_timing(data: Mapping[str, Any]) -> None:
    """``send_window`` (local start/end and the customer's zone) and ``expires_at`` are
    optional; when given they must be usable at send time."""
    if data.get("send_window") is not None:
        _send_window(data["send_window"])
    if data.get("expires_at") is not None and parse_time(data["expires_at"]) is None:
        raise InvalidEvent(
            "invalid_payload", "must be an ISO 8601 time with offset", "data.expires_at"
        )


def _send_window(spec: Any) -> tuple[SendWindow, ZoneInfo]:
    """A command's ``send_window``; ``InvalidEvent`` names the field at fault."""
    if not isinstance(spec, dict):
        raise InvalidEvent("invalid_payload", "must be an object", "data.send_window")
    bounds = []
    for name in ("start", "end"):
        try:
            bounds.append(time.fromisoformat(str(spec.get(name))))
        except ValueError:
            raise InvalidEvent(
                "invalid_payload", "must be a local time HH:MM", f"data.send_window.{name}"
            ) from None
    try:
        window = SendWindow(*bounds)
    except ValueError as exc:
        raise InvalidEvent("invalid_payload", str(exc), "data.send_window.end") from None
    try:
        zone = ZoneInfo(str(spec.get("timezone")))
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidEvent(
            "invalid_payload", "unknown IANA timezone", "data.send_window.timezone"
        ) from None
    return window, zone


def send_timing(
    command: Mapping[str, Any], now: datetime, grace: timedelta
) -> datetime | str | None:
    """When a claimed delivery may go: ``None`` now; a time to hold it until (it is outside
    the customer's send window — a backlog or retry rounds carried it into quiet hours); or
    the reason it must never go (its step expired meanwhile).

    ``grace``: a command fired just before the window closed still goes a little after it
    (it is not held until the next morning for being seconds late)."""
    expires = parse_time(command.get("expires_at"))
    if expires is not None and now >= expires:
        return "step expired before it could be sent"
    if command.get("send_window") is None:
        return None
    window, zone = _send_window(command["send_window"])  # checked when the command came in
    if window.allows(now, zone) or window.allows(now - grace, zone):
        return None
    opens = window.next_allowed(now, zone)
    if expires is not None and opens >= expires:
        return "step expires before the customer's send window opens"
    return opens


def cause_of(command: Mapping[str, Any]) -> CloudEvent | None:
    """The dispatch command's own event (id, source, correlation), as stored with it, so
    outcome events get deterministic ids and carry the command's correlation id."""
    ref = command.get("_event")
    if not isinstance(ref, dict) or not ref.get("id") or not ref.get("source"):
        return None
    correlation = ref.get("correlation") or ref["id"]
    return CloudEvent(
        id=str(ref["id"]), source=str(ref["source"]), type="", extensions={CORRELATION: correlation}
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """What an outcome event needs from a delivery row."""

    id: int
    idempotency_key: str
    case_id: str
    step_key: str
    customer_id: str
    channel: str
    template: str
    variant: str | None
    crm_owner: str | None
    command: Mapping[str, Any]
    provider: str | None = None
    provider_message_id: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        """From a ``deliveries`` row mapping."""
        return cls(
            id=row["id"],
            idempotency_key=row["idempotency_key"],
            case_id=row["case_id"],
            step_key=row["step_key"],
            customer_id=row["customer_id"],
            channel=row["channel"],
            template=row["template"],
            variant=row["variant"],
            crm_owner=row["crm_owner"],
            command=row["command"] or {},
            provider=row.get("provider"),
            provider_message_id=row.get("provider_message_id"),
        )


def outcome_data(
    delivery: Delivery,
    *,
    provider: str | None,
    provider_message_id: str | None,
    reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The data of a ``message.*`` outcome event: everything the scheduler and reporting use."""
    data: dict[str, Any] = {
        "idempotency_key": delivery.idempotency_key,
        "case_id": delivery.case_id,
        "step_key": delivery.step_key,
        "step_id": delivery.command.get("step_id"),
        "customer_id": delivery.customer_id,
        "channel": delivery.channel,
        "provider": provider,
        "provider_message_id": provider_message_id,
        "template": delivery.template,
        "variant": delivery.variant,
        "crm_owner": delivery.crm_owner,
        "playbook": delivery.command.get("playbook"),
    }
    if reason is not None:
        data["reason"] = reason
    data.update(extra)
    return data


# --- suppression keys -------------------------------------------------------------------------


def customer_key_hash(channel: str, customer_id: str) -> str:
    """A suppression key for a *customer* on a channel (an unsubscribe click names the
    customer, not the address): it holds even when the address later changes."""
    return hashlib.sha256(f"customer:{channel}:{customer_id}".encode()).hexdigest()


def suppression_keys(channel: str, customer_id: str, address: str | None) -> list[str]:
    keys = [customer_key_hash(channel, customer_id)]
    if address and channel in channels.address_fields():
        keys.append(address_hash(channel, address))
    return keys


# --- the re-check right before a send ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendState:
    """The state a send depends on, read in the claiming transaction."""

    case_status: str | None
    customer_found: bool
    erased: bool = False
    opted_out_all: bool = False
    consent: Mapping[str, Any] | None = None
    suppressed_channels: Collection[str] = ()
    suppressed_reason: str | None = None


def recheck(channel: str, state: SendState, consent_by_default: Collection[str]) -> str | None:
    """Why this message must not go now (``message.suppressed`` with that reason), or ``None``.

    A customer who returned, opted out, withdrew consent or was suppressed a second ago gets
    nothing: the case must still be open, consent must hold for the channel, and neither the
    address nor the customer may be on the suppression list."""
    if state.case_status is None:
        return "case not found"
    if state.case_status != "open":
        return f"case {state.case_status}"
    if not state.customer_found:
        return "customer not found"
    if state.erased:
        return "customer erased"
    if state.opted_out_all:
        return "customer opted out of all messages"
    consent = (state.consent or {}).get(channel)
    if consent is False:
        return f"consent withdrawn for {channel}"
    if consent is None and channel not in consent_by_default:
        return f"no consent recorded for {channel}"
    if channel in state.suppressed_channels:
        return f"{channel} suppressed for this customer"
    if state.suppressed_reason is not None:
        return f"suppressed: {state.suppressed_reason}"
    return None


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
