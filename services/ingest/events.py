"""Ingest's side of the event contracts: decoding what arrives, naming what it publishes.

The models are the shared contracts (``shared.contracts``): inbound lifecycle events decode
through the registry's ``INBOUND`` contracts (``shared.contracts.inbound``: every string
bounded and free of control characters, every time within ``shared.cloudevents.TIME_RANGE``,
every integer within a PostgreSQL bigint — what passes fits the columns it is stored in), and
what ingest publishes is built with the models of ``shared.contracts.customer``, its type
taken from the registry (``PUBLISHES``).

Types arrive as ``<prefix>.<name>`` where the prefix is configurable reverse DNS
(``com.example.subscription.cancelled``). Whatever is wrong raises ``InvalidEvent`` naming the
attribute or field (``type``, ``time``, ``data``, ``data.customer.email``) — and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from shared.cloudevents import CloudEvent
from shared.contracts.base import Published, Received
from shared.contracts.registry import CONTRACTS, INBOUND, Contract
from shared.errors import InvalidEvent


@dataclass(frozen=True, slots=True)
class Inbound:
    """A validated inbound event: its short name (``trial.expired``), payload (the model of
    its contract) and event time."""

    name: str
    payload: Received
    occurred_at: datetime


def _published_by_ingest() -> dict[type[Published], Contract]:
    out: dict[type[Published], Contract] = {}
    for contract in CONTRACTS:
        if "ingest" not in contract.producers:
            continue
        model = contract.model
        assert issubclass(model, Published), contract.name
        if model in out:  # the type must follow from the model
            raise RuntimeError(f"{contract.name} and {out[model].name} share {model.__name__}")
        out[model] = contract
    return out


PUBLISHES: Mapping[type[Published], Contract] = _published_by_ingest()
"""The contract of each model ingest publishes (``ChurnRecorded`` → ``churn.recorded``)."""


def decode(event: CloudEvent, prefix: str, now: datetime, max_future_skew_s: int) -> Inbound:
    """Validate an inbound CloudEvent's type, time and payload. Pure."""
    head = prefix.rstrip(".") + "."
    name = event.type[len(head) :] if event.type.startswith(head) else ""
    contract = INBOUND.get(name)
    if contract is None:
        raise InvalidEvent(
            "unknown_type", f"{event.type!r} is not an event type ingest accepts", "type"
        )
    occurred_at = event.time or now
    if (occurred_at - now).total_seconds() > max_future_skew_s:
        raise InvalidEvent(
            "future_time", f"event time {occurred_at.isoformat()} is in the future", "time"
        )
    if event.data is None:
        raise InvalidEvent("invalid_payload", "the event carries no data", "data")
    if not isinstance(event.data, dict):
        raise InvalidEvent("invalid_payload", "data must be a JSON object", "data")
    payload = contract.decode(event.data)  # InvalidEvent naming the field
    assert isinstance(payload, Received)
    return Inbound(name=name, payload=payload, occurred_at=occurred_at)
