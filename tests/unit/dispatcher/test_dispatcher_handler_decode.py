"""What the dispatcher's consumer takes off its topics, decoded with the event contracts: a
malformed dispatch command or erasure is refused at decode time naming the field (so the
record dead-letters before any transaction), other event types are not its business."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from services.dispatcher.handler import DispatchHandler, Erasure
from services.dispatcher.model import DispatchCommand, address_hash
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts import examples
from shared.errors import InvalidEvent

HANDLER = DispatchHandler("outcomes")
ERASED = examples.PUBLISHED["customer.erased"]


def event(type: str, data: Any) -> CloudEvent:
    return CloudEvent(id="e-1", source="/winback/scheduler", type=type, data=data)


def test_a_dispatch_command_and_an_erasure_are_decoded() -> None:
    command = HANDLER.decode(event(de.DISPATCH_REQUESTED, examples.PUBLISHED["dispatch.requested"]))
    assert isinstance(command, DispatchCommand)
    assert command.customer_id == examples.CUSTOMER
    erasure = HANDLER.decode(event(de.CUSTOMER_ERASED, ERASED))
    assert erasure == Erasure(ERASED["customer_id"], ERASED["address_hashes"])


def test_an_erasure_from_a_newer_scheduler_with_a_field_more_is_taken() -> None:
    erasure = HANDLER.decode(event(de.CUSTOMER_ERASED, {**ERASED, "requested_by": "dpo"}))
    assert isinstance(erasure, Erasure)


def changed(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(ERASED)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("cus_42", "data"),
        (changed(customer_id=None), "data.customer_id"),
        (changed(address_hashes={"email": "not-a-digest"}), "data.address_hashes.email"),
        # a channel without a suppressible address (the registry's) has no hash to keep
        (changed(address_hashes={"crm": address_hash("crm", "o-1")}), "data.address_hashes.crm"),
        (changed(address_hashes={"fax": address_hash("fax", "1")}), "data.address_hashes.fax"),
        (changed(erased_at="yesterday"), "data.erased_at"),
    ],
)
def test_a_malformed_erasure_is_refused_naming_the_field(data: Any, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        HANDLER.decode(event(de.CUSTOMER_ERASED, data))
    assert info.value.code == "invalid_payload"
    assert info.value.field is not None
    assert info.value.field.startswith(field), info.value.field


def test_a_malformed_command_is_refused_naming_the_field() -> None:
    data = copy.deepcopy(examples.PUBLISHED["dispatch.requested"])
    data["send_window"]["timezone"] = "Mars/Olympus"
    with pytest.raises(InvalidEvent) as info:
        HANDLER.decode(event(de.DISPATCH_REQUESTED, data))
    assert info.value.field == "data.send_window.timezone"


def test_other_events_on_its_topics_are_not_its_business() -> None:
    assert HANDLER.decode(event(de.CASE_OPENED, {"anything": 1})) is None
