"""The dispatch command's contract against what the dispatcher actually reads
(``services.dispatcher.model.parse_command``, which decodes with the contract): every command
the model accepts, the dispatcher accepts and reads the same way (Hypothesis over the model's
whole domain), and each near miss is refused by both with the same error naming the field."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.model import parse_command
from shared.contracts import examples
from shared.contracts.dispatch import DispatchCommand, DispatchCustomer, SendWindowSpec
from shared.errors import InvalidEvent

EXAMPLE = examples.PUBLISHED["dispatch.requested"]
ZONES = ["UTC", "Europe/Helsinki", "America/New_York", "Asia/Kuala_Lumpur", "Europe/Copenhagen"]


def text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_size).filter(lambda s: s.strip() != "")


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def windows(draw: st.DrawFn) -> SendWindowSpec:
    start = draw(st.integers(0, 23 * 60 + 58))
    end = draw(st.integers(start + 1, 23 * 60 + 59))
    return SendWindowSpec(
        start=time(start // 60, start % 60).isoformat("minutes"),
        end=time(end // 60, end % 60).isoformat("minutes"),
        timezone=draw(st.sampled_from(ZONES)),
    )


commands = st.builds(
    DispatchCommand,
    idempotency_key=text(1, 200),
    case_id=text(1, 36),
    step_id=st.integers(1, 2**63 - 1),
    step_key=text(1, 100),
    playbook=st.text(max_size=200),
    playbook_version=st.integers(1, 10_000),
    channel=st.sampled_from(["email", "sms", "crm", "webhook"]),
    template=text(1, 100),
    offer=optional(st.text(max_size=200)),
    is_discount=st.booleans(),
    variant=optional(st.text(max_size=200)),
    valid_until=optional(times),
    customer=st.builds(
        DispatchCustomer,
        id=st.text(min_size=1, max_size=200),
        email=optional(st.text(max_size=254)),
        phone=optional(st.text(max_size=64)),
        name=optional(st.text(max_size=200)),
        locale=optional(st.text(max_size=35)),
        timezone=optional(st.text(max_size=64)),
        plan=optional(st.text(max_size=200)),
        crm_owner=optional(st.text(max_size=200)),
    ),
    reason=optional(st.sampled_from(["price", "missing_feature", "unknown"])),
    features=st.lists(st.text(max_size=200), max_size=3),
    feature_description=optional(st.text(max_size=2000)),
    requested_at=times,
    send_window=optional(windows()),
    expires_at=times,
)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_every_command_the_model_accepts_the_dispatcher_accepts(command: DispatchCommand) -> None:
    data = command.to_data()
    assert DispatchCommand.decode(data).to_data() == data
    parsed = parse_command(data)
    assert parsed.idempotency_key == command.idempotency_key
    assert (parsed.case_id, parsed.step_key, parsed.template) == (
        command.case_id,
        command.step_key,
        command.template,
    )
    assert parsed.channel == command.channel
    assert parsed.customer_id == command.customer.id
    assert parsed.variant == (command.variant or None)
    assert parsed.crm_owner == (command.customer.crm_owner or None)
    assert parsed.data == data


def mutated(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE)
    change(data)
    return data


NEAR_MISSES = {
    "no idempotency key": (lambda d: d.pop("idempotency_key"), "data.idempotency_key"),
    "blank idempotency key": (lambda d: d.update(idempotency_key="  "), "data.idempotency_key"),
    "long idempotency key": (
        lambda d: d.update(idempotency_key="k" * 201),
        "data.idempotency_key",
    ),
    "long case id": (lambda d: d.update(case_id="c" * 37), "data.case_id"),
    "case id a number": (lambda d: d.update(case_id=42), "data.case_id"),
    "long step key": (lambda d: d.update(step_key="s" * 101), "data.step_key"),
    "empty template": (lambda d: d.update(template=""), "data.template"),
    "long template": (lambda d: d.update(template="t" * 101), "data.template"),
    "unknown channel": (lambda d: d.update(channel="fax"), "data.channel"),
    "customer not an object": (lambda d: d.update(customer="cus_42"), "data.customer"),
    "customer without id": (lambda d: d["customer"].pop("id"), "data.customer.id"),
    "customer id empty": (lambda d: d["customer"].update(id=""), "data.customer.id"),
    "variant a number": (lambda d: d.update(variant=5), "data.variant"),
    "offer a list": (lambda d: d.update(offer=["x"]), "data.offer"),
    "reason a number": (lambda d: d.update(reason=1), "data.reason"),
    "features a string": (lambda d: d.update(features="SSO"), "data.features"),
    "features of numbers": (lambda d: d.update(features=[1]), "data.features"),
    "phone a boolean": (lambda d: d["customer"].update(phone=True), "data.customer.phone"),
    "send window a string": (lambda d: d.update(send_window="9-20"), "data.send_window"),
    "start not a time": (lambda d: d["send_window"].update(start="nine"), "data.send_window.start"),
    "end not a time": (lambda d: d["send_window"].update(end="25:00"), "data.send_window.end"),
    "end before start": (
        lambda d: d["send_window"].update(start="20:00", end="09:00"),
        "data.send_window.end",
    ),
    "unknown zone": (
        lambda d: d["send_window"].update(timezone="Mars/Olympus"),
        "data.send_window.timezone",
    ),
    "expiry not a time": (lambda d: d.update(expires_at="soon"), "data.expires_at"),
    "expiry without offset": (
        lambda d: d.update(expires_at="2027-03-02T08:00:00"),
        "data.expires_at",
    ),
}


@pytest.mark.parametrize(("change", "field"), NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_each_rule_of_the_dispatchers_intake_is_the_models_on_the_same_field(
    change: Any, field: str
) -> None:
    data = mutated(change)
    with pytest.raises(InvalidEvent) as dispatcher:
        parse_command(data)
    with pytest.raises(InvalidEvent) as model:
        DispatchCommand.decode(data)
    assert dispatcher.value.code == "invalid_payload"
    assert (dispatcher.value.field, dispatcher.value.reason) == (
        model.value.field,
        model.value.reason,
    )
    assert dispatcher.value.field is not None
    assert dispatcher.value.field == field or dispatcher.value.field.startswith(field + "."), (
        dispatcher.value.field
    )


def test_the_example_passes_both() -> None:
    assert parse_command(copy.deepcopy(EXAMPLE)).case_id == EXAMPLE["case_id"]
    assert DispatchCommand.decode(EXAMPLE).to_data() == EXAMPLE


def test_a_command_without_window_and_expiry_is_still_taken() -> None:
    """Commands queued before the scheduler sent the window and the expiry had neither: the
    contract (and so the dispatcher) takes them; one sent along must be valid."""
    data = mutated(lambda d: (d.pop("send_window"), d.pop("expires_at")))
    assert parse_command(data).case_id == EXAMPLE["case_id"]
    assert DispatchCommand.decode(data).to_data() == data
    with pytest.raises(InvalidEvent) as info:
        parse_command({**data, "expires_at": None, "send_window": {"start": "09:00"}})
    assert info.value.field == "data.send_window.end"


def test_times_are_written_as_isoformat() -> None:
    at = datetime(2026, 3, 5, 8, 0, 1, 250_000, tzinfo=UTC)
    data = DispatchCommand.decode({**EXAMPLE, "requested_at": at.isoformat()}).to_data()
    assert data["requested_at"] == "2026-03-05T08:00:01.250000+00:00"
    assert datetime.fromisoformat(data["expires_at"]) - at > timedelta(days=300)
