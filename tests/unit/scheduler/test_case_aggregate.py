"""The case aggregate (pure): each command's rules, and over random command sequences for
random customers — at most one open case per customer, no pending step on a closed case,
every close emits exactly one ``case.closed`` with its reason, and closed is terminal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.case import (
    Case,
    CaseChange,
    CaseClosed,
    CaseMigrated,
    CaseOpened,
    Refused,
    open_case,
)
from services.scheduler.domain.migration import MIGRATED, CaseStep
from services.scheduler.domain.model import ChurnEpisode, CustomerView, Segment
from services.scheduler.domain.planning import case_expires_at, plan_steps, reonboarding_anchor
from services.scheduler.domain.playbook import Playbook

DAY = timedelta(days=1)
T0 = datetime(2026, 2, 2, 10, tzinfo=UTC)
SEGMENT = Segment("churned_customer", "price", "medium", "high", "established", False)
CUSTOMER = CustomerView("cust-1", timezone="Europe/Helsinki")


def playbook(name: str, version: int, steps: list[dict[str, Any]], **fields: Any) -> Playbook:
    return Playbook.model_validate({"name": name, "version": version, "steps": steps, **fields})


def email(key: str, offset: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "offset": offset, "channel": "email", "template": "we_miss_you", **extra}


V1 = playbook("pb", 1, [email("d0", "0d"), email("d3", "3d"), email("d7", "7d")], horizon="60d")
V2 = playbook(
    "pb",
    2,
    [email("d0", "0d"), email("d5", "5d"), email("d7", "10d")],
    horizon="90d",
    exit_on=["reactivated", "unsubscribed_all", "activity"],
)
ACTIVE = playbook(
    "pb_active",
    1,
    [email("d1", "1d"), email("d9", "9d")],
    horizon="30d",
    exit_on=["reactivated", "unsubscribed_all", "activity"],
)
WELCOME = playbook(
    "pb_welcome", 1, [email("w1", "1d"), email("w7", "7d")], horizon="30d", starts_on="returned"
)
CLOSE_REASONS = {
    "cancel": "cancelled",
    "supersede": "superseded",
    "unsubscribe": "unsubscribed",
    "erase": "erased",
}


def episode(kind: str = "subscription_cancelled", at: datetime = T0, **extra: Any) -> ChurnEpisode:
    return ChurnEpisode(f"ep-{kind}-{at.isoformat()}", kind, at, **extra)  # type: ignore[arg-type]


def opened(
    pb: Playbook = V1,
    ep: ChurnEpisode | None = None,
    now: datetime = T0,
    customer: str = "cust-1",
    current: Case | None = None,
    return_anchor: datetime | None = None,
    case_id: str | None = None,
) -> CaseChange | Refused:
    ep = ep or episode()
    anchored = ep if return_anchor is None else reonboarding_anchor(ep, return_anchor)
    return open_case(
        case_id=case_id or f"case-{customer}-{ep.episode_id}",
        customer_id=customer,
        episode_id=ep.episode_id,
        purpose="winback" if return_anchor is None else "reonboarding",
        playbook=pb,
        segment=SEGMENT,
        episode=ep,
        expires_at=case_expires_at(pb, anchored),
        steps=plan_steps(
            pb, replace(CUSTOMER, customer_id=customer), anchored, now, segment=SEGMENT
        ),
        now=now,
        current=current,
        return_anchor=return_anchor,
        after_case_id=current.id if return_anchor is not None and current else None,
    )


def change(result: CaseChange | Refused) -> CaseChange:
    assert isinstance(result, CaseChange), result
    return result


def a_case(pb: Playbook = V1, **kwargs: Any) -> Case:
    return change(opened(pb, **kwargs)).after


def closed_events(result: CaseChange) -> list[CaseClosed]:
    return [e for e in result.events if isinstance(e, CaseClosed)]


def states(case: Case) -> dict[str, tuple[str, str | None]]:
    return {s.step_key: (s.state, s.state_reason) for s in case.steps}


# -- each command ------------------------------------------------------------------------------
def test_open_plans_pending_steps_and_announces_the_case() -> None:
    result = change(opened(V1))
    case = result.after
    assert result.before is None
    assert (case.status, case.purpose, case.playbook, case.playbook_version) == (
        "open",
        "winback",
        "pb",
        1,
    )
    assert case.expires_at == T0 + 60 * DAY
    assert [s.step_key for s in case.steps] == ["d0", "d3", "d7"]
    assert {s.state for s in case.steps} == {"pending"}
    assert [s.step_key for s in result.added] == ["d0", "d3", "d7"]
    (event,) = result.events
    assert isinstance(event, CaseOpened)
    assert (event.case_id, event.steps, event.time_since_return_days) == (case.id, 3, None)


def test_a_rechurn_announces_the_days_since_the_last_return() -> None:
    rechurn = episode(at=T0, prior_win_back_at=T0 - 40 * DAY)
    result = open_case(
        case_id="c",
        customer_id="cust-1",
        episode_id="e",
        purpose="winback",
        playbook=V1,
        segment=replace(SEGMENT, is_rechurn=True),
        episode=rechurn,
        expires_at=T0 + 60 * DAY,
        steps=[],
        now=T0,
    )
    (event,) = change(result).events
    assert isinstance(event, CaseOpened)
    assert event.time_since_return_days == 40
    assert change(result).after.is_rechurn


def test_a_customer_with_an_open_case_cannot_get_a_second_one() -> None:
    first = a_case()
    refused = opened(V1, ep=episode(at=T0 + DAY), current=first)
    assert isinstance(refused, Refused)
    assert (refused.code, refused.case_id) == ("open_case_exists", first.id)
    superseded = change(first.supersede(T0 + DAY)).after
    assert change(opened(V1, ep=episode(at=T0 + DAY), current=superseded)).after.is_open


def test_supersede_closes_cancels_pending_steps_and_emits_one_case_closed() -> None:
    case = a_case()
    result = change(case.supersede(T0 + DAY))
    assert result.closed
    assert (result.after.status, result.after.close_reason) == ("closed", "superseded")
    assert result.after.closed_at == T0 + DAY
    assert {k: v for k, v in states(result.after).items()} == {
        "d0": ("cancelled", "case closed: superseded"),
        "d3": ("cancelled", "case closed: superseded"),
        "d7": ("cancelled", "case closed: superseded"),
    }
    assert [(c.step_key, c.reason) for c in result.cancelled] == [
        ("d0", "case closed: superseded"),
        ("d3", "case closed: superseded"),
        ("d7", "case closed: superseded"),
    ]
    (event,) = closed_events(result)
    assert (event.case_id, event.customer_id, event.reason, event.playbook) == (
        case.id,
        "cust-1",
        "superseded",
        "pb",
    )


def test_a_close_leaves_steps_that_already_left_as_they_are() -> None:
    case = a_case()
    sent = replace(case, steps=(replace(case.steps[0], state="sent"), *case.steps[1:]))
    result = change(sent.cancel(T0 + 2 * DAY))
    assert states(result.after)["d0"] == ("sent", None)
    assert [c.step_key for c in result.cancelled] == ["d3", "d7"]


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (lambda c, now: c.cancel(now), "cancelled"),
        (lambda c, now: c.supersede(now), "superseded"),
        (lambda c, now: c.unsubscribe(now), "unsubscribed"),
        (lambda c, now: c.withdraw_consent("all", now), "unsubscribed"),
        (lambda c, now: c.erase(now), "erased"),
        (lambda c, now: c.expire(now + 60 * DAY), "horizon"),
        (lambda c, now: c.customer_active(now, playbook=ACTIVE), "activity"),
    ],
    ids=["cancel", "supersede", "unsubscribe", "consent_all", "erase", "expire", "activity"],
)
def test_every_close_has_its_reason_and_emits_exactly_one_case_closed(
    command: Callable[[Case, datetime], CaseChange | Refused], reason: str
) -> None:
    for case in (a_case(), change(a_case().pause(T0)).after):  # open or paused
        result = change(command(case, T0 + DAY))
        assert result.closed
        assert result.after.close_reason == reason
        assert [e.reason for e in closed_events(result)] == [reason]
        assert result.after.pending_steps == ()


def test_pause_and_resume() -> None:
    case = a_case()
    paused = change(case.pause(T0))
    assert (paused.after.status, paused.events, paused.cancelled) == ("paused", (), ())
    assert paused.after.steps == case.steps  # kept pending: they fire after the resume
    again = paused.after.pause(T0)
    assert isinstance(again, Refused)
    assert again.code == "paused"
    resumed = change(paused.after.resume(T0))
    assert resumed.after.status == "open"
    not_paused = resumed.after.resume(T0)
    assert isinstance(not_paused, Refused)
    assert not_paused.code == "not_paused"


def test_a_return_closes_a_winback_case_as_returned() -> None:
    case = a_case()
    back = T0 + 5 * DAY
    result = change(
        case.customer_returned(T0 + 6 * DAY, returned_at=back, by_activity=False, playbook=V1)
    )
    assert (result.after.close_reason, result.after.returned_at) == ("returned", back)
    (event,) = closed_events(result)
    assert (event.reason, event.returned_at) == ("returned", back)


def test_a_return_during_reonboarding_changes_nothing() -> None:
    winback = change(a_case().customer_returned(T0, returned_at=T0, by_activity=False, playbook=V1))
    welcome = a_case(WELCOME, current=winback.after, return_anchor=T0, case_id="welcome")
    assert welcome.purpose == "reonboarding"
    assert welcome.time_zero == T0
    result = change(
        welcome.customer_returned(T0 + DAY, returned_at=T0 + DAY, by_activity=False, playbook=None)
    )
    assert not result.changed
    assert result.after == welcome


@pytest.mark.parametrize(
    ("kind", "pb", "closes"),
    [
        ("subscription_cancelled", V1, False),  # activity is not a return from a cancellation
        ("user_inactive", V1, True),  # ... but it is from inactivity
        ("subscription_cancelled", ACTIVE, True),  # ... or when the playbook says so
    ],
)
def test_a_return_seen_as_activity_follows_the_exit_rules(
    kind: str, pb: Playbook, closes: bool
) -> None:
    case = a_case(pb, ep=episode(kind))
    result = change(
        case.customer_returned(T0 + DAY, returned_at=T0 + DAY, by_activity=True, playbook=pb)
    )
    assert result.closed is closes
    assert len(closed_events(result)) == int(closes)


def test_activity_closes_only_where_the_playbook_exits_on_it() -> None:
    assert not change(a_case(V1).customer_active(T0, playbook=V1)).changed
    assert not change(a_case(V1).customer_active(T0, playbook=None)).changed
    assert change(a_case(ACTIVE).customer_active(T0, playbook=ACTIVE)).closed


def test_consent_withdrawn_on_one_channel_leaves_the_case_open() -> None:
    result = change(a_case().withdraw_consent("sms", T0))
    assert not result.changed


def test_expire_closes_only_at_the_horizon() -> None:
    case = a_case()
    early = case.expire(case.expires_at - timedelta(seconds=1))
    assert isinstance(early, Refused)
    assert early.code == "not_expired"
    result = change(case.expire(case.expires_at))
    assert result.after.close_reason == "horizon"
    assert [e.reason for e in closed_events(result)] == ["horizon"]


def test_migrate_moves_the_case_and_its_pending_steps_to_the_new_version() -> None:
    case = a_case(V1)
    sent = replace(case, steps=(replace(case.steps[0], state="sent"), *case.steps[1:]))
    result = change(sent.migrate(V2, CUSTOMER, T0 + DAY))
    after = result.after
    assert (after.playbook_version, after.expires_at) == (2, T0 + 90 * DAY)
    assert [(c.step_key, c.reason) for c in result.cancelled] == [("d3", MIGRATED)]
    assert [s.step_key for s in result.added] == ["d5"]
    assert [c.step_key for c in result.retimed] == ["d7"]
    assert states(after) == {
        "d0": ("sent", None),
        "d3": ("cancelled", MIGRATED),
        "d5": ("pending", None),
        "d7": ("pending", None),
    }
    (event,) = result.events
    assert isinstance(event, CaseMigrated)
    assert (event.migration.from_version, event.migration.to_version) == (1, 2)
    assert [s.step_key for s in after.steps] == ["d0", "d3", "d5", "d7"]  # due order


def test_migrate_refuses_another_playbook() -> None:
    refused = a_case(V1).migrate(ACTIVE, CUSTOMER, T0)
    assert isinstance(refused, Refused)
    assert refused.code == "other_playbook"


def test_a_closed_case_refuses_every_command() -> None:
    case = change(a_case().cancel(T0)).after
    commands: list[Callable[[], CaseChange | Refused]] = [
        lambda: case.pause(T0),
        lambda: case.resume(T0),
        lambda: case.cancel(T0),
        lambda: case.supersede(T0),
        lambda: case.unsubscribe(T0),
        lambda: case.withdraw_consent("all", T0),
        lambda: case.withdraw_consent("email", T0),
        lambda: case.erase(T0),
        lambda: case.expire(T0 + 400 * DAY),
        lambda: case.customer_returned(T0, returned_at=T0, by_activity=False, playbook=V1),
        lambda: case.customer_active(T0, playbook=ACTIVE),
        lambda: case.migrate(V2, CUSTOMER, T0),
        lambda: case.close("returned", T0),
    ]
    for command in commands:
        refused = command()
        assert isinstance(refused, Refused)
        assert refused.code == "closed"
        assert refused.detail == f"case {case.id} closed: cancelled"


# -- over random command sequences -------------------------------------------------------------
CUSTOMERS = ("ann", "bo", "cy")
KINDS = (
    "churn",
    "churn_without_supersede",
    "pause",
    "resume",
    "cancel",
    "return",
    "return_by_activity",
    "activity",
    "unsubscribe",
    "consent_all",
    "consent_email",
    "erase",
    "expire",
    "migrate",
    "reonboard",
    "step_sent",
    "record_return",
    "record_return_by_activity",
)
RETURN_HORIZON = timedelta(days=365)


@dataclass
class World:
    """Every customer's cases (latest last) and every event, as an adapter would store them."""

    now: datetime = T0
    cases: dict[str, list[Case]] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    serial: int = 0
    returns_recorded: dict[str, int] = field(default_factory=dict)

    def latest(self, customer: str) -> Case | None:
        cases = self.cases.get(customer)
        return cases[-1] if cases else None

    def store(self, result: CaseChange) -> None:
        check_change(result)
        before = result.before
        if before is not None and before.returned_at is not None:
            assert result.after.returned_at == before.returned_at, "a recorded return changed"
        if result.after.returned_at is not None and (before is None or before.returned_at is None):
            self.returns_recorded[result.after.id] = (
                self.returns_recorded.get(result.after.id, 0) + 1
            )
        cases = self.cases.setdefault(result.after.customer_id, [])
        if result.before is None:
            cases.append(result.after)
        else:
            cases[cases.index(result.before)] = result.after
        self.events += result.events

    def run(self, kind: str, customer: str, days: int, pick: int) -> None:
        self.now += timedelta(days=days)
        now, case = self.now, self.latest(customer)
        if kind in ("churn", "churn_without_supersede", "reonboard"):
            self.serial += 1
            if kind == "churn" and case is not None and case.is_open:
                self.store(change(case.supersede(now)))
                case = self.latest(customer)
            ep = episode(
                ("subscription_cancelled", "user_inactive")[pick % 2], now - (pick % 9) * DAY
            )
            ep = replace(ep, episode_id=f"ep{self.serial}")
            pb = (V1, V2, ACTIVE)[pick % 3]
            anchor = now if kind == "reonboard" else None
            result = opened(
                WELCOME if anchor else pb,
                ep=ep,
                now=now,
                customer=customer,
                current=case,
                return_anchor=anchor,
                case_id=f"case{self.serial}",
            )
            if case is not None and case.is_open:
                assert isinstance(result, Refused)
                assert result.code == "open_case_exists"
                return
            self.store(change(result))
            return
        if case is None:
            return
        if kind.startswith("record_return"):
            self.record_return(customer, now, by_activity=kind.endswith("activity"), pick=pick)
            return
        if kind == "step_sent":  # the timer fired one (the aggregate does not fire steps)
            pending = [s for s in case.steps if s.pending]
            if case.status == "open" and pending:
                fired = pending[pick % len(pending)]
                steps = tuple(replace(s, state="sent") if s is fired else s for s in case.steps)
                cases = self.cases[customer]
                cases[-1] = replace(case, steps=steps)
            return
        result = command(kind, case, now, pick)
        if isinstance(result, Refused):
            assert result.case_id == case.id
            if not case.is_open:
                assert result.code == "closed"  # closed is terminal
            return
        assert case.is_open, f"{kind} changed a closed case"
        self.store(result)

    def record_return(self, customer: str, now: datetime, *, by_activity: bool, pick: int) -> None:
        """A return, recorded as the handler does: on the customer's latest win-back case,
        open or closed (the return may be dated back: ``pick`` days)."""
        winbacks = [c for c in self.cases.get(customer, []) if c.purpose == "winback"]
        if not winbacks:
            return
        case = winbacks[-1]
        at = now - (pick % 5) * DAY
        result = case.record_return(
            now,
            returned_at=at,
            by_activity=by_activity,
            playbook=playbook_of(case),
            horizon=RETURN_HORIZON,
        )
        if isinstance(result, Refused):
            assert result.case_id == case.id
            if case.returned_at is not None:
                assert result.code == "already_returned"
            elif not case.is_open:
                assert result.code in ("closed", "outside_horizon")
                if result.code == "closed":
                    assert case.close_reason == "erased"
                else:
                    assert not case.churned_at <= at <= case.churned_at + RETURN_HORIZON
            return
        if not case.is_open and result.changed:
            # a closed case records the return and nothing else: no event, same close
            assert result.events == ()
            assert result.cancelled == ()
            assert result.added == ()
            assert replace(result.after, returned_at=None) == case
            assert result.after.returned_at == at
        self.store(result)


def playbook_of(case: Case) -> Playbook | None:
    return {("pb", 1): V1, ("pb", 2): V2, ("pb_active", 1): ACTIVE}.get(
        (case.playbook, case.playbook_version)
    )


def command(kind: str, case: Case, now: datetime, pick: int) -> CaseChange | Refused:
    pb = playbook_of(case)
    if kind == "pause":
        return case.pause(now)
    if kind == "resume":
        return case.resume(now)
    if kind == "cancel":
        return case.cancel(now)
    if kind in ("return", "return_by_activity"):
        by_activity = kind == "return_by_activity"
        return case.customer_returned(now, returned_at=now, by_activity=by_activity, playbook=pb)
    if kind == "activity":
        return case.customer_active(now, playbook=pb)
    if kind == "unsubscribe":
        return case.unsubscribe(now)
    if kind in ("consent_all", "consent_email"):
        return case.withdraw_consent(kind.removeprefix("consent_"), now)
    if kind == "erase":
        return case.erase(now)
    if kind == "expire":
        return case.expire(now)
    assert kind == "migrate", kind
    return case.migrate(V2 if case.playbook_version == 1 else V1, CUSTOMER, now)


def replay(before: Case | None, result: CaseChange) -> dict[str, CaseStep]:
    """The steps as an adapter writes them: ``before``'s, with the change's step changes."""
    steps = {s.step_key: s for s in (before.steps if before else ())}
    for c in result.cancelled:
        assert steps[c.step_key].pending, f"{c.step_key} cancelled but not pending"
        steps[c.step_key] = replace(steps[c.step_key], state="cancelled", state_reason=c.reason)
    for moved in result.retimed:
        assert steps[moved.step_key].pending
        steps[moved.step_key] = CaseStep(moved.after, "pending")
    for moved in result.updated:
        assert steps[moved.step_key].pending
        steps[moved.step_key] = replace(steps[moved.step_key], planned=moved.after)
    for added in result.added:
        old = steps.get(added.step_key)
        assert old is None or old.revivable, f"{added.step_key} added twice"
        steps[added.step_key] = CaseStep(added, "pending")
    return steps


def check_change(result: CaseChange) -> None:
    before, after = result.before, result.after
    closes = closed_events(result)
    if not after.is_open:
        assert after.pending_steps == (), "a pending step on a closed case"
    if result.closed:
        assert len(closes) == 1, "a close emits exactly one case.closed"
        assert closes[0].reason == after.close_reason
        assert (closes[0].case_id, closes[0].customer_id) == (after.id, after.customer_id)
        assert after.closed_at is not None
    else:
        assert closes == [], "case.closed without a close"
    if before is not None:
        assert before.id == after.id
        # the step changes say exactly how the steps moved
        assert replay(before, result) == {s.step_key: s for s in after.steps}
    else:
        assert replay(None, result) == {s.step_key: s for s in after.steps}
    assert len({s.step_key for s in after.steps}) == len(after.steps)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.sampled_from(CUSTOMERS),
            st.sampled_from([0, 0, 1, 3, 20, 70]),
            st.integers(0, 100),
        ),
        min_size=5,
        max_size=40,
    )
)
def test_random_command_sequences_keep_the_case_invariants(
    commands: list[tuple[str, str, int, int]],
) -> None:
    world = World()
    for kind, customer, days, pick in commands:
        world.run(kind, customer, days, pick)
        for cases in world.cases.values():
            assert sum(c.is_open for c in cases) <= 1, "two open cases for one customer"
    every_case = [c for cases in world.cases.values() for c in cases]
    assert all(n == 1 for n in world.returns_recorded.values()), "a return recorded twice"
    assert {c.id for c in every_case if c.returned_at is not None} == set(world.returns_recorded)
    closes = [e for e in world.events if isinstance(e, CaseClosed)]
    assert sorted(e.case_id for e in closes) == sorted(c.id for c in every_case if not c.is_open)
    assert len([e for e in world.events if isinstance(e, CaseOpened)]) == len(every_case)
    for case in every_case:
        if not case.is_open:
            assert case.pending_steps == ()
            assert case.close_reason in {
                "superseded",
                "returned",
                "activity",
                "unsubscribed",
                "cancelled",
                "erased",
                "horizon",
            }


def test_a_return_after_the_case_closed_is_recorded_once() -> None:
    for close in ("expire", "unsubscribe", "supersede", "withdraw_consent", "cancel"):
        case = a_case()
        if close == "expire":
            closed = change(case.expire(case.expires_at)).after
        elif close == "withdraw_consent":
            closed = change(case.withdraw_consent("all", T0 + DAY)).after
        else:
            closed = change(getattr(case, close)(T0 + DAY)).after
        at = closed.expires_at + 200 * DAY
        recorded = change(
            closed.record_return(
                at, returned_at=at, by_activity=False, playbook=V1, horizon=RETURN_HORIZON
            )
        )
        after = recorded.after
        assert (after.status, after.returned_at, recorded.events) == ("closed", at, ())
        assert after.close_reason == closed.close_reason
        again = after.record_return(
            at + DAY, returned_at=at + DAY, by_activity=False, playbook=V1, horizon=RETURN_HORIZON
        )
        assert isinstance(again, Refused)
        assert again.code == "already_returned"


def test_a_return_beyond_the_horizon_or_on_an_erased_case_is_not_recorded() -> None:
    closed = change(a_case().expire(T0 + 60 * DAY)).after
    late = T0 + RETURN_HORIZON + DAY
    refused = closed.record_return(
        late, returned_at=late, by_activity=False, playbook=V1, horizon=RETURN_HORIZON
    )
    assert isinstance(refused, Refused)
    assert refused.code == "outside_horizon"
    erased = change(a_case().erase(T0 + DAY)).after
    refused = erased.record_return(
        T0 + 2 * DAY,
        returned_at=T0 + 2 * DAY,
        by_activity=False,
        playbook=V1,
        horizon=RETURN_HORIZON,
    )
    assert isinstance(refused, Refused)
    assert refused.code == "closed"
    # activity is a return only for an inactivity churn (or a playbook exiting on it)
    unchanged = change(
        change(a_case().cancel(T0)).after.record_return(
            T0 + DAY, returned_at=T0 + DAY, by_activity=True, playbook=V1, horizon=RETURN_HORIZON
        )
    )
    assert not unchanged.changed


def test_an_open_case_closes_as_returned_through_record_return() -> None:
    result = change(
        a_case().record_return(
            T0 + DAY, returned_at=T0 + DAY, by_activity=False, playbook=V1, horizon=RETURN_HORIZON
        )
    )
    assert result.closed
    assert result.after.close_reason == "returned"
    assert [e.reason for e in closed_events(result)] == ["returned"]
