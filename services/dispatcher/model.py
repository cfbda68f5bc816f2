"""The dispatcher's plain data and decisions: dispatch commands, delivery rows, outcome events,
suppression keys and the re-check made right before a send. No I/O here."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, Final, TypeAlias
from zoneinfo import ZoneInfo

from shared import channels
from shared import domain_events as de
from shared.channels import address_hash as address_hash  # the scheduler hashes with it too
from shared.cloudevents import CORRELATION, CloudEvent
from shared.contracts import dispatch as contract
from shared.contracts import registry
from shared.contracts.customer import CustomerUnsubscribed
from shared.contracts.messages import MessageOutcome
from shared.localtime import SendWindow

# --- event types (topic: topics.outcomes, keyed by customer id): shared.domain_events ---------
MESSAGE_SENT: Final = de.MESSAGE_SENT
MESSAGE_FAILED: Final = de.MESSAGE_FAILED
MESSAGE_SUPPRESSED: Final = de.MESSAGE_SUPPRESSED
MESSAGE_DELIVERED: Final = de.MESSAGE_DELIVERED
MESSAGE_OPENED: Final = de.MESSAGE_OPENED
MESSAGE_CLICKED: Final = de.MESSAGE_CLICKED
MESSAGE_BOUNCED: Final = de.MESSAGE_BOUNCED
MESSAGE_COMPLAINED: Final = de.MESSAGE_COMPLAINED
CUSTOMER_UNSUBSCRIBED: Final = de.CUSTOMER_UNSUBSCRIBED

OUTCOME_UNKNOWN_AFTER_CRASH: Final = "outcome unknown after crash"


@dataclass(frozen=True, slots=True)
class DispatchCommand:
    """A scheduler's ``dispatch.requested`` as the delivery row needs it (decoded with the
    contract, ``shared.contracts.dispatch.DispatchCommand``); ``data`` is kept whole in the
    delivery row."""

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
    """Decode a dispatch command with its contract; ``InvalidEvent`` names the field at fault
    (``data.send_window.timezone``), so the record dead-letters at decode time."""
    command = contract.DispatchCommand.decode(data, tolerant=True)
    return DispatchCommand(
        idempotency_key=command.idempotency_key,
        case_id=command.case_id,
        step_key=command.step_key,
        customer_id=command.customer.id,
        channel=command.channel,
        template=command.template,
        variant=command.variant or None,
        crm_owner=command.customer.crm_owner or None,
        data=data,
    )


def _send_window(spec: Mapping[str, Any]) -> tuple[SendWindow, ZoneInfo]:
    """A stored command's ``send_window`` (its contract checked it when the command came in:
    ``HH:MM`` times, start before end, a known zone)."""
    start, end = time.fromisoformat(spec["start"]), time.fromisoformat(spec["end"])
    return SendWindow(start, end), ZoneInfo(spec["timezone"])


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
    window, zone = _send_window(command["send_window"])
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


OutcomeData: TypeAlias = MessageOutcome | CustomerUnsubscribed


def _outcome_models() -> dict[str, type[MessageOutcome] | type[CustomerUnsubscribed]]:
    """The data model of each event type the dispatcher emits about a message, from the
    contract registry (the one place that pairs a type name with its model)."""
    models: dict[str, type[MessageOutcome] | type[CustomerUnsubscribed]] = {}
    for name in (*de.MESSAGE_OUTCOMES, de.CUSTOMER_UNSUBSCRIBED):
        model = registry.PUBLISHED[name].model
        assert model is MessageOutcome or model is CustomerUnsubscribed, name
        models[name] = model
    return models


OUTCOME_MODELS: Final = _outcome_models()


def outcome(
    type: str,
    delivery: Delivery,
    *,
    provider: str | None,
    provider_message_id: str | None,
    reason: str | None = None,
    reported: tuple[str | None, str] | None = None,
    confirmed_by: str | None = None,
) -> OutcomeData:
    """The data of a ``message.*`` (or ``customer.unsubscribed``) event about ``delivery``,
    built with the type's contract model: everything the scheduler and reporting use.
    ``reason`` is written when given; ``reported``: a provider webhook's
    ``(occurred_at, provider_event_id)``. ``KeyError`` for a type that is not an outcome."""
    fields: dict[str, Any] = {
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
        fields["reason"] = reason
    if reported is not None:
        fields["occurred_at"], fields["provider_event_id"] = reported
    if confirmed_by is not None:
        fields["confirmed_by"] = confirmed_by
    return OUTCOME_MODELS[type](**fields)


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
