"""The simulation planner (what would this customer get, and when?) over the shipped playbooks
and playbooks built here: the choice and its reasons, holdout, and the guardrails at each
moment the step timer would look."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.domain.guardrails import DEFAULT_POLICY
from services.scheduler.domain.loader import load_playbooks
from services.scheduler.domain.model import (
    ChurnEpisode,
    ContactHistory,
    CustomerView,
    Send,
    Skip,
)
from services.scheduler.domain.playbook import Playbook
from services.scheduler.domain.simulation import (
    SimulatedStep,
    consider,
    simulate,
    unmet_conditions,
)
from services.scheduler.domain.variants import in_holdout
from services.scheduler.queries.playbooks import playbook_list, timing
from services.scheduler.simulate import render_table, simulation_out
from shared.content import catalog_for

PLAYBOOKS = load_playbooks(
    Path(__file__).parents[3] / "services" / "scheduler" / "playbooks", catalog=catalog_for(None)
)
HELSINKI = ZoneInfo("Europe/Helsinki")
NIGHT = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 03:00 in Helsinki
DAY = timedelta(days=1)


def customer(cid: str = "cus_sim_1", **changes: Any) -> CustomerView:
    fields: dict[str, Any] = {
        "customer_id": cid,
        "timezone": "Europe/Helsinki",
        "engagement": "high",
        "mrr_minor": 2900,
        "currency": "EUR",
        "customer_since": datetime(2024, 5, 1, tzinfo=UTC),
        "consent": {"email": True},
    }
    fields.update(changes)
    return CustomerView(**fields)


def churn(at: datetime = NIGHT, **changes: Any) -> ChurnEpisode:
    fields: dict[str, Any] = {
        "episode_id": "ep-1",
        "kind": "subscription_cancelled",
        "occurred_at": at,
        "reason": "price",
    }
    fields.update(changes)
    return ChurnEpisode(**fields)


def outside_holdout(prefix: str, playbook: str = "price_discount", share: float = 0.05) -> str:
    return next(
        f"{prefix}{i}" for i in range(1000) if not in_holdout(f"{prefix}{i}", playbook, share)
    )


def skip_reason(step: SimulatedStep) -> str:
    decision = step.final.decision
    assert isinstance(decision, Skip)
    return decision.reason


def playbook(name: str, priority: int = 0, version: int = 1, **fields: Any) -> Playbook:
    steps = [{"key": "d0", "offset": "0d", "channel": "email", "template": "we_miss_you"}]
    return Playbook.model_validate(
        {"name": name, "version": version, "priority": priority, "steps": steps, **fields}
    )


def test_a_price_churner_at_night_gets_the_price_track_in_their_morning() -> None:
    cid = outside_holdout("cus_night")
    result = simulate(PLAYBOOKS, customer(cid), churn(), NIGHT)
    assert result.playbook is not None
    assert result.playbook.name == "price_discount"
    assert not result.holdout
    keys = [s.planned.step_key for s in result.timeline]
    assert keys == [
        "d0_we_miss_you",
        "d3_what_you_missed",
        "d7_special_offer",
        "d14_last_chance",
        "d90_whats_new",
        "d270_last_attempt",
    ]
    first = result.timeline[0]
    assert first.first == first.deferrals[0]
    assert first.deferrals[0].reason == "quiet_hours"
    assert first.outcome == "sent"
    assert first.final.at.astimezone(HELSINKI).hour == 9
    assert first.final.at.date() == NIGHT.date()
    # low value (29 EUR MRR): the CRM call and the SMS step are for higher tiers
    left_out = {u.step.key: u.reason for u in result.unplanned}
    assert left_out == {
        "d1_personal_outreach": "when: value_tiers: low not in [high]",
        "d10_sms_nudge": "when: value_tiers: low not in [high, medium]",
    }


def test_why_each_other_playbook_was_not_chosen() -> None:
    result = simulate(PLAYBOOKS, customer(), churn(), NIGHT)
    verdicts = {c.playbook.name: (c.verdict, c.reason) for c in result.considered}
    assert verdicts["price_discount"][0] == "chosen"
    assert verdicts["competitor"] == ("no_match", "reasons: price not in [competitor]")
    assert verdicts["low_engagement"] == ("no_match", "engagement: high not in [low]")
    assert verdicts["reonboarding_price"][0] == "reonboarding"
    assert len(result.considered) == len(PLAYBOOKS)


def test_outranked_and_older_versions_are_named() -> None:
    loaded = [
        playbook("alpha", priority=5),
        playbook("beta", priority=5),
        playbook("gamma", priority=1),
        playbook("alpha", priority=5, version=2),
        playbook("picky", priority=9, match={"reasons": ["competitor"], "rechurn": True}),
    ]
    seg_source = simulate(loaded, customer(), churn(), NIGHT)
    verdicts = {(c.playbook.name, c.playbook.version): c for c in seg_source.considered}
    assert verdicts[("alpha", 2)].verdict == "chosen"
    assert verdicts[("alpha", 1)].verdict == "older_version"
    assert verdicts[("alpha", 1)].reason == "new cases start with version 2"
    assert verdicts[("beta", 1)].reason == (
        "matches, but same priority as alpha, which comes first by name"
    )
    assert verdicts[("gamma", 1)].reason == "matches, but priority 1 < alpha's 5"
    assert verdicts[("picky", 1)].reason == (
        "reasons: price not in [competitor]; rechurn: false, wants true"
    )
    assert unmet_conditions(loaded[4].match, seg_source.segment) == [
        "reasons: price not in [competitor]",
        "rechurn: false, wants true",
    ]
    assert consider(loaded[:1], seg_source.segment)[0].verdict == "chosen"


def test_no_playbook_and_a_churn_beyond_the_horizon_open_no_case() -> None:
    none = simulate(
        [playbook("only_leads", match={"lifecycle": ["lost_lead"]})], customer(), churn(), NIGHT
    )
    assert none.playbook is None
    assert none.no_case == "no playbook matches"
    assert not none.timeline
    late = simulate(PLAYBOOKS, customer(), churn(), NIGHT + 400 * DAY)
    assert late.playbook is not None
    assert late.no_case is not None
    assert late.timeline == ()


def test_a_late_churn_catches_up_one_touch_and_names_the_missed_steps() -> None:
    cid = outside_holdout("cus_late")
    now = NIGHT + 8 * DAY
    result = simulate(PLAYBOOKS, customer(cid), churn(), now)
    first = result.timeline[0]
    assert first.planned.step_key == "d7_special_offer"
    assert first.planned.caught_up
    missed = {u.step.key for u in result.unplanned if u.reason.startswith("missed")}
    assert missed == {"d0_we_miss_you", "d3_what_you_missed"}


def test_a_holdout_customer_is_skipped_at_every_step() -> None:
    cid = next(
        f"cus_hold{i}" for i in range(5000) if in_holdout(f"cus_hold{i}", "price_discount", 0.05)
    )
    result = simulate(PLAYBOOKS, customer(cid), churn(), NIGHT)
    assert result.holdout
    assert {s.outcome for s in result.timeline} == {"skipped"}
    assert {skip_reason(s) for s in result.timeline} == {"holdout"}


def test_consent_caps_and_the_discount_period_are_what_the_guardrails_say() -> None:
    cid = outside_holdout("cus_rules")
    high = customer(cid, mrr_minor=90_000, consent={"email": True})  # no SMS consent
    start = datetime(2026, 3, 2, 8, tzinfo=UTC)  # 10:00 in Helsinki
    recent = ContactHistory(
        sent_at=(start - 3 * DAY, start - 2 * DAY, start - DAY),
        discounts_at=(start - 30 * DAY,),
    )
    result = simulate(PLAYBOOKS, high, churn(start), start, history=recent)
    by_key = {s.planned.step_key: s for s in result.timeline}
    capped = by_key["d0_we_miss_you"]
    assert capped.deferrals[0].reason == "frequency_cap"
    assert capped.final.at == start - 3 * DAY + 7 * DAY  # the oldest of the three drops out
    sms = by_key["d10_sms_nudge"]
    assert sms.outcome == "skipped"
    assert skip_reason(sms) == "no_consent"
    offer = by_key["d7_special_offer"]
    sent = offer.sent
    assert sent is not None
    assert sent.offer is None
    assert sent.template == "check_in"
    assert isinstance(offer.final.decision, Send)
    assert offer.final.decision.offer_withheld == "discount_period"


ZONES = ["Europe/Helsinki", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "UTC", None]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    at=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
    ),
    late=st.integers(min_value=0, max_value=60),
    zone=st.sampled_from(ZONES),
    reason=st.sampled_from(["price", "competitor", "missing_feature", "unused", "budget"]),
    engagement=st.sampled_from(["high", "medium", "low", None]),
    mrr=st.sampled_from([None, 900, 9_000, 90_000]),
    consent=st.fixed_dictionaries(
        {}, optional={"email": st.booleans(), "sms": st.booleans(), "crm": st.booleans()}
    ),
    kind=st.sampled_from(["subscription_cancelled", "trial_expired", "lead_lost"]),
    cid=st.text(alphabet="abc123", min_size=1, max_size=8),
)
def test_the_timeline_keeps_the_guardrails_promises(
    at: datetime,
    late: int,
    zone: str | None,
    reason: str,
    engagement: str | None,
    mrr: int | None,
    consent: dict[str, bool],
    kind: str,
    cid: str,
) -> None:
    view = customer(cid, timezone=zone, engagement=engagement, mrr_minor=mrr, consent=consent)
    result = simulate(PLAYBOOKS, view, churn(at, reason=reason, kind=kind), at + late * DAY)
    local = ZoneInfo(zone or "UTC")
    due = [s.planned.due_at for s in result.timeline]
    assert due == sorted(due)  # due times follow step order
    sends = []
    for step in result.timeline:
        looks = [look.at for look in step.looks]
        assert looks == sorted(set(looks))
        assert looks[0] == step.planned.due_at
        if step.outcome == "sent":
            window = DEFAULT_POLICY.window_for(step.planned.channel)
            assert window is None or window.allows(step.final.at, local), "sent in quiet hours"
            assert step.planned.channel in consent or step.planned.channel == "crm"
            assert step.final.at < step.planned.expires_at
            sends.append(step.final.at)
        else:
            assert skip_reason(step)
    sends.sort()
    for cap in DEFAULT_POLICY.caps:  # never more than a cap allows in any rolling period
        for i, sent in enumerate(sends):
            inside = [s for s in sends[: i + 1] if sent - cap.period < s <= sent]
            assert len(inside) <= cap.max_messages


def test_the_answer_and_its_table() -> None:
    cid = outside_holdout("cus_table")
    result = simulate(PLAYBOOKS, customer(cid), churn(), NIGHT)
    out = simulation_out(result, start=date(2026, 3, 3), end=date(2026, 3, 9))
    assert [s.step_key for s in out.timeline] == ["d3_what_you_missed", "d7_special_offer"]
    step = out.timeline[0]
    assert step.action == "defer"
    assert step.reason == "quiet_hours"
    assert step.due_at_local == "2026-03-05T03:00:00+02:00"
    assert step.at_local == "2026-03-05T09:00:00+02:00"
    assert step.outcome == "sent"
    assert out.playbook is not None
    assert out.playbook.name == "price_discount"
    table = render_table(out)
    assert "price_discount v1" in table
    assert "d3_what_you_missed" in table
    assert "d0_we_miss_you" not in table.split("\n\n")[1]
    assert "2026-03-05 09:00 local" in table


def test_the_playbook_list_says_what_is_loaded() -> None:
    listed = playbook_list(PLAYBOOKS)
    assert len(listed.items) == len(PLAYBOOKS)
    price = next(p for p in listed.items if p.name == "price_discount")
    assert price.match.reasons == ["price"]
    assert price.match.rechurn is False
    assert price.holdout == 0.05
    assert price.latest
    assert price.starts_on == "churned"
    steps = {s.key: s for s in price.steps}
    assert steps["d3_what_you_missed"].timing == "3d after churn"
    offer = steps["d7_special_offer"]
    assert offer.is_discount
    assert [v.name for v in offer.variants] == ["half_off_3mo", "free_month"]
    assert steps["d1_personal_outreach"].when is not None
    assert steps["d1_personal_outreach"].when.value_tiers == ["high"]
    priorities = [p.priority for p in listed.items]
    assert priorities == sorted(priorities, reverse=True)


def test_timings_in_words() -> None:
    steps = [
        {
            "key": "q",
            "calendar": "quarter_start",
            "not_before": "30d",
            "channel": "email",
            "template": "we_miss_you",
        },
        {"key": "t", "trigger": "feature.released", "channel": "email", "template": "we_miss_you"},
    ]
    pb = Playbook.model_validate({"name": "words", "version": 1, "steps": steps})
    assert [timing(s) for s in pb.steps] == [
        "next quarter start, at least 1mo after churn",
        "on feature.released",
    ]
