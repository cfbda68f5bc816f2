"""The pure rules of services/scheduler/wake.py: which cases a fix or a competitor's news
names, which steps it wakes, the track a refined reason picks, the fiscal-year default."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.domain import case_expires_at
from services.scheduler.domain.loader import load_playbooks
from services.scheduler.domain.model import ChurnEpisode, CustomerView, Segment
from services.scheduler.domain.playbook import Playbook
from services.scheduler.domain.simulation import simulate
from services.scheduler.views import customer_view
from services.scheduler.wake import (
    COMPETITOR_CHANGED,
    FEATURE_RELEASED,
    ISSUE_RESOLVED,
    fix_names,
    left_for,
    plan_woken,
    refined_track,
)
from shared.churn import CHURN_REASONS
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

CHURN = datetime(2026, 2, 2, 10, tzinfo=UTC)
DAY = timedelta(days=1)
CUSTOMER = CustomerView("cust-1", timezone="Europe/Helsinki")
SEGMENT = Segment("churned_customer", "poor_experience", "high", "high", "established", False)
PLAYBOOKS = load_playbooks(
    Path(__file__).parents[3] / "services" / "scheduler" / "playbooks",
    templates=TEMPLATE_NAMES,
    offers=OFFERS,
)
BY_NAME = {p.name: p for p in PLAYBOOKS}


def episode(**changes: Any) -> ChurnEpisode:
    fields: dict[str, Any] = {
        "episode_id": "ep",
        "kind": "subscription_cancelled",
        "occurred_at": CHURN,
        "reason": "poor_experience",
    }
    return ChurnEpisode(**{**fields, **changes})


def spelled(name: str) -> st.SearchStrategy[str]:
    """``name`` as people write it: any case, ``_`` / ``-`` / spaces between words."""
    words = name.split()
    return st.tuples(
        st.lists(st.sampled_from([" ", "_", "-", "  "]), min_size=len(words), max_size=len(words)),
        st.booleans(),
    ).map(
        lambda t: (
            "".join(w + sep for w, sep in zip(words, t[0], strict=True)).strip(" _-").upper()
            if t[1]
            else "".join(w + sep for w, sep in zip(words, t[0], strict=True)).strip(" _-")
        )
    )


@given(spelled("single sign on"))
def test_a_fix_names_the_episodes_feature_however_it_is_spelled(name: str) -> None:
    assert fix_names(episode(feature="Single Sign-On"), [name], [])
    assert fix_names(episode(feature="single_sign_on"), [], [name])  # a tag naming it


@given(st.sampled_from([r for r in CHURN_REASONS if r != "unknown"]))
def test_a_fix_names_the_reason_only_by_its_normalised_word(reason: str) -> None:
    assert fix_names(episode(reason=reason), [], [reason.upper()])
    assert fix_names(episode(reason=reason), [], [reason.replace("_", " ").title()])
    others = [r for r in CHURN_REASONS if r != reason]
    assert not fix_names(episode(reason=reason), [], others)


def test_an_unknown_reason_is_never_named() -> None:
    assert not fix_names(episode(reason="unknown"), [], ["unknown"])
    assert not fix_names(episode(reason="unknown", feature=None), ["sso"], ["price"])


@given(spelled("rival crm"))
def test_news_wakes_those_who_left_for_that_competitor(name: str) -> None:
    assert left_for(episode(competitor="Rival_CRM"), name)
    assert not left_for(episode(competitor="Other CRM"), name)
    assert not left_for(episode(competitor=None), name)


def _playbook(*steps: dict[str, Any], **fields: Any) -> Playbook:
    return Playbook.model_validate({"name": "pb", "version": 1, "steps": list(steps), **fields})


TRIGGERED = _playbook(
    {"key": "d0", "offset": "0d", "channel": "email", "template": "we_miss_you"},
    {"key": "fixed", "trigger": ISSUE_RESOLVED, "channel": "email", "template": "whats_new"},
    {
        "key": "call",
        "trigger": ISSUE_RESOLVED,
        "channel": "crm",
        "template": "crm_personal_outreach",
        "when": {"value_tiers": ["high"]},
    },
    {"key": "news", "trigger": COMPETITOR_CHANGED, "channel": "email", "template": "comparison"},
    {"key": "built", "trigger": FEATURE_RELEASED, "channel": "email", "template": "feature_built"},
    horizon="6mo",
)


@given(st.integers(min_value=0, max_value=400))
def test_woken_steps_are_due_now_within_the_horizon_and_only_for_their_trigger(
    days: int,
) -> None:
    now = CHURN + days * DAY
    steps = plan_woken(TRIGGERED, CUSTOMER, episode(), now, trigger=ISSUE_RESOLVED, segment=SEGMENT)
    if now >= case_expires_at(TRIGGERED, episode()):  # the horizon: 6 months
        assert steps == []
        return
    assert [s.step_key for s in steps] == ["fixed", "call"]
    assert {s.due_at for s in steps} == {now}
    assert all(s.trigger == ISSUE_RESOLVED for s in steps)


def test_a_woken_step_is_planned_once_and_respects_when() -> None:
    now = CHURN + 10 * DAY
    low = Segment("churned_customer", "poor_experience", "low", "high", "established", False)
    once = plan_woken(
        TRIGGERED,
        CUSTOMER,
        episode(),
        now,
        trigger=ISSUE_RESOLVED,
        segment=low,
        already_planned=["d0"],
    )
    assert [s.step_key for s in once] == ["fixed"]
    again = plan_woken(
        TRIGGERED,
        CUSTOMER,
        episode(),
        now,
        trigger=ISSUE_RESOLVED,
        segment=SEGMENT,
        already_planned=["fixed", "call"],
    )
    assert again == []
    news = plan_woken(
        TRIGGERED, CUSTOMER, episode(), now, trigger=COMPETITOR_CHANGED, segment=SEGMENT
    )
    assert [s.step_key for s in news] == ["news"]


def test_the_shipped_playbooks_have_the_new_triggers() -> None:
    competitor = BY_NAME["competitor"]
    poor = BY_NAME["poor_experience"]
    assert [s.key for s in competitor.steps if s.trigger == COMPETITOR_CHANGED] == [
        "competitor_news"
    ]
    assert [s.key for s in poor.steps if s.trigger == ISSUE_RESOLVED] == ["issue_fixed"]
    (news,) = plan_woken(
        competitor,
        CUSTOMER,
        episode(reason="competitor", competitor="Rival"),
        CHURN + 30 * DAY,
        trigger=COMPETITOR_CHANGED,
        segment=SEGMENT,
    )
    assert news.template == "competitor_news"


def test_a_refined_reason_picks_its_own_track_or_none_when_it_is_the_same() -> None:
    poor = refined_track(PLAYBOOKS, SEGMENT, "price_discount")
    assert poor is not None
    assert poor.name == "poor_experience"
    assert refined_track(PLAYBOOKS, SEGMENT, "poor_experience") is None


@given(st.one_of(st.none(), st.integers(1, 12)), st.integers(1, 12))
def test_the_fiscal_year_is_the_profiles_or_the_settings_default(
    own: int | None, default: int
) -> None:
    row = {"id": "c", "fiscal_year_start_month": own}
    view = customer_view(row, default)
    assert view.fiscal_year_start_month == (own if own is not None else default)
    assert customer_view(row).fiscal_year_start_month == own


def test_a_simulation_says_what_wakes_the_new_triggered_steps() -> None:
    customer = CustomerView("cust-1", timezone="UTC", engagement="high")
    rival = simulate(
        PLAYBOOKS,
        customer,
        episode(reason="competitor", competitor="Rival CRM"),
        CHURN,
    )
    assert rival.playbook is not None
    assert rival.playbook.name == "competitor"
    (news,) = [u for u in rival.unplanned if u.step.key == "competitor_news"]
    assert news.reason == "on competitor.changed of 'Rival CRM': sent when it does, in the horizon"
    nobody = simulate(PLAYBOOKS, customer, episode(reason="competitor"), CHURN)
    (never,) = [u for u in nobody.unplanned if u.step.key == "competitor_news"]
    assert never.reason == "on competitor.changed: the churn names no competitor, never"
    hurt = simulate(PLAYBOOKS, customer, episode(), CHURN)
    (fixed,) = [u for u in hurt.unplanned if u.step.key == "issue_fixed"]
    assert fixed.reason.startswith("on issue.resolved naming 'poor_experience'")
