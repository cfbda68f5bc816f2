import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.domain.guardrails import decide
from services.scheduler.domain.loader import load_playbooks
from services.scheduler.domain.model import (
    CHURN_REASONS,
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Defer,
    PlannedStep,
    Segment,
    Send,
)
from services.scheduler.domain.planning import choose_playbook, plan_steps, plan_triggered
from services.scheduler.domain.segmentation import segment
from services.scheduler.domain.variants import in_holdout
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

PLAYBOOKS = load_playbooks(
    Path(__file__).parents[3] / "services" / "scheduler" / "playbooks",
    templates=TEMPLATE_NAMES,
    offers=OFFERS,
)
BY_NAME = {p.name: p for p in PLAYBOOKS}
DAY = timedelta(days=1)
CHURN = datetime(2026, 4, 6, 9, tzinfo=UTC)

ALL_SEGMENTS = [
    Segment(*values)  # type: ignore[arg-type]
    for values in itertools.product(
        ["passive_user", "churned_customer", "lost_lead", "expired_trial"],
        CHURN_REASONS,
        ["high", "medium", "low", "unknown"],
        ["high", "medium", "low", "unknown"],
        ["new", "established", "long_term", "unknown"],
        [False, True],
    )
]


def test_every_segment_gets_a_playbook_and_discounts_only_reach_engaged_price_churners() -> None:
    for seg in ALL_SEGMENTS:
        chosen = choose_playbook(PLAYBOOKS, seg)
        assert chosen is not None, seg
        discount_steps = [
            s for s in chosen.steps if s.is_discount and (s.when is None or s.when.matches(seg))
        ]
        if discount_steps:
            assert seg.reason == "price", (seg, chosen.name)
            assert seg.engagement != "low", (seg, chosen.name)
            assert not seg.is_rechurn, (seg, chosen.name)


def seg(**changes: Any) -> Segment:
    fields: dict[str, Any] = {
        "lifecycle": "churned_customer",
        "reason": "unknown",
        "value_tier": "medium",
        "engagement": "high",
        "tenure": "established",
        "is_rechurn": False,
    }
    fields.update(changes)
    return Segment(**fields)


@pytest.mark.parametrize(
    ("segment_value", "playbook"),
    [
        (seg(reason="price"), "price_discount"),
        (seg(reason="price", engagement="unknown"), "price_discount"),
        (seg(reason="price", is_rechurn=True), "window_ladder"),
        (seg(reason="price", engagement="low"), "low_engagement"),
        (seg(reason="missing_feature"), "missing_feature"),
        (seg(reason="missing_feature", engagement="low"), "missing_feature"),
        (seg(reason="competitor"), "competitor"),
        (seg(reason="budget"), "budget"),
        (seg(reason="poor_experience"), "poor_experience"),
        (seg(reason="situational"), "situational"),
        (seg(reason="unknown"), "saas_series"),
        (seg(reason="unused", engagement="low"), "low_engagement"),
        (seg(lifecycle="expired_trial", reason="price"), "short_email_series"),
        (seg(lifecycle="lost_lead", reason="competitor"), "lost_lead"),
        (seg(lifecycle="passive_user"), "passive_user"),
    ],
)
def test_segments_get_the_playbook_the_brief_describes(
    segment_value: Segment, playbook: str
) -> None:
    chosen = choose_playbook(PLAYBOOKS, segment_value)
    assert chosen is not None
    assert chosen.name == playbook


def offsets_in_days(name: str, channel: str = "email") -> list[int]:
    return [
        s.offset.days
        for s in BY_NAME[name].steps
        if s.offset is not None and s.channel == channel and s.when is None
    ]


@pytest.mark.parametrize(
    ("name", "days"),
    [
        ("short_email_series", [0, 3, 7, 14, 90]),
        ("saas_series", [1, 7, 14, 21, 30, 90]),
        ("price_discount", [0, 3, 7, 14, 90, 270]),
        ("competitor", [0, 90, 180, 300]),
    ],
)
def test_shipped_series_follow_the_brief(name: str, days: list[int]) -> None:
    assert offsets_in_days(name) == days


def test_window_ladder_has_one_touch_per_window() -> None:
    playbook = BY_NAME["window_ladder"]
    touches = [s.offset for s in playbook.steps if s.offset is not None and s.when is None]
    windows = [getattr(playbook.ladder.window_for(offset), "name", None) for offset in touches]
    assert windows == [
        "immediate",
        "email_series",
        "special_offer",
        "product_update",
        "last_attempt",
    ]


def test_only_price_discount_offers_discounts_and_the_low_engagement_track_none() -> None:
    assert [p.name for p in PLAYBOOKS if p.has_discount] == ["price_discount"]
    assert not BY_NAME["low_engagement"].has_discount


def test_feature_gap_track_fires_when_the_feature_ships_a_year_later() -> None:
    customer = CustomerView("c-9", mrr_minor=80_000, engagement="high")
    episode = ChurnEpisode(
        "ep", "subscription_cancelled", CHURN, reason="missing_feature", feature="SSO"
    )
    segment_value = segment(customer, episode, CHURN)
    pb = choose_playbook(PLAYBOOKS, segment_value)
    assert pb is not None
    assert pb.name == "missing_feature"
    now = CHURN + 400 * DAY
    woken = plan_triggered(pb, customer, episode, now, feature="sso", segment=segment_value)
    assert sorted((s.step_key, s.channel) for s in woken) == [
        ("feature_built", "email"),
        ("feature_built_call", "crm"),
    ]
    assert all(s.due_at == now for s in woken)


def run_case(customer: CustomerView, episode: ChurnEpisode) -> list[tuple[datetime, PlannedStep]]:
    segment_value = segment(customer, episode, CHURN)
    pb = choose_playbook(PLAYBOOKS, segment_value)
    assert pb is not None
    pending = plan_steps(pb, customer, episode, CHURN, segment=segment_value)
    history = ContactHistory()
    sent: list[tuple[datetime, PlannedStep]] = []
    queue = [(s.due_at, i) for i, s in enumerate(pending)]
    while queue:
        queue.sort()
        now, index = queue.pop(0)
        decision = decide(
            pending[index], customer=customer, segment=segment_value, history=history, now=now
        )
        if isinstance(decision, Defer):
            queue.append((decision.until, index))
        elif isinstance(decision, Send):
            sent.append((now, decision.step))
            history = history.with_send(now, discount=decision.step.is_discount)
    return sent


def test_a_high_value_price_churner_gets_email_a_crm_task_and_one_discount() -> None:
    customer = CustomerView(
        "c-1",
        timezone="Europe/Helsinki",
        mrr_minor=90_000,
        engagement="high",
        consent={"email": True},
        crm_owner="alice",
    )
    episode = ChurnEpisode("ep", "subscription_cancelled", CHURN, reason="price")
    assert not in_holdout("c-1", "price_discount", BY_NAME["price_discount"].holdout)
    sent = run_case(customer, episode)
    keys = [step.step_key for _, step in sent]
    assert "d1_personal_outreach" in keys
    assert "d0_we_miss_you" in keys
    assert [step.is_discount for _, step in sent].count(True) == 1
    assert all(at < CHURN + 365 * DAY for at, _ in sent)


def test_a_price_rechurner_gets_no_discount() -> None:
    customer = CustomerView("c-1", mrr_minor=9_000, engagement="high", consent={"email": True})
    episode = ChurnEpisode(
        "ep", "subscription_cancelled", CHURN, reason="price", prior_win_back_at=CHURN - 200 * DAY
    )
    sent = run_case(customer, episode)
    assert sent
    assert not any(
        step.is_discount or step.offer in {o for o, d in OFFERS.items() if d} for _, step in sent
    )
