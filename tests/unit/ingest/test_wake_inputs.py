"""Issue 15's inbound events in ingest: decoding, the fold of an exit-survey answer, the
announcements without a customer, the fiscal year on the profile, and erasure that sticks."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ingest import events as ev
from services.ingest.customer import (
    ERASED_FIELDS,
    CustomerState,
    announcement_key,
    apply,
)
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts import registry
from shared.contracts.inbound import INBOUND
from shared.errors import InvalidEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PREFIX = "com.example"


def inbound(name: str, at: datetime, **data: Any) -> ev.Inbound:
    payload = INBOUND[name].model_validate(data)
    return ev.Inbound(name=name, payload=payload, occurred_at=at)


def decode(name: str, data: Any) -> ev.Inbound:
    event = CloudEvent(id="e1", source="/t", type=f"{PREFIX}.{name}", time=T0, data=data)
    return ev.decode(event, PREFIX, T0, 300)


def published(effects: Any) -> list[tuple[str, dict[str, Any]]]:
    out = [(ev.PUBLISHES[type(m)].name, m.to_data()) for m in effects.emit]
    for model, (name, data) in zip(effects.emit, out, strict=True):
        assert registry.decode(name, data, tolerant=False) == model, name
    return out


@pytest.mark.parametrize(
    ("name", "data", "field"),
    [
        ("competitor.changed", {"competitor": "Rival", "kind": "bankrupt"}, "data.kind"),
        ("competitor.changed", {"kind": "outage"}, "data.competitor"),
        ("issue.resolved", {"issue": ""}, "data.issue"),
        ("issue.resolved", {"issue": "I-1", "tags": ["ok", "bad\x00"]}, "data.tags.1"),
        ("feedback.received", {"reason": "x"}, "data.customer_id"),
        ("feedback.received", {"customer_id": "c", "tags": "reports"}, "data.tags"),
        (
            "customer.updated",
            {"customer_id": "c", "customer": {"fiscal_year_start_month": 13}},
            "data.customer.fiscal_year_start_month",
        ),
    ],
)
def test_bad_new_events_are_refused_naming_the_field(name: str, data: Any, field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(name, data)
    assert caught.value.code == "invalid_payload"
    assert caught.value.field == field


def test_the_new_types_decode_from_their_examples() -> None:
    for name in ("feedback.received", "issue.resolved", "competitor.changed"):
        assert decode(name, registry.INBOUND[name].example).name == name


def test_an_exit_survey_answer_refines_the_latest_open_episode() -> None:
    churned = apply(
        None,
        inbound("subscription.cancelled", T0, customer_id="c1", reason="too_expensive"),
        "/b",
        "e1",
    )
    assert churned.state is not None
    assert churned.new_episode is not None
    answer = inbound(
        "feedback.received",
        T0 + timedelta(days=1),
        customer_id="c1",
        reason="too_complex",
        comment="Setup took weeks",
        tags=["reports"],
    )
    effects = apply(churned.state, answer, "/survey", "e2")
    ((name, data),) = published(effects)
    assert name == de.FEEDBACK_RECEIVED
    assert data["reason"] == "poor_experience"
    assert data["reason_raw"] == "too_complex"
    assert data["episode_id"] == churned.new_episode.id
    assert data["tags"] == ["reports"]
    assert "comment" not in data  # free text stays in ingest
    (refined,) = effects.refined
    assert (refined.episode_id, refined.reason, refined.comment) == (
        churned.new_episode.id,
        "poor_experience",
        "Setup took weeks",
    )
    assert effects.state == churned.state  # the customer's registers do not move


def test_an_answer_without_a_reason_refines_no_reason() -> None:
    churned = apply(None, inbound("trial.expired", T0, customer_id="c1"), "/b", "e1")
    answer = inbound("feedback.received", T0, customer_id="c1", comment="meh")
    effects = apply(churned.state, answer, "/survey", "e2")
    (refined,) = effects.refined
    assert refined.reason is None
    assert refined.comment == "meh"
    ((_, data),) = published(effects)
    assert data["reason"] == "unknown"
    assert data["reason_raw"] is None


def test_an_answer_with_no_open_episode_is_published_without_one() -> None:
    effects = apply(
        None, inbound("feedback.received", T0, customer_id="c9", reason="price"), "/s", "e"
    )
    assert effects.refined == []
    ((_, data),) = published(effects)
    assert data["episode_id"] is None


@pytest.mark.parametrize(
    ("name", "data", "key"),
    [
        ("feature.released", {"feature": "sso"}, "sso"),
        ("issue.resolved", {"issue": "ENG-1", "tags": ["price"], "features": ["sso"]}, "ENG-1"),
        ("competitor.changed", {"competitor": "Rival", "kind": "sunset", "note": "EOL"}, "Rival"),
    ],
)
def test_announcements_change_nobody_and_are_keyed_by_what_they_announce(
    name: str, data: dict[str, Any], key: str
) -> None:
    effects = apply(None, inbound(name, T0, **data), "/p", "e1")
    assert effects.state is None
    (model,) = effects.emit
    assert announcement_key(model) == key
    ((published_name, out),) = published(effects)
    assert published_name == f"{de.PREFIX}.{name}"
    assert all(out[k] == v for k, v in data.items() if k in out)


def test_the_fiscal_year_travels_on_the_profile() -> None:
    effects = apply(
        None,
        inbound("customer.updated", T0, customer_id="c1", customer={"fiscal_year_start_month": 4}),
        "/crm",
        "e1",
    )
    ((_, data),) = published(effects)
    assert data["customer"]["fiscal_year_start_month"] == 4


profiles = st.fixed_dictionaries(
    {},
    optional={
        "email": st.sampled_from(["a@example.com", "b@example.org"]),
        "name": st.sampled_from(["Aino", "Bo"]),
        "phone": st.sampled_from(["+358401234567", "+4520123456"]),
        "plan": st.sampled_from(["pro", "basic"]),
        "locale": st.sampled_from(["fi", "da"]),
    },
)
names = st.sampled_from(["customer.updated", "subscription.cancelled", "feedback.received"])


@given(st.lists(st.tuples(names, profiles, st.integers(0, 10_000)), max_size=12))
def test_no_event_after_erasure_writes_a_removed_field_back(
    history: list[tuple[str, dict[str, Any], int]],
) -> None:
    state: CustomerState | None = replace(
        CustomerState(id="c1", profile={"plan": "old"}), erased=True
    )
    for i, (name, profile, minutes) in enumerate(history):
        item = inbound(
            name,
            T0 + timedelta(minutes=minutes),
            customer_id="c1",
            customer=profile,
            comment="free text",
        )
        effects = apply(state, item, "/src", f"e{i}")
        state = effects.state
        assert state is not None
        assert state.erased
        assert not ERASED_FIELDS & set(state.profile)
        if effects.new_episode is not None:
            assert effects.new_episode.comment is None
        assert all(r.comment is None for r in effects.refined)
        for _, data in published(effects):
            customer = data.get("customer") or {}
            assert all(customer.get(f) is None for f in ERASED_FIELDS)
    # fields erasure did not remove still move
    plans = [p["plan"] for _, p, _ in history if "plan" in p]
    assert state is not None
    assert state.profile["plan"] in (plans or ["old"])
