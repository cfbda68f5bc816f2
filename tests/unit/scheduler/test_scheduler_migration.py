"""Moving an open case onto a new playbook version (pure): what is kept, cancelled, retimed,
updated and added — and the invariants that hold for any two versions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.migration import (
    MIGRATED,
    CaseStep,
    Migration,
    plan_migration,
)
from services.scheduler.domain.model import ChurnEpisode, CustomerView, PlannedStep, Segment
from services.scheduler.domain.planning import plan_steps, plan_triggered
from services.scheduler.domain.playbook import Playbook

DAY = timedelta(days=1)
CHURN = datetime(2026, 2, 2, 10, tzinfo=UTC)
SEGMENT = Segment("churned_customer", "price", "medium", "high", "established", False)
HIGH_VALUE = replace(SEGMENT, value_tier="high")
CUSTOMER = CustomerView("cust-1", timezone="Europe/Helsinki")
EPISODE = ChurnEpisode("ep", "subscription_cancelled", CHURN, feature="sso")


def playbook(version: int, steps: list[dict[str, Any]], **fields: Any) -> Playbook:
    return Playbook.model_validate({"name": "pb", "version": version, "steps": steps, **fields})


def email(key: str, offset: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "offset": offset, "channel": "email", "template": "we_miss_you", **extra}


V1 = playbook(1, [email("d0", "0d"), email("d3", "3d"), email("d7", "7d")])
# drops d3, moves d7 to day 10 with another template, adds d5
V2 = playbook(
    2,
    [email("d0", "0d"), email("d5", "5d"), email("d7", "10d", template="special_offer")],
)


def opened(pb: Playbook, at: datetime = CHURN, segment: Segment = SEGMENT) -> list[CaseStep]:
    """The case's steps as planned when it opened at ``at``, all pending."""
    return [CaseStep(s, "pending") for s in plan_steps(pb, CUSTOMER, EPISODE, at, segment=segment)]


def with_state(steps: list[CaseStep], key: str, state: str, reason: str | None = None) -> None:
    for i, step in enumerate(steps):
        if step.step_key == key:
            steps[i] = replace(step, state=state, state_reason=reason)
            return
    raise KeyError(key)


def migrate(
    target: Playbook,
    current: list[CaseStep],
    now: datetime,
    segment: Segment = SEGMENT,
    **kw: Any,
) -> Migration:
    return plan_migration(
        target, current, CUSTOMER, EPISODE, now, segment=segment, from_version=1, **kw
    )


def keys(m: Migration) -> dict[str, list[str]]:
    return {
        "added": [s.step_key for s in m.added],
        "cancelled": [c.step_key for c in m.cancelled],
        "retimed": [c.step_key for c in m.retimed],
        "updated": [c.step_key for c in m.updated],
        "kept": list(m.kept),
        "unchanged": list(m.unchanged),
    }


def test_sent_kept_dropped_cancelled_changed_retimed_new_planned() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    now = CHURN + DAY
    m = migrate(V2, steps, now)
    assert keys(m) == {
        "added": ["d5"],
        "cancelled": ["d3"],
        "retimed": ["d7"],
        "updated": [],
        "kept": ["d0"],
        "unchanged": [],
    }
    assert (m.playbook, m.from_version, m.to_version) == ("pb", 1, 2)
    assert m.cancelled[0].cause == "removed"
    (d5,) = m.added
    assert d5.due_at == d5.original_due_at == CHURN + 5 * DAY
    assert d5.playbook_version == 2
    (d7,) = m.retimed
    assert d7.before.due_at == CHURN + 7 * DAY
    assert d7.after.due_at == CHURN + 10 * DAY
    assert d7.after.template == "special_offer"
    assert d7.after.window == "email_series"
    assert m.step_changes == 3


@pytest.mark.parametrize("state", ["dispatched", "sent", "failed", "suppressed", "skipped"])
def test_a_step_that_left_is_never_touched_even_when_the_new_version_drops_or_moves_it(
    state: str,
) -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    with_state(steps, "d3", state)  # d3 is gone from V2
    moved = playbook(2, [email("d0", "1d"), email("d3", "4d"), email("d7", "7d")])
    for target in (V2, moved):
        m = migrate(target, steps, CHURN + 3 * DAY)
        assert "d3" in m.kept
        assert "d0" in m.kept
        touched = [s.step_key for s in m.added] + [c.step_key for c in m.cancelled]
        touched += [c.step_key for c in (*m.retimed, *m.updated)]
        assert "d3" not in touched
        assert "d0" not in touched


def test_the_same_version_again_changes_nothing() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    m = migrate(V1, steps, CHURN + 2 * DAY)
    assert m.step_changes == 0
    assert m.unchanged == ("d3", "d7")
    assert m.kept == ("d0",)


def test_new_content_at_the_same_time_keeps_a_deferral() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    # d3 fell due at night and was deferred to the morning
    deferred_to = CHURN + 3 * DAY + timedelta(hours=9)
    steps[1] = replace(steps[1], planned=replace(steps[1].planned, due_at=deferred_to))
    v2 = playbook(
        2, [email("d0", "0d"), email("d3", "3d", template="what_you_missed"), email("d7", "7d")]
    )
    m = migrate(v2, steps, CHURN + 3 * DAY + timedelta(hours=1))
    assert keys(m)["updated"] == ["d3"]
    assert keys(m)["unchanged"] == ["d7"]
    (d3,) = m.updated
    assert d3.after.template == "what_you_missed"
    assert d3.after.due_at == deferred_to
    assert d3.after.original_due_at == CHURN + 3 * DAY


def test_a_moved_step_whose_new_time_passed_follows_the_late_churn_rule() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    now = CHURN + 4 * DAY
    # d3 moves to day 2 (passed; the latest touch of the immediate window: due now)
    caught = migrate(
        playbook(2, [email("d0", "0d"), email("d3", "2d"), email("d7", "7d")]), steps, now
    )
    assert keys(caught)["retimed"] == ["d3"]
    assert caught.retimed[0].after.due_at == now
    assert caught.retimed[0].after.original_due_at == CHURN + 2 * DAY
    # d3 moves to day 1 and a new d2 comes in at day 2: d2 is the latest past touch, d3 is
    # dropped — no burst of past steps
    v2 = playbook(2, [email("d0", "0d"), email("d3", "1d"), email("d2", "2d"), email("d7", "7d")])
    dropped = migrate(v2, steps, now)
    assert [(c.step_key, c.cause) for c in dropped.cancelled] == [("d3", "missed")]
    assert [(s.step_key, s.due_at) for s in dropped.added] == [("d2", now)]


def test_a_new_step_in_the_past_is_not_planned_when_a_later_touch_of_the_window_passed() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    with_state(steps, "d3", "sent")
    v2 = playbook(2, [email("d0", "0d"), email("d1", "1d"), email("d3", "3d"), email("d7", "7d")])
    m = migrate(v2, steps, CHURN + 4 * DAY)
    assert m.added == ()  # d3 (sent) is the latest past touch: d1 would be a burst
    assert m.step_changes == 0


def test_a_step_that_no_longer_applies_to_the_segment_is_cancelled() -> None:
    with_crm = playbook(
        1,
        [
            email("d0", "0d"),
            {"key": "d1", "offset": "1d", "channel": "crm", "template": "crm_personal_outreach"},
        ],
    )
    steps = opened(with_crm, segment=HIGH_VALUE)
    narrowed = playbook(
        2,
        [
            email("d0", "0d"),
            {
                "key": "d1",
                "offset": "1d",
                "channel": "crm",
                "template": "crm_personal_outreach",
                "when": {"value_tiers": ["low"]},
            },
        ],
    )
    m = migrate(narrowed, steps, CHURN, segment=HIGH_VALUE)
    assert [(c.step_key, c.cause) for c in m.cancelled] == [("d1", "not_planned")]


def test_a_horizon_that_has_passed_cancels_every_pending_step() -> None:
    steps = opened(playbook(1, [email("d0", "0d"), email("d40", "40d"), email("d60", "60d")]))
    with_state(steps, "d0", "sent")
    short = playbook(2, [email("d0", "0d"), email("d20", "20d")], horizon="1mo")
    m = migrate(short, steps, CHURN + 35 * DAY)
    assert m.expires_at == CHURN + short.ladder.horizon
    assert [(c.step_key, c.cause) for c in m.cancelled] == [("d40", "horizon"), ("d60", "horizon")]
    assert m.added == ()


def test_a_step_cancelled_by_an_earlier_migration_comes_back_when_a_version_restores_it() -> None:
    steps = opened(V1)
    with_state(steps, "d3", "cancelled", MIGRATED)
    back = migrate(V1, steps, CHURN + DAY)
    assert [s.step_key for s in back.added] == ["d3"]
    assert "d3" not in back.kept
    with_state(steps, "d3", "cancelled", "case closed: returned")
    assert migrate(V1, steps, CHURN + DAY).added == ()


def test_the_case_keeps_its_holdout_assignment() -> None:
    steps = opened(V1)
    with_state(steps, "d0", "sent")
    m = migrate(V2, steps, CHURN + DAY, holdout=True)
    assert all(s.holdout for s in m.added)
    assert all(c.after.holdout for c in m.retimed)
    unchanged = migrate(V1, opened(V1), CHURN, holdout=False)
    assert unchanged.step_changes == 0


def test_triggered_steps() -> None:
    v1 = playbook(
        1,
        [
            email("d0", "0d"),
            email("d3", "3d"),
            {"key": "built", "trigger": "feature.released", "channel": "email",
             "template": "feature_built"},
        ],
    )  # fmt: skip
    now = CHURN + 40 * DAY
    woken = plan_triggered(v1, CUSTOMER, EPISODE, now, feature="sso", segment=SEGMENT)
    steps = [*opened(v1), *(CaseStep(s, "pending") for s in woken)]
    with_state(steps, "d0", "sent")
    with_state(steps, "d3", "sent")
    v2 = playbook(
        2,
        [
            email("d0", "0d"),
            {"key": "d3", "trigger": "feature.released", "channel": "email",
             "template": "feature_built"},
            {"key": "built", "trigger": "feature.released", "channel": "sms",
             "template": "feature_built"},
            {"key": "built2", "trigger": "feature.released", "channel": "email",
             "template": "feature_built"},
        ],
    )  # fmt: skip
    m = migrate(v2, steps, now + timedelta(hours=1))
    assert keys(m)["updated"] == ["built"]
    assert m.updated[0].after.channel == "sms"
    assert m.updated[0].after.due_at == now  # a woken step keeps its time
    assert m.added == ()  # triggered steps wait for their trigger

    pending_d3 = opened(v1)
    m2 = migrate(v2, pending_d3, CHURN + DAY)
    assert [(c.step_key, c.cause) for c in m2.cancelled] == [("d3", "now_triggered")]


def test_a_key_twice_is_refused() -> None:
    steps = opened(V1)
    with pytest.raises(ValueError, match="twice"):
        migrate(V2, [*steps, steps[0]], CHURN)


# -- invariants over any two versions ---------------------------------------------------------
POOL = [f"s{i}" for i in range(7)]
STATES = ["pending", "pending", "pending", "dispatched", "sent", "skipped", "failed", "cancelled"]


@st.composite
def versions(draw: st.DrawFn, version: int) -> Playbook:
    chosen = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=len(POOL), unique=True))
    templates = ["we_miss_you", "what_you_missed", "last_chance"]
    steps: list[dict[str, Any]] = [
        {
            "key": key,
            "offset": timedelta(hours=draw(st.integers(0, 24 * 200))),
            "channel": draw(st.sampled_from(["email", "sms", "crm"])),
            "template": draw(st.sampled_from(templates)),
            **(
                {"when": {"value_tiers": [draw(st.sampled_from(["high", "medium"]))]}}
                if draw(st.booleans()) and key != chosen[0]
                else {}
            ),
        }
        for key in chosen
    ]
    if draw(st.booleans()):
        steps.append(
            {
                "key": "cal",
                "calendar": draw(st.sampled_from(["budget_cycle", "quarter_start"])),
                "not_before": timedelta(days=draw(st.integers(0, 90))),
                "channel": "email",
                "template": "check_in",
            }
        )
    horizon = draw(st.sampled_from([None, "9mo", "1y", "18mo"]))
    return playbook(version, steps, **({"horizon": horizon} if horizon else {}))


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[CaseStep], datetime]:
    """A case on version 1, opened at some time after churn, looked at later on, with each
    step's state as the timer could have left it."""
    old = draw(versions(1))
    opened_after = timedelta(hours=draw(st.integers(0, 24 * 60)))
    now = CHURN + opened_after + timedelta(hours=draw(st.integers(0, 24 * 250)))
    steps: list[CaseStep] = []
    for step in plan_steps(old, CUSTOMER, EPISODE, CHURN + opened_after, segment=SEGMENT):
        if step.due_at <= now:
            state = draw(st.sampled_from(STATES))
            if state == "pending" and draw(st.booleans()):  # deferred
                later = step.due_at + timedelta(hours=draw(st.integers(1, 24 * 40)))
                step = replace(step, due_at=later)
        else:
            state = draw(st.sampled_from(["pending", "pending", "cancelled"]))
        reason = MIGRATED if state == "cancelled" and draw(st.booleans()) else None
        steps.append(CaseStep(step, state, reason))
    return steps, now


def applied(current: list[CaseStep], m: Migration) -> list[CaseStep]:
    by_key = {s.step_key: s for s in current}
    for c in m.cancelled:
        by_key[c.step_key] = CaseStep(c.step, "cancelled", MIGRATED)
    for change in (*m.retimed, *m.updated):
        by_key[change.step_key] = CaseStep(change.after, "pending")
    for step in m.added:
        by_key[step.step_key] = CaseStep(step, "pending")
    return list(by_key.values())


@settings(max_examples=300, deadline=None)
@given(case=cases(), target=versions(2), later=st.integers(0, 24 * 400))
def test_a_migration_never_resends_never_bursts_and_is_idempotent(
    case: tuple[list[CaseStep], datetime], target: Playbook, later: int
) -> None:
    current, now = case
    m = migrate(target, current, now)
    by_key = {s.step_key: s for s in current}
    expires = CHURN + target.ladder.horizon

    # every key of the case lands in exactly one bucket; an added key is new or revived
    buckets = keys(m)
    listed = [k for bucket in buckets.values() for k in bucket]
    assert len(listed) == len(set(listed)), "a key in two buckets (or twice)"
    assert set(by_key) <= set(listed)
    for key in buckets["added"]:
        assert key not in by_key or by_key[key].revivable, "a step key planned twice"
    # steps that left are untouched
    for key, existing in by_key.items():
        if not existing.pending and not (existing.revivable and key in buckets["added"]):
            assert key in m.kept
    for key in m.kept:
        assert not by_key[key].pending
    for bucket in ("cancelled", "retimed", "updated", "unchanged"):
        assert all(by_key[k].pending for k in buckets[bucket]), bucket
    # new times: never before now (nor the churn), inside the horizon; at most one past touch
    target_keys = {s.key for s in target.steps}
    timed: list[PlannedStep] = [*m.added, *(c.after for c in m.retimed)]
    for step in timed:
        assert max(now, CHURN) <= step.due_at < expires
        assert CHURN <= step.original_due_at < expires
    for step in [*timed, *(c.after for c in m.updated)]:
        assert step.step_key in target_keys
        assert step.playbook_version == 2
        assert step.expires_at == expires
    for change in m.updated:
        assert change.after.due_at == change.before.due_at, "a content update keeps the time"
    caught_up = {s.original_due_at for s in timed if s.caught_up}
    assert len(caught_up) <= 1, "a burst of past steps"
    # only a key the new version dropped is cancelled as removed (or all of them at its horizon)
    for c in m.cancelled:
        assert (c.step_key in target_keys) == (c.cause != "removed") or c.cause == "horizon"
    if now >= expires:
        assert all(c.cause == "horizon" for c in m.cancelled)
        assert m.added == ()

    # the same migration again, now or later, changes nothing
    after = applied(current, m)
    assert migrate(target, after, now).step_changes == 0
    again = migrate(target, after, now + timedelta(hours=later))
    assert (again.added, again.retimed, again.updated) == ((), (), ())
    assert all(c.cause == "horizon" for c in again.cancelled)
