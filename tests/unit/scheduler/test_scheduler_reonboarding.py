"""Re-onboarding of won-back customers, in the pure core: the ``starts_on`` field, choosing
a playbook at return time, planning from the return, and the inactivity monitoring step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.scheduler.domain import (
    Channel,
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Defer,
    PlannedStep,
    Playbook,
    Segment,
    Send,
    Skip,
    choose_playbook,
    decide,
    in_holdout,
    load_playbooks,
    plan_reonboarding,
    plan_steps,
)
from services.scheduler.domain.errors import PlaybookError
from services.scheduler.domain.loader import parse_playbook
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

SHIPPED = Path(__file__).parents[3] / "services" / "scheduler" / "playbooks"
DAY = timedelta(days=1)
CHURN = datetime(2026, 3, 2, 8, tzinfo=UTC)  # a Monday, 10:00 in Helsinki
RETURN = datetime(2026, 4, 20, 6, tzinfo=UTC)  # a Monday, 09:00 in Helsinki (EEST)
EPISODE = ChurnEpisode("ep1", "subscription_cancelled", CHURN, reason="price")
PRICE = Segment("churned_customer", "price", "high", "high", "established", False)
CONSENTING: dict[Channel, bool] = {"email": True, "crm": True}

REONBOARDING = """\
name: back
version: 1
starts_on: returned
match:
  reasons: [price]
horizon: 90d
steps:
  - key: d1_welcome
    offset: 1d
    channel: email
    template: whats_new
  - key: d21_at_risk
    offset: 21d
    channel: crm
    template: crm_personal_outreach
    inactive_for: 21d
"""


def customer(cid: str = "c1", last_active_at: datetime | None = None) -> CustomerView:
    return CustomerView(
        cid, timezone="Europe/Helsinki", consent=CONSENTING, last_active_at=last_active_at
    )


def not_in_holdout(playbook: Playbook) -> str:
    return next(
        f"c{i}" for i in range(100) if not in_holdout(f"c{i}", playbook.name, playbook.holdout)
    )


# -- the schema -------------------------------------------------------------------------------
def test_starts_on_defaults_to_churned_and_takes_returned() -> None:
    back = parse_playbook(REONBOARDING)
    assert back.starts_on == "returned"
    assert back.is_reonboarding
    plain = parse_playbook(
        REONBOARDING.replace("starts_on: returned\n", "").replace("    inactive_for: 21d\n", "")
    )
    assert plain.starts_on == "churned"
    assert not plain.is_reonboarding
    assert back.step("d21_at_risk").inactive_for == 21 * DAY


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("starts_on: returned", "starts_on: returning"), "broken.yaml:3: starts_on"),
        (
            ("starts_on: returned\n", ""),
            "broken.yaml:15: steps[1].inactive_for: only applies to a re-onboarding",
        ),
        (
            ("    inactive_for: 21d", "    inactive_for: soon"),
            "broken.yaml:16: steps[1].inactive_for: 'soon' is not a duration",
        ),
        (
            ("horizon: 90d", "horizon: 90d\nexit_on: [reactivated, unsubscribed_all, activity]"),
            "broken.yaml:7: exit_on",
        ),
        (
            ("    template: whats_new", "    template: whats_new\n    trigger: feature.released"),
            "broken.yaml:12: steps[0].trigger: a re-onboarding playbook",
        ),
    ],
)
def test_bad_reonboarding_fields_are_reported_with_file_line_and_field(
    change: tuple[str, str], where: str
) -> None:
    with pytest.raises(PlaybookError) as raised:
        parse_playbook(REONBOARDING.replace(*change), "broken.yaml")
    assert where in str(raised.value)


def test_reonboarding_never_offers_a_discount() -> None:
    text = REONBOARDING.replace(
        "    template: whats_new",
        "    template: special_offer\n    offer: discount_50pct_3mo\n    is_discount: true",
    )
    with pytest.raises(PlaybookError) as raised:
        parse_playbook(text, "x.yaml", templates=TEMPLATE_NAMES, offers=OFFERS)
    assert "steps[0].is_discount: re-onboarding" in str(raised.value)
    # a discount offer without is_discount is caught by the catalogue
    sneaky = REONBOARDING.replace(
        "    template: whats_new", "    template: special_offer\n    offer: free_month"
    )
    with pytest.raises(PlaybookError, match="is a discount"):
        parse_playbook(sneaky, "x.yaml", templates=TEMPLATE_NAMES, offers=OFFERS)


def test_the_shipped_reonboarding_playbooks_cover_every_reason_and_never_discount() -> None:
    playbooks = load_playbooks(SHIPPED, templates=TEMPLATE_NAMES, offers=OFFERS)
    back = [p for p in playbooks if p.is_reonboarding]
    assert {r for p in back for r in (p.match.reasons or ())} >= {
        "price",
        "missing_feature",
        "poor_experience",
    }
    assert any(p.match == p.match.__class__() for p in back)  # a default for any reason
    for playbook in back:
        assert not any(s.is_discount or (s.offer and OFFERS[s.offer]) for s in playbook.steps)
        assert any(s.inactive_for is not None for s in playbook.steps)
        assert playbook.ladder.horizon == 90 * DAY


# -- choosing -----------------------------------------------------------------------------------
def test_churn_time_choice_never_picks_reonboarding_and_return_time_only_picks_it() -> None:
    playbooks = load_playbooks(SHIPPED, templates=TEMPLATE_NAMES, offers=OFFERS)
    for reason in ("price", "missing_feature", "poor_experience", "budget", "unknown"):
        seg = Segment("churned_customer", reason, "high", "high", "established", False)
        churned = choose_playbook(playbooks, seg)
        returned = choose_playbook(playbooks, seg, starts_on="returned")
        assert churned is not None
        assert not churned.is_reonboarding
        assert returned is not None
        assert returned.is_reonboarding
    price = choose_playbook(playbooks, PRICE, starts_on="returned")
    assert price is not None
    assert price.name == "reonboarding_price"
    budget = Segment("churned_customer", "budget", "low", "low", "new", True)
    fallback = choose_playbook(playbooks, budget, starts_on="returned")
    assert fallback is not None
    assert fallback.name == "reonboarding_default"


# -- planning from the return -------------------------------------------------------------------
def test_steps_are_planned_from_the_return_in_the_local_window() -> None:
    playbook = parse_playbook(REONBOARDING)
    steps = plan_reonboarding(
        playbook, customer(), EPISODE, RETURN, RETURN + timedelta(seconds=5), segment=PRICE
    )
    assert [(s.step_key, s.due_at) for s in steps] == [
        ("d1_welcome", RETURN + DAY),
        ("d21_at_risk", RETURN + 21 * DAY),
    ]
    assert all(s.expires_at == RETURN + 90 * DAY for s in steps)
    assert steps[1].inactive_for == 21 * DAY
    assert steps[0].inactive_for is None
    # the churn-time planner would have put them 49 days earlier: long in the past
    churn_time = plan_steps(playbook, customer(), EPISODE, RETURN, segment=PRICE)
    assert [s.step_key for s in churn_time] == []


def test_a_return_recorded_late_catches_up_one_touch_not_a_burst() -> None:
    playbook = parse_playbook(REONBOARDING)
    steps = plan_reonboarding(
        playbook, customer(), EPISODE, RETURN, RETURN + 25 * DAY, segment=PRICE
    )
    assert [(s.step_key, s.due_at) for s in steps] == [("d21_at_risk", RETURN + 25 * DAY)]


def test_only_a_reonboarding_playbook_plans_from_a_return() -> None:
    plain = parse_playbook(
        REONBOARDING.replace("starts_on: returned\n", "").replace("    inactive_for: 21d\n", "")
    )
    with pytest.raises(ValueError, match="not a re-onboarding playbook"):
        plan_reonboarding(plain, customer(), EPISODE, RETURN, RETURN, segment=PRICE)


def test_holdout_applies_to_reonboarding_too() -> None:
    playbook = parse_playbook(REONBOARDING.replace("version: 1", "version: 1\nholdout: 0.5"))
    held = next(f"c{i}" for i in range(100) if in_holdout(f"c{i}", "back", 0.5))
    steps = plan_reonboarding(playbook, customer(held), EPISODE, RETURN, RETURN, segment=PRICE)
    assert steps
    assert all(s.holdout for s in steps)
    decision = decide(
        steps[0],
        customer=customer(held),
        segment=PRICE,
        history=ContactHistory(),
        now=steps[0].due_at,
    )
    assert decision == Skip("holdout")


# -- monitoring: the inactivity condition, with an injected clock ------------------------------
def at_risk_step() -> PlannedStep:
    playbook = parse_playbook(REONBOARDING)
    cid = not_in_holdout(playbook)
    steps = plan_reonboarding(playbook, customer(cid), EPISODE, RETURN, RETURN, segment=PRICE)
    return next(s for s in steps if s.step_key == "d21_at_risk")


def decide_at(now: datetime, last_active_at: datetime | None) -> object:
    return decide(
        at_risk_step(),
        customer=customer(last_active_at=last_active_at),
        segment=PRICE,
        history=ContactHistory(),
        now=now,
        watch_from=RETURN,
    )


def test_the_at_risk_step_goes_when_nothing_happened_since_the_return() -> None:
    due = RETURN + 21 * DAY
    assert isinstance(decide_at(due, None), Send)
    # activity before the return is not activity since the return
    assert isinstance(decide_at(due, RETURN - 3 * DAY), Send)
    assert isinstance(decide_at(due, RETURN), Send)


def test_the_at_risk_step_waits_while_the_customer_is_active() -> None:
    due = RETURN + 21 * DAY
    active = RETURN + 5 * DAY
    assert decide_at(due, active) == Defer(active + 21 * DAY, "not_at_risk")
    # still quiet since then when it comes round again: it goes
    assert isinstance(decide_at(active + 21 * DAY, active), Send)


def test_the_at_risk_step_is_skipped_when_activity_carries_past_the_horizon() -> None:
    late = RETURN + 80 * DAY
    assert decide_at(RETURN + 81 * DAY, late) == Skip(
        "not_at_risk", "active until the case horizon"
    )


def test_a_step_without_inactive_for_ignores_activity() -> None:
    playbook = parse_playbook(REONBOARDING)
    cid = not_in_holdout(playbook)
    welcome = plan_reonboarding(playbook, customer(cid), EPISODE, RETURN, RETURN, segment=PRICE)[0]
    decision = decide(
        welcome,
        customer=customer(cid, last_active_at=RETURN + DAY),
        segment=PRICE,
        history=ContactHistory(),
        now=welcome.due_at,
        watch_from=RETURN,
    )
    assert isinstance(decision, Send)
