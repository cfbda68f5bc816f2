"""The event contracts themselves: the registry covers every type name, each example is a
fixed point of its model, the vocabularies match the domain's, and the scheduler decodes
what it consumes with the contract (a malformed payload fails at decode naming the field)."""

from __future__ import annotations

import copy
from typing import Any, get_args

import pytest

from services.scheduler.domain import migration
from services.scheduler.domain import model as domain
from services.scheduler.handler import CONSUMED, SchedulerHandler
from shared import domain_events as de
from shared.churn import ChurnReason
from shared.cloudevents import CloudEvent
from shared.contracts import base, cases, examples, registry
from shared.errors import InvalidEvent


def test_every_published_type_name_has_exactly_one_contract() -> None:
    names = {
        value
        for name, value in vars(de).items()
        if name.isupper() and isinstance(value, str) and value.startswith(de.PREFIX + ".")
    }
    assert set(registry.PUBLISHED) == names
    assert len({c.name for c in registry.CONTRACTS}) == len(registry.CONTRACTS)
    assert set(de.MESSAGE_OUTCOMES) == {n for n in names if ".message." in n}


@pytest.mark.parametrize("contract", registry.CONTRACTS, ids=lambda c: c.name)
def test_each_example_round_trips_through_its_model(contract: registry.Contract) -> None:
    data = copy.deepcopy(dict(contract.example))
    decoded = contract.decode(data, tolerant=False)
    assert decoded.to_data() == contract.example


def test_a_published_model_refuses_an_undeclared_field_unless_tolerant() -> None:
    data = {**examples.PUBLISHED["case.closed"], "surprise": 1}
    with pytest.raises(InvalidEvent) as refused:
        registry.decode(de.CASE_CLOSED, data, tolerant=False)
    assert (refused.value.code, refused.value.field) == ("invalid_payload", "data.surprise")
    assert registry.decode(de.CASE_CLOSED, data).to_data() == examples.PUBLISHED["case.closed"]


def test_inbound_types_are_found_with_their_prefix_only() -> None:
    assert registry.contract_for("com.example.trial.expired", "com.example") is not None
    assert registry.contract_for("com.example.trial.expired") is None
    with pytest.raises(InvalidEvent) as unknown:
        registry.decode("com.example.nope", {}, inbound_prefix="com.example")
    assert (unknown.value.code, unknown.value.field) == ("unknown_type", "type")


def test_the_vocabularies_are_the_domains() -> None:
    pairs = [
        (base.ChurnReason, ChurnReason),
        (base.Channel, domain.Channel),
        (base.EpisodeKind, domain.EpisodeKind),
        (base.Engagement, domain.Engagement),
        (cases.LifecycleType, domain.LifecycleType),
        (cases.ValueTier, domain.ValueTier),
        (cases.EngagementLevel, domain.EngagementLevel),
        (cases.TenureBand, domain.TenureBand),
        (cases.SegmentLabel, domain.SegmentLabel),
        (cases.CancelCause, migration.CancelCause),
    ]
    for ours, theirs in pairs:
        assert set(get_args(ours)) == set(get_args(theirs)), ours


# -- the scheduler's decode --------------------------------------------------------------------


def handler() -> SchedulerHandler:
    return SchedulerHandler([], "outcomes")


def event(type: str, data: Any) -> CloudEvent:
    return CloudEvent(id="e1", source="/winback/ingest", type=type, data=data)


def test_the_scheduler_decodes_exactly_the_types_the_registry_says_it_consumes() -> None:
    consumes = {c.name for c in registry.CONTRACTS if "scheduler" in c.consumers}
    assert consumes == CONSUMED


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["episode"].pop("occurred_at"), "data.episode.occurred_at"),
        (lambda d: d["episode"].update(occurred_at="yesterday"), "data.episode.occurred_at"),
        (
            lambda d: d["episode"].update(occurred_at="2026-03-02T08:00:00"),
            "data.episode.occurred_at",
        ),
        (lambda d: d["episode"].update(reason="too_expensive"), "data.episode.reason"),
        (lambda d: d["customer"].update(id=""), "data.customer.id"),
        (lambda d: d["customer"].update(mrr_minor="lots"), "data.customer.mrr_minor"),
        (lambda d: d.pop("customer"), "data.customer"),
    ],
)
def test_a_malformed_churn_fails_at_decode_naming_the_field(mutate: Any, field: str) -> None:
    data = copy.deepcopy(examples.PUBLISHED["churn.recorded"])
    mutate(data)
    with pytest.raises(InvalidEvent) as refused:
        handler().decode(event(de.CHURN_RECORDED, data))
    assert (refused.value.code, refused.value.field) == ("invalid_payload", field)


def test_data_that_is_not_an_object_fails_at_decode() -> None:
    with pytest.raises(InvalidEvent) as refused:
        handler().decode(event(de.MESSAGE_SENT, ["not", "an", "object"]))
    assert (refused.value.code, refused.value.field) == ("invalid_payload", "data")


def test_decoded_data_is_the_contracts_normal_form_without_unknown_fields() -> None:
    data = {
        **examples.PUBLISHED["customer.activity"],
        "at": "2026-03-09T14:20:00Z",
        "added_by_a_newer_ingest": True,
    }
    decoded = handler().decode(event(de.CUSTOMER_ACTIVITY, data))
    assert decoded.data == {**examples.PUBLISHED["customer.activity"]}
    assert decoded.contract is not None


def test_types_the_scheduler_ignores_pass_through_unread() -> None:
    decoded = handler().decode(event(de.CASE_OPENED, "anything"))
    assert (decoded.type, decoded.data, decoded.contract) == (de.CASE_OPENED, {}, None)
