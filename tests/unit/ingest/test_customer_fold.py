"""The pure customer fold: event time decides, not arrival order."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest import events as ev
from services.ingest.customer import CustomerState, Draft, Effects, apply, apply_to
from shared import domain_events as de
from shared.contracts import registry
from shared.contracts.inbound import INBOUND

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def inbound(name: str, at: datetime, **data: Any) -> ev.Inbound:
    data.setdefault("customer_id", "c1")
    payload = INBOUND[name].model_validate(data)
    return ev.Inbound(name=name, payload=payload, occurred_at=at)


def emitted(effects: Effects) -> list[tuple[str, dict[str, Any]]]:
    """The events as the handler publishes them: type from the registry, data on the wire —
    which the consumer's strict decode gives back as the same model."""
    out = [(ev.PUBLISHES[type(model)].name, model.to_data()) for model in effects.emit]
    for model, (name, data) in zip(effects.emit, out, strict=True):
        assert registry.decode(name, data, tolerant=False) == model, name
    return out


def fold(events: list[ev.Inbound]) -> CustomerState | None:
    state: CustomerState | None = None
    for i, item in enumerate(events):
        state = apply(state, item, "/src", f"id-{i}-{item.name}-{item.occurred_at}").state
    return state


def test_a_cancellation_makes_the_customer_churned_and_opens_an_episode() -> None:
    effects = apply(
        None,
        inbound(
            "subscription.cancelled",
            T0,
            reason="too_expensive",
            customer={"mrr_minor": 4900, "customer_since": "2025-01-01T00:00:00Z"},
        ),
        "/billing",
        "e1",
    )
    assert effects.state is not None
    assert effects.state.status == "churned"
    assert effects.new_episode is not None
    assert effects.new_episode.reason == "price"
    assert effects.new_episode.mrr_at_churn_minor == 4900
    assert effects.new_episode.tenure_days == 365
    assert [name for name, _ in emitted(effects)] == [de.CHURN_RECORDED]


def test_a_reactivation_that_arrives_first_wins_over_the_older_cancellation() -> None:
    back = apply(None, inbound("subscription.reactivated", T0 + timedelta(days=2)), "/b", "r")
    late = apply(back.state, inbound("subscription.cancelled", T0), "/b", "c")
    assert late.state is not None
    assert late.state.status == "active"
    assert late.new_episode is not None
    assert late.new_episode.ended_at == T0 + timedelta(days=2)
    assert late.new_episode.end_reason == "returned"
    assert late.emit == []


def test_a_reactivation_ends_the_open_episode_and_reports_the_return() -> None:
    churned = apply(None, inbound("subscription.cancelled", T0), "/b", "c")
    back = apply(
        churned.state,
        inbound("subscription.reactivated", T0 + timedelta(days=40), mrr_minor=9900),
        "/b",
        "r",
    )
    assert back.state is not None
    assert back.state.status == "active"
    assert back.state.open_episodes == ()
    assert [e[2] for e in back.ended] == ["returned"]
    assert emitted(back)[0][0] == de.CUSTOMER_RETURNED
    assert emitted(back)[0][1]["mrr_minor"] == 9900


def test_a_stale_profile_update_does_not_overwrite_a_newer_one() -> None:
    new = apply(
        None,
        inbound(
            "customer.updated",
            T0 + timedelta(days=1),
            customer={"plan": "pro", "email": "a@example.com"},
        ),
        "/b",
        "1",
    )
    old = apply(
        new.state,
        inbound("customer.updated", T0, customer={"plan": "basic", "locale": "fi"}),
        "/b",
        "2",
    )
    assert old.state is not None
    assert old.state.profile["plan"] == "pro"
    assert old.state.profile["locale"] == "fi"  # a field the newer update did not set


def test_consent_withdrawal_applies_whatever_its_time() -> None:
    newer = apply(
        None, inbound("customer.updated", T0 + timedelta(days=9), customer={"plan": "x"}), "/b", "1"
    )
    out = apply(newer.state, inbound("consent.withdrawn", T0, channel="sms"), "/b", "2")
    assert out.state is not None
    assert out.state.consent == {"sms": False}
    everything = apply(out.state, inbound("consent.withdrawn", T0, channel="all"), "/b", "3")
    assert everything.state is not None
    assert everything.state.opted_out_all is True


def test_activity_after_inactivity_ends_the_passive_episode() -> None:
    quiet = apply(None, inbound("user.inactive", T0, days_inactive=30), "/p", "i")
    assert quiet.state is not None
    assert quiet.state.status == "inactive"
    assert quiet.new_episode is not None
    assert quiet.new_episode.kind == "user_inactive"
    back = apply(quiet.state, inbound("user.active", T0 + timedelta(days=3)), "/p", "a")
    assert back.state is not None
    assert back.state.status == "active"
    assert [name for name, _ in emitted(back)] == [de.CUSTOMER_RETURNED, de.CUSTOMER_ACTIVITY]


def test_activity_of_a_customer_who_is_not_churned_is_forwarded_once_an_hour() -> None:
    # T0 is on the hour; activity every 20 minutes for 3 hours
    state = None
    forwarded = []
    for i in range(10):
        at = T0 + timedelta(minutes=20 * i)
        effects = apply(state, inbound("user.active", at), "/p", f"e{i}")
        assert effects.state is not None
        state = effects.state
        assert state.activity_at == at  # the register always moves
        forwarded += [d["at"] for name, d in emitted(effects) if name == de.CUSTOMER_ACTIVITY]
    assert forwarded == [(T0 + timedelta(hours=h)).isoformat() for h in range(4)]


def test_a_cancellation_supersedes_an_open_inactivity_episode() -> None:
    quiet = apply(None, inbound("user.inactive", T0), "/p", "i")
    gone = apply(quiet.state, inbound("subscription.cancelled", T0 + timedelta(days=5)), "/b", "c")
    assert [e[2] for e in gone.ended] == ["superseded"]
    assert emitted(gone)[0][1]["superseded"] == [quiet.new_episode.id]  # type: ignore[union-attr]


def test_feature_release_has_no_customer_and_is_passed_on() -> None:
    out = apply(None, inbound("feature.released", T0, feature="sso", customer_id=None), "/p", "f")
    assert out.state is None
    assert emitted(out) == [
        (
            de.FEATURE_RELEASED,
            {"feature": "sso", "name": None, "description": None, "released_at": T0.isoformat()},
        )
    ]


# --- property: arrival order does not change the outcome ------------------------------------
NAMES = [
    "subscription.cancelled",
    "subscription.reactivated",
    "user.inactive",
    "user.active",
    "trial.expired",
    "lead.lost",
    "customer.updated",
]
profile_values = st.fixed_dictionaries(
    {},
    optional={
        "plan": st.sampled_from(["basic", "pro", "team"]),
        "locale": st.sampled_from(["en", "fi", "da"]),
        "mrr_minor": st.integers(0, 100_000),
    },
)


@st.composite
def histories(draw: st.DrawFn) -> list[ev.Inbound]:
    n = draw(st.integers(1, 8))
    hours = draw(st.lists(st.integers(0, 24 * 400), min_size=n, max_size=n, unique=True))
    return [
        inbound(
            draw(st.sampled_from(NAMES)), T0 + timedelta(hours=h), customer=draw(profile_values)
        )
        for h in hours
    ]


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_final_state_does_not_depend_on_arrival_order(events: list[ev.Inbound], rnd: Any) -> None:
    in_time_order = sorted(events, key=lambda e: e.occurred_at)
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, b = fold(in_time_order), fold(shuffled)
    assert a is not None
    assert b is not None
    assert (a.lifecycle, a.lifecycle_at, a.activity, a.activity_at) == (
        b.lifecycle,
        b.lifecycle_at,
        b.activity,
        b.activity_at,
    )
    assert a.status == b.status
    assert a.profile == b.profile


# --- property: the handler's in-place fold is the pure fold ----------------------------------
@settings(max_examples=300, deadline=None)
@given(histories(), st.booleans())
def test_a_draft_changed_in_place_gives_what_apply_gives_event_by_event(
    events: list[ev.Inbound], stored: bool
) -> None:
    start = fold(events[:1]) if stored else None  # a customer loaded from the database, or new
    rest = events[1:] if stored else events
    loaded = copy.deepcopy(start)
    draft = Draft(start) if start is not None else Draft.new("c1")
    state = start
    for i, item in enumerate(rest):
        event_id = f"id-{i}"
        expected = apply(state, item, "/src", event_id)
        got = apply_to(draft, item, "/src", event_id)
        assert (got.new_episode, got.ended, emitted(got)) == (
            expected.new_episode,
            expected.ended,
            emitted(expected),
        )
        assert draft.freeze() == expected.state
        state = expected.state
    assert draft.differs_from(start) == (state != start)
    assert start == loaded, "the draft changed the state it was made from"
