import heapq
import itertools
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.guardrails import FrequencyCap, GuardrailPolicy, decide
from services.scheduler.domain.model import (
    CHURN_REASONS,
    Channel,
    ContactHistory,
    CustomerView,
    Decision,
    Defer,
    PlannedStep,
    Segment,
    Send,
    Skip,
)
from shared.localtime import SendWindow

DAY = timedelta(days=1)
# 12:00 UTC = 15:00 in Helsinki in June: inside the default 09:00-20:00 window
NOON = datetime(2026, 6, 10, 12, tzinfo=UTC)
HELSINKI = ZoneInfo("Europe/Helsinki")
ALL_CONSENT: dict[Channel, bool] = {"email": True, "sms": True, "crm": True, "webhook": True}


def make_step(**changes: object) -> PlannedStep:
    fields: dict[str, object] = {
        "playbook": "pb",
        "playbook_version": 1,
        "step_key": "s1",
        "channel": "email",
        "template": "special_offer",
        "offer": None,
        "is_discount": False,
        "due_at": NOON,
        "original_due_at": NOON,
        "variant": "default",
        "window": "immediate",
        "on_cap": "defer",
        "holdout": False,
        "expires_at": NOON + 300 * DAY,
    }
    fields.update(changes)
    return PlannedStep(**fields)  # type: ignore[arg-type]


DISCOUNT = {"offer": "discount_50pct_3mo", "is_discount": True}
CUSTOMER = CustomerView("c1", timezone="Europe/Helsinki", consent=ALL_CONSENT)
PRICE = Segment("churned_customer", "price", "medium", "high", "established", False)


def run(
    step: PlannedStep,
    customer: CustomerView = CUSTOMER,
    segment: Segment = PRICE,
    history: ContactHistory = ContactHistory(),  # noqa: B008
    now: datetime = NOON,
    policy: GuardrailPolicy = GuardrailPolicy(),  # noqa: B008
) -> Decision:
    return decide(step, customer=customer, segment=segment, history=history, now=now, policy=policy)


@pytest.mark.parametrize(
    ("step", "customer", "expected"),
    [
        (make_step(holdout=True), CUSTOMER, Skip("holdout")),
        (make_step(), replace(CUSTOMER, opted_out_all=True), Skip("opted_out")),
        (
            make_step(),
            replace(CUSTOMER, suppressed_channels=frozenset({"email"})),
            Skip("channel_suppressed"),
        ),
        (make_step(), replace(CUSTOMER, consent={"email": False}), Skip("no_consent", "withdrawn")),
        (make_step(), replace(CUSTOMER, consent={}), Skip("no_consent", "not_given")),
        (
            make_step(channel="sms"),
            replace(CUSTOMER, consent={"email": True}),
            Skip("no_consent", "not_given"),
        ),
        (
            make_step(channel="crm"),
            replace(CUSTOMER, consent={"crm": False}),
            Skip("no_consent", "withdrawn"),
        ),
        (make_step(expires_at=NOON), CUSTOMER, Skip("expired")),
    ],
)
def test_steps_that_must_never_go_out_are_skipped(
    step: PlannedStep, customer: CustomerView, expected: Skip
) -> None:
    assert run(step, customer) == expected


def test_crm_tasks_need_no_recorded_consent_by_default() -> None:
    step = make_step(channel="crm", template="crm_personal_outreach")
    assert run(step, replace(CUSTOMER, consent={})) == Send(step)


def test_a_due_step_inside_the_window_and_caps_is_sent() -> None:
    step = make_step()
    assert run(step) == Send(step)


def test_a_step_not_yet_due_is_deferred_to_its_due_time() -> None:
    step = make_step(due_at=NOON + DAY)
    assert run(step) == Defer(NOON + DAY, "not_due")


@pytest.mark.parametrize(
    ("local_due", "local_send"),
    [
        (datetime(2026, 6, 10, 3), datetime(2026, 6, 10, 9)),
        (datetime(2026, 6, 10, 8, 59), datetime(2026, 6, 10, 9)),
        (datetime(2026, 6, 10, 20), datetime(2026, 6, 11, 9)),
        (datetime(2026, 6, 10, 23, 30), datetime(2026, 6, 11, 9)),
    ],
)
def test_quiet_hours_defer_to_the_next_local_window_start(
    local_due: datetime, local_send: datetime
) -> None:
    due = local_due.replace(tzinfo=HELSINKI).astimezone(UTC)
    decision = run(make_step(due_at=due, original_due_at=due), now=due)
    assert decision == Defer(local_send.replace(tzinfo=HELSINKI).astimezone(UTC), "quiet_hours")


def test_unknown_timezone_uses_the_policy_fallback() -> None:
    due = datetime(2026, 6, 10, 7, tzinfo=UTC)  # 07:00 in UTC, 10:00 in Helsinki
    customer = replace(CUSTOMER, timezone="Nowhere/Land")
    assert run(make_step(due_at=due), customer, now=due) == Defer(
        datetime(2026, 6, 10, 9, tzinfo=UTC), "quiet_hours"
    )
    helsinki_policy = GuardrailPolicy(fallback_timezone="Europe/Helsinki")
    step = make_step(due_at=due)
    assert run(step, customer, now=due, policy=helsinki_policy) == Send(step)


def test_a_channel_can_have_its_own_window_or_none() -> None:
    night = datetime(2026, 6, 10, 0, tzinfo=UTC)  # 03:00 in Helsinki
    policy = GuardrailPolicy(
        channel_send_windows={"webhook": None, "sms": SendWindow(time(10), time(18))}
    )
    webhook = make_step(channel="webhook", due_at=night)
    assert run(webhook, now=night, policy=policy) == Send(webhook)
    sms = make_step(channel="sms", due_at=night)
    assert run(sms, now=night, policy=policy) == Defer(
        datetime(2026, 6, 10, 7, tzinfo=UTC), "quiet_hours"
    )


@pytest.mark.parametrize(
    ("sent_days_ago", "cap", "expected_wait"),
    [
        ([], FrequencyCap(1, 7 * DAY), timedelta(0)),
        ([1], FrequencyCap(1, 7 * DAY), 6 * DAY),
        ([7], FrequencyCap(1, 7 * DAY), timedelta(0)),  # exactly one period ago: a new period
        ([1, 2], FrequencyCap(3, 7 * DAY), timedelta(0)),
        ([1, 2, 5], FrequencyCap(3, 7 * DAY), 2 * DAY),
        ([1, 2, 5, 6], FrequencyCap(3, 7 * DAY), 2 * DAY),
        ([1, 2, 10], FrequencyCap(2, 7 * DAY), 5 * DAY),
    ],
)
def test_frequency_cap_earliest_allowed(
    sent_days_ago: list[int], cap: FrequencyCap, expected_wait: timedelta
) -> None:
    sent = [NOON - d * DAY for d in sent_days_ago]
    assert cap.earliest_allowed(NOON, sent) == NOON + expected_wait


def test_capped_step_is_deferred_to_when_the_cap_allows() -> None:
    policy = GuardrailPolicy(caps=(FrequencyCap(2, 7 * DAY),))
    history = ContactHistory(sent_at=(NOON - 3 * DAY, NOON - DAY))
    assert run(make_step(), history=history, policy=policy) == Defer(
        NOON + 4 * DAY, "frequency_cap"
    )


def test_capped_step_with_on_cap_skip_is_skipped() -> None:
    policy = GuardrailPolicy(caps=(FrequencyCap(1, 7 * DAY),))
    history = ContactHistory(sent_at=(NOON - DAY,))
    assert run(make_step(on_cap="skip"), history=history, policy=policy) == Skip("frequency_cap")


def test_cap_deferral_also_respects_quiet_hours() -> None:
    policy = GuardrailPolicy(caps=(FrequencyCap(1, DAY),))
    # sent yesterday at 22:00 UTC (01:00 Helsinki): the cap frees at 22:00 UTC today, in quiet hours
    history = ContactHistory(sent_at=(NOON - timedelta(hours=14),))
    assert run(make_step(), history=history, policy=policy) == Defer(
        datetime(2026, 6, 11, 6, tzinfo=UTC), "frequency_cap"
    )


def test_deferral_past_the_case_horizon_is_a_skip() -> None:
    policy = GuardrailPolicy(caps=(FrequencyCap(1, 30 * DAY),))
    history = ContactHistory(sent_at=(NOON - DAY,))
    step = make_step(expires_at=NOON + 10 * DAY)
    assert run(step, history=history, policy=policy) == Skip(
        "expired", "deferred past the case horizon"
    )


@pytest.mark.parametrize(
    ("segment", "history", "block"),
    [
        (replace(PRICE, reason="budget"), ContactHistory(), "not_price_reason"),
        (replace(PRICE, engagement="low"), ContactHistory(), "low_engagement"),
        (replace(PRICE, is_rechurn=True), ContactHistory(), "rechurn"),
        (
            PRICE,
            ContactHistory(sent_at=(NOON - 200 * DAY,), discounts_at=(NOON - 200 * DAY,)),
            "discount_period",
        ),
    ],
)
def test_withheld_discount_falls_back_or_skips(
    segment: Segment, history: ContactHistory, block: str
) -> None:
    without_fallback = make_step(**DISCOUNT)
    assert run(without_fallback, segment=segment, history=history) == Skip(
        "discount_not_allowed", block
    )
    with_fallback = make_step(**DISCOUNT, discount_fallback_template="check_in")
    decision = run(with_fallback, segment=segment, history=history)
    assert isinstance(decision, Send)
    assert decision.offer_withheld == block
    assert (decision.step.template, decision.step.offer, decision.step.is_discount) == (
        "check_in",
        None,
        False,
    )


def test_discount_allowed_once_the_period_has_passed() -> None:
    step = make_step(**DISCOUNT)
    history = ContactHistory(sent_at=(NOON - 366 * DAY,), discounts_at=(NOON - 366 * DAY,))
    assert run(step, history=history) == Send(step)


# --- property: a scheduler loop over random steps never breaks a guardrail -----------------

VALID_ZONES = ["Europe/Helsinki", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"]
ZONES = [None, "Bad/Zone", *VALID_ZONES]
BASE = datetime(2026, 3, 1, tzinfo=UTC)  # a DST change in range for most zones
HORIZON = BASE + 120 * DAY

caps = st.lists(
    st.builds(
        FrequencyCap, st.integers(1, 4), st.integers(1, 30 * 24).map(lambda h: timedelta(hours=h))
    ),
    min_size=0,
    max_size=3,
)
send_windows = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 20), st.integers(1, 10)).map(
        lambda t: SendWindow(time(t[0]), time(min(t[0] + t[1], 23), 30))
    ),
)
policies = st.builds(
    GuardrailPolicy,
    caps=caps.map(tuple),
    send_window=send_windows,
    discount_period=st.integers(1, 400).map(lambda d: timedelta(days=d)),
)
steps = st.lists(
    st.builds(
        make_step,
        step_key=st.text("abc", min_size=1, max_size=3),
        channel=st.sampled_from(["email", "sms", "crm", "webhook"]),
        due_at=st.integers(0, 100 * 24 * 60).map(lambda m: BASE + timedelta(minutes=m)),
        on_cap=st.sampled_from(["defer", "skip"]),
        is_discount=st.booleans(),
        discount_fallback_template=st.sampled_from([None, "check_in"]),
        expires_at=st.just(HORIZON),
    ),
    min_size=1,
    max_size=14,
)
segments = st.builds(
    Segment,
    lifecycle=st.just("churned_customer"),
    # weighted towards price churners, the only ones a discount may reach
    reason=st.one_of(st.just("price"), st.sampled_from(CHURN_REASONS)),
    value_tier=st.just("medium"),
    engagement=st.sampled_from(["high", "medium", "low", "unknown"]),
    tenure=st.just("new"),
    is_rechurn=st.booleans(),
)


def simulate(
    planned: list[PlannedStep],
    customer: CustomerView,
    segment: Segment,
    policy: GuardrailPolicy,
    history: ContactHistory,
) -> tuple[list[tuple[datetime, PlannedStep]], dict[int, Decision]]:
    queue = [(step.due_at, index) for index, step in enumerate(planned)]
    heapq.heapify(queue)
    sends: list[tuple[datetime, PlannedStep]] = []
    final: dict[int, Decision] = {}
    for _ in range(10_000):
        if not queue:
            break
        now, index = heapq.heappop(queue)
        decision = decide(
            planned[index],
            customer=customer,
            segment=segment,
            history=history,
            now=now,
            policy=policy,
        )
        if isinstance(decision, Defer):
            assert decision.until > now, "a deferral must move forward"
            heapq.heappush(queue, (decision.until, index))
            continue
        assert index not in final, "a step is decided once"
        final[index] = decision
        if isinstance(decision, Send):
            sends.append((now, decision.step))
            history = history.with_send(now, discount=decision.step.is_discount)
    assert not queue, "the loop settles"
    return sends, final


@settings(max_examples=150, deadline=None)
@given(
    planned=steps,
    zone=st.sampled_from(ZONES),
    segment=segments,
    policy=policies,
    prior_discount=st.one_of(st.none(), st.integers(1, 500)),
)
def test_guardrails_hold_over_random_schedules(
    planned: list[PlannedStep],
    zone: str | None,
    segment: Segment,
    policy: GuardrailPolicy,
    prior_discount: int | None,
) -> None:
    customer = CustomerView("c1", timezone=zone, consent=ALL_CONSENT)
    history = ContactHistory()
    if prior_discount is not None:  # a discount from an earlier case
        history = history.with_send(BASE - timedelta(days=prior_discount), discount=True)
    sends, final = simulate(planned, customer, segment, policy, history)

    assert len(final) == len(planned), "every step ends sent or skipped, exactly once"
    times = [at for at, _ in sends]
    for cap in policy.caps:
        for earlier, later in zip(times, times[cap.max_messages :], strict=False):
            assert later - earlier >= cap.period, f"more than {cap.max_messages} per {cap.period}"
    local_zone = ZoneInfo(zone if zone in VALID_ZONES else "UTC")  # the policy's fallback
    for at, step in sends:
        window = policy.window_for(step.channel)
        if window is not None:
            assert window.allows(at, local_zone), (
                f"sent in quiet hours: {at.astimezone(local_zone)}"
            )
        assert step.due_at <= at < step.expires_at
    discounts = [*history.discounts_at, *(at for at, step in sends if step.is_discount)]
    for earlier, later in itertools.pairwise(discounts):
        assert later - earlier >= policy.discount_period, "two discounts inside the period"
    if any(step.is_discount for _, step in sends):
        assert segment.reason == "price"
        assert segment.engagement != "low"
        assert not segment.is_rechurn
