from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.guardrails import decide
from services.scheduler.domain.model import (
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Segment,
    Skip,
)
from services.scheduler.domain.planning import (
    choose_playbook,
    find_playbook,
    next_calendar_boundary,
    plan_steps,
    plan_triggered,
)
from services.scheduler.domain.playbook import Playbook
from services.scheduler.domain.variants import in_holdout
from services.scheduler.domain.windows import window_for

DAY = timedelta(days=1)
CHURN = datetime(2026, 2, 2, 10, tzinfo=UTC)
SEGMENT = Segment("churned_customer", "price", "medium", "high", "established", False)
HIGH_VALUE = Segment("churned_customer", "price", "high", "high", "established", False)
CUSTOMER = CustomerView("cust-1", timezone="Europe/Helsinki")


def playbook(steps: list[dict[str, Any]], **fields: Any) -> Playbook:
    return Playbook.model_validate({"name": "pb", "version": 1, "steps": steps, **fields})


def email(key: str, offset: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "offset": offset, "channel": "email", "template": key, **extra}


SERIES = playbook([email("d0", "0d"), email("d3", "3d"), email("d7", "7d"), email("d14", "14d")])


def episode(**changes: Any) -> ChurnEpisode:
    fields: dict[str, Any] = {
        "episode_id": "ep",
        "kind": "subscription_cancelled",
        "occurred_at": CHURN,
    }
    fields.update(changes)
    return ChurnEpisode(**fields)


def plan(
    pb: Playbook, now: datetime, segment: Segment = SEGMENT, **changes: Any
) -> list[tuple[str, datetime, datetime]]:
    steps = plan_steps(pb, CUSTOMER, episode(**changes), now, segment=segment)
    return [(s.step_key, s.due_at, s.original_due_at) for s in steps]


def test_an_on_time_case_plans_every_step_at_its_offset() -> None:
    now = CHURN + timedelta(seconds=5)
    assert plan(SERIES, now) == [
        ("d0", now, CHURN),  # day 0 is a few seconds late: due now
        ("d3", CHURN + 3 * DAY, CHURN + 3 * DAY),
        ("d7", CHURN + 7 * DAY, CHURN + 7 * DAY),
        ("d14", CHURN + 14 * DAY, CHURN + 14 * DAY),
    ]


@pytest.mark.parametrize(
    ("late_by", "expected"),
    [
        # immediate window (0-7d): the latest past step in it is caught up, d0 dropped
        (5 * DAY, [("d3", "now"), ("d7", 7), ("d14", 14)]),
        # email series window (7-30d): d7 caught up, d0 and d3 (earlier window) dropped
        (10 * DAY, [("d7", "now"), ("d14", 14)]),
        (20 * DAY, [("d14", "now")]),
        # special offer window (1-3mo): no past step in it, nothing left
        (40 * DAY, []),
        # beyond the horizon: nothing
        (400 * DAY, []),
    ],
)
def test_a_late_churn_starts_at_its_window_without_a_burst(
    late_by: timedelta, expected: list[tuple[str, object]]
) -> None:
    now = CHURN + late_by
    planned = plan(SERIES, now)
    assert [
        (key, "now" if due == now else (due - CHURN).days) for key, due, _ in planned
    ] == expected


def test_a_late_churn_keeps_a_whole_touch_email_plus_crm() -> None:
    pb = playbook(
        [
            email("d0", "0d"),
            email("d3", "3d"),
            {"key": "call", "offset": "3d", "channel": "crm", "template": "crm_personal_outreach"},
            email("d9", "9d"),
        ]
    )
    now = CHURN + 5 * DAY
    assert plan(pb, now) == [
        ("d3", now, CHURN + 3 * DAY),
        ("call", now, CHURN + 3 * DAY),
        ("d9", CHURN + 9 * DAY, CHURN + 9 * DAY),
    ]


def test_a_churn_dated_in_the_future_plans_from_the_churn() -> None:
    assert [key for key, *_ in plan(SERIES, CHURN - DAY)] == ["d0", "d3", "d7", "d14"]
    assert plan(SERIES, CHURN - DAY)[0][1] == CHURN


def test_steps_filtered_by_segment_with_when() -> None:
    pb = playbook(
        [
            email("d0", "0d"),
            {
                "key": "call",
                "offset": "1d",
                "channel": "crm",
                "template": "crm_personal_outreach",
                "when": {"value_tiers": ["high"]},
            },
        ]
    )
    assert [k for k, *_ in plan(pb, CHURN, HIGH_VALUE)] == ["d0", "call"]
    assert [k for k, *_ in plan(pb, CHURN, SEGMENT)] == ["d0"]


def test_planned_step_carries_variant_window_and_horizon() -> None:
    pb = playbook(
        [
            email(
                "d45",
                "45d",
                variants=[
                    {
                        "name": "a",
                        "weight": 1,
                        "template": "special_offer",
                        "offer": "bonus_features",
                    }
                ],
            )
        ],
        holdout=0.0,
    )
    (step,) = plan_steps(pb, CUSTOMER, episode(), CHURN, segment=SEGMENT)
    assert (step.variant, step.template, step.offer, step.window) == (
        "a",
        "special_offer",
        "bonus_features",
        "special_offer",
    )
    assert step.expires_at == CHURN + 365 * DAY
    assert (step.playbook, step.playbook_version, step.holdout, step.caught_up) == (
        "pb",
        1,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("rule", "after", "zone", "fiscal_month", "expected"),
    [
        (
            "budget_cycle",
            datetime(2026, 3, 10, tzinfo=UTC),
            "Europe/Helsinki",
            1,
            datetime(2026, 12, 31, 22, tzinfo=UTC),
        ),
        (
            "budget_cycle",
            datetime(2026, 3, 10, tzinfo=UTC),
            "Europe/Helsinki",
            7,
            datetime(2026, 6, 30, 21, tzinfo=UTC),
        ),
        (
            "budget_cycle",
            datetime(2026, 7, 19, tzinfo=UTC),
            "UTC",
            7,
            datetime(2027, 7, 1, tzinfo=UTC),
        ),
        (
            "budget_cycle",
            datetime(2027, 1, 1, tzinfo=UTC),
            "UTC",
            1,
            datetime(2028, 1, 1, tzinfo=UTC),
        ),  # strictly after
        (
            "quarter_start",
            datetime(2026, 3, 10, tzinfo=UTC),
            "UTC",
            1,
            datetime(2026, 4, 1, tzinfo=UTC),
        ),
        (
            "quarter_start",
            datetime(2026, 3, 10, tzinfo=UTC),
            "UTC",
            2,
            datetime(2026, 5, 1, tzinfo=UTC),
        ),
        (
            "quarter_start",
            datetime(2026, 11, 20, tzinfo=UTC),
            "America/New_York",
            1,
            datetime(2027, 1, 1, 5, tzinfo=UTC),
        ),
    ],
)
def test_calendar_rules_find_the_next_budget_boundary(
    rule: Any, after: datetime, zone: str, fiscal_month: int, expected: datetime
) -> None:
    from zoneinfo import ZoneInfo

    assert next_calendar_boundary(rule, after, ZoneInfo(zone), fiscal_month) == expected


def test_budget_cycle_step_uses_the_customers_fiscal_year_and_not_before() -> None:
    pb = playbook(
        [
            {
                "key": "budget",
                "calendar": "budget_cycle",
                "not_before": "60d",
                "channel": "email",
                "template": "budget_checkin",
            }
        ],
        horizon="15mo",
    )
    customer = CustomerView("c", timezone="UTC", fiscal_year_start_month=4)
    churn = datetime(2026, 2, 15, tzinfo=UTC)  # + 60 days = 16 April: this April has passed
    (step,) = plan_steps(pb, customer, episode(occurred_at=churn), churn, segment=SEGMENT)
    assert step.due_at == datetime(2027, 4, 1, tzinfo=UTC)
    assert step.window == "last_attempt"


FEATURE_PLAYBOOK = playbook(
    [
        email("d0", "0d"),
        {
            "key": "built",
            "trigger": "feature.released",
            "channel": "email",
            "template": "feature_built",
        },
    ],
    horizon="18mo",
)


@pytest.mark.parametrize(
    ("episode_feature", "released", "months_later", "fires"),
    [
        ("dark_mode", "dark_mode", 1, True),
        ("Dark Mode", "dark-mode", 14, True),  # long after, still inside the 18-month horizon
        ("dark_mode", "sso", 1, False),
        (None, "dark_mode", 1, False),
        ("dark_mode", "dark_mode", 19, False),  # past the horizon
    ],
)
def test_feature_release_wakes_exactly_the_customers_who_asked(
    episode_feature: str | None, released: str, months_later: int, fires: bool
) -> None:
    now = CHURN + months_later * 30 * DAY
    steps = plan_triggered(
        FEATURE_PLAYBOOK,
        CUSTOMER,
        episode(feature=episode_feature, reason="missing_feature"),
        now,
        feature=released,
        segment=SEGMENT,
    )
    assert [(s.step_key, s.due_at, s.trigger) for s in steps] == (
        [("built", now, "feature.released")] if fires else []
    )


def test_feature_release_does_not_replan_a_step_already_planned() -> None:
    ep = episode(feature="sso")
    assert (
        plan_triggered(
            FEATURE_PLAYBOOK,
            CUSTOMER,
            ep,
            CHURN,
            feature="sso",
            segment=SEGMENT,
            already_planned=["built"],
        )
        == []
    )


def test_triggered_steps_are_not_planned_by_time() -> None:
    assert [k for k, *_ in plan(FEATURE_PLAYBOOK, CHURN)] == ["d0"]


def test_holdout_customers_are_planned_but_never_sent() -> None:
    pb = playbook([email("d0", "0d")], holdout=0.5)
    ids = [f"cust-{n}" for n in range(40)]
    held = [i for i in ids if in_holdout(i, "pb", 0.5)]
    assert held
    assert len(held) < len(ids)
    customer = CustomerView(held[0], consent={"email": True})
    (step,) = plan_steps(pb, customer, episode(), CHURN, segment=SEGMENT)
    assert step.holdout
    decision = decide(step, customer=customer, segment=SEGMENT, history=ContactHistory(), now=CHURN)
    assert decision == Skip("holdout")


def named(name: str, version: int = 1, priority: int = 0, **match: Any) -> Playbook:
    return Playbook.model_validate(
        {
            "name": name,
            "version": version,
            "priority": priority,
            "match": match,
            "steps": [email("d0", "0d")],
        }
    )


@pytest.mark.parametrize(
    ("playbooks", "chosen"),
    [
        ([named("a", priority=1), named("b", priority=5)], ("b", 1)),
        ([named("a", priority=5, reasons=["budget"]), named("b", priority=1)], ("b", 1)),
        ([named("b", priority=3), named("a", priority=3)], ("a", 1)),  # tie: by name
        ([named("a", 1, priority=1), named("a", 2, priority=1)], ("a", 2)),  # latest version
        (
            [
                named("a", 1, priority=9),
                named("a", 2, priority=1, reasons=["budget"]),
                named("b", priority=1),
            ],
            ("b", 1),
        ),
        ([named("a", priority=1, lifecycle=["lost_lead"])], None),
    ],
)
def test_choose_playbook_takes_the_highest_priority_latest_match(
    playbooks: list[Playbook], chosen: tuple[str, int] | None
) -> None:
    result = choose_playbook(playbooks, SEGMENT)
    assert ((result.name, result.version) if result else None) == chosen


def test_find_playbook_returns_the_version_a_case_started_with() -> None:
    old, new = named("a", 1), named("a", 2)
    assert find_playbook([new, old], "a", 1) is old
    with pytest.raises(KeyError):
        find_playbook([new, old], "a", 3)


# --- property: planned steps stay inside the case and never burst --------------------------

HORIZONS = {"3mo": 90, "1y": 365, "18mo": 540}


@st.composite
def random_playbooks(draw: st.DrawFn) -> Playbook:
    horizon = draw(st.sampled_from(sorted(HORIZONS)))
    hours = HORIZONS[horizon] * 24
    offsets = draw(st.lists(st.integers(0, hours - 1), min_size=1, max_size=10))
    steps: list[dict[str, Any]] = [
        {"key": f"s{i}", "offset": timedelta(hours=h), "channel": "email", "template": "t"}
        for i, h in enumerate(offsets)
    ]
    if draw(st.booleans()):
        steps.append(
            {
                "key": "budget",
                "calendar": draw(st.sampled_from(["budget_cycle", "quarter_start"])),
                "channel": "email",
                "template": "t",
                "not_before": timedelta(days=draw(st.integers(0, 60))),
            }
        )
    return playbook(steps, horizon=horizon)


@settings(max_examples=200, deadline=None)
@given(
    pb=random_playbooks(),
    late_by=st.timedeltas(min_value=-10 * DAY, max_value=600 * DAY),
    zone=st.sampled_from([None, "Europe/Helsinki", "America/Santiago", "Pacific/Chatham"]),
    fiscal=st.one_of(st.none(), st.integers(1, 12)),
)
def test_planned_steps_stay_inside_the_case_and_never_burst(
    pb: Playbook, late_by: timedelta, zone: str | None, fiscal: int | None
) -> None:
    customer = CustomerView("c", timezone=zone, fiscal_year_start_month=fiscal)
    now = CHURN + late_by
    planned = plan_steps(pb, customer, episode(), now, segment=SEGMENT)
    start = max(now, CHURN)
    horizon_end = CHURN + pb.ladder.horizon

    assert [s.due_at for s in planned] == sorted(s.due_at for s in planned)
    for step in planned:
        assert CHURN <= step.original_due_at < horizon_end, (
            "no step before churn or after the horizon"
        )
        assert start <= step.due_at < horizon_end
        assert step.expires_at == horizon_end
        assert step.window == pb.ladder.window_for(step.due_at - CHURN).name  # type: ignore[union-attr]
    caught_up = [s for s in planned if s.caught_up]
    assert len({s.original_due_at for s in caught_up}) <= 1, "at most one past touch"
    current = window_for(start - CHURN, pb.ladder) if start < horizon_end else None
    for step in caught_up:
        assert step.due_at == start
        assert step.original_due_at < start
        assert pb.ladder.window_for(step.original_due_at - CHURN) == current
    on_time = [s for s in planned if not s.caught_up]
    assert all(s.due_at >= start for s in on_time)
    expected_on_time = sorted(
        step.key
        for step in pb.steps
        if step.offset is not None and start <= CHURN + step.offset < horizon_end
    )
    assert sorted(s.step_key for s in on_time if s.step_key != "budget") == expected_on_time
    if late_by <= timedelta(0):
        assert not caught_up
