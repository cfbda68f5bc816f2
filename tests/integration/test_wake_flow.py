"""Issue 15's inputs across ingest → scheduler, on the real database and the bus (the broker or
the in-process bus): an exit-survey answer that moves a case to its track, a fix and a
competitor's news that wake the right churners, the customer's fiscal year, and an erasure that
sticks in ingest."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.erasure import erase
from services.scheduler.commands import Work, control_case
from shared.db.tables import case_steps, cases, churn_episodes, customers, scheduler_customers
from shared.settings import Settings
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout, system
from tests.support.buses import ServiceBus
from tests.support.kafka import cloudevent
from tests.support.services import eventually

pytestmark = pytest.mark.integration
HELSINKI = ZoneInfo("Europe/Helsinki")


async def _cases(engine: AsyncEngine, cid: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            await conn.execute(
                cases.select().where(cases.c.customer_id == cid).order_by(cases.c.opened_at)
            )
        )


def _count(n: int) -> Callable[[list[Any]], bool]:
    return lambda rows: len(rows) == n


async def _step_keys(engine: AsyncEngine, cid: str) -> set[str]:
    async with engine.connect() as conn:
        return set(
            (
                await conn.execute(
                    select(case_steps.c.step_key).where(case_steps.c.customer_id == cid)
                )
            ).scalars()
        )


async def test_an_exit_survey_answer_moves_the_case_to_the_track_of_its_reason(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_fb", "poor_experience")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0, reason="too_expensive"))
        first = await s.case(cid)
        assert first.playbook == "price_discount"
        s.clock.set(T0 + timedelta(days=1))
        await s.send(
            cloudevent(
                "feedback.received",
                {"customer_id": cid, "reason": "too_complex", "tags": ["reports"]},
                time=T0 + timedelta(days=1),
            )
        )
        rows = await eventually(lambda: _cases(engine, cid), lambda r: len(r) == 2)
    old, new = rows
    assert (old.status, old.close_reason) == ("closed", "superseded")
    assert new.status == "open"
    assert new.playbook == "poor_experience"
    assert new.segment["reason"] == "poor_experience"
    assert new.episode["reason"] == "poor_experience"
    assert new.churned_at == old.churned_at  # the same churn, timed from it
    async with engine.connect() as conn:
        (episode,) = await conn.execute(
            churn_episodes.select().where(churn_episodes.c.customer_id == cid)
        )
    # ingest keeps the answer on the episode it refines
    assert (episode.reason, episode.reason_raw) == ("poor_experience", "too_complex")


async def test_answers_that_change_their_mind_move_the_case_each_time(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_fm", "poor_experience")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0, reason="too_expensive"))
        await s.case(cid)
        for hours, reason in ((1, "too_complex"), (2, "too_expensive"), (3, "too_complex")):
            s.clock.set(T0 + timedelta(hours=hours))
            await s.send(
                cloudevent(
                    "feedback.received",
                    {"customer_id": cid, "reason": reason},
                    time=T0 + timedelta(hours=hours),
                )
            )
            await eventually(lambda: _cases(engine, cid), _count(hours + 1))
        rows = await _cases(engine, cid)
    assert [r.playbook for r in rows] == [
        "price_discount",
        "poor_experience",
        "price_discount",
        "poor_experience",
    ]
    assert [r.status for r in rows] == ["closed", "closed", "closed", "open"]
    assert len({r.episode_id for r in rows}) == 4


async def test_an_answer_that_keeps_the_track_records_the_refined_reason(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_fk", "saas_series")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0, reason="no comment"))
        case = await s.case(cid)
        assert (case.playbook, case.episode["reason"]) == ("saas_series", "unknown")
        for hours, reason in ((1, "no idea"), (2, "unused")):  # an unknown answer: nothing
            s.clock.set(T0 + timedelta(hours=hours))
            await s.send(
                cloudevent(
                    "feedback.received",
                    {"customer_id": cid, "reason": reason},
                    time=T0 + timedelta(hours=hours),
                )
            )
        rows = await eventually(
            lambda: _cases(engine, cid), lambda r: r[-1].episode["reason"] != "unknown"
        )
    assert len(rows) == 1
    assert rows[0].status == "open"
    assert rows[0].playbook == "saas_series"
    assert rows[0].episode["reason"] == "unused"
    assert rows[0].episode["reason_refined_at"]


async def test_a_fix_wakes_the_cases_it_names_however_long_ago_they_left(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    hurt = not_in_holdout("cus_ix", "poor_experience")
    other = not_in_holdout("cus_iy", "price_discount")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(hurt, T0, reason="too_complex"))
        await s.send(cancellation(other, T0, reason="too_expensive"))
        assert (await s.case(hurt)).playbook == "poor_experience"
        assert (await s.case(other)).playbook == "price_discount"
        fixed = T0 + timedelta(days=200)
        await s.fire_until(fixed, step=timedelta(days=1))  # the timed steps go meanwhile
        await s.send(
            cloudevent(
                "issue.resolved",
                {"issue": "ENG-1", "title": "One-click reports", "tags": ["poor_experience"]},
                time=fixed,
            )
        )
        keys = await eventually(lambda: _step_keys(engine, hurt), lambda k: "issue_fixed" in k)
        await s.fire_until(fixed + timedelta(days=1))
        commands = [c["data"] for c in await s.dispatched()]
        # the same fix again sends nothing twice
        s.clock.set(fixed + timedelta(days=2))
        await s.send(
            cloudevent(
                "issue.resolved",
                {"issue": "ENG-1", "title": "One-click reports", "tags": ["poor_experience"]},
                time=fixed + timedelta(days=2),
            )
        )
        await s.fire_until(fixed + timedelta(days=3))
        again = [c["data"] for c in await s.dispatched()]
    assert "issue_fixed" in keys
    assert "issue_fixed" not in await _step_keys(engine, other)
    woken = [c for c in commands if c["step_key"] == "issue_fixed"]
    assert len(woken) == 1
    assert woken[0]["customer"]["id"] == hurt
    assert woken[0]["features"] == ["One-click reports"]
    assert [c for c in again if c["step_key"] == "issue_fixed"] == woken


async def test_a_paused_case_gets_the_woken_step_and_sends_it_when_resumed(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_ip", "poor_experience")
    async with system(settings, engine, bus=service_bus) as s:
        work = Work(
            engine,
            s.clock,
            "/winback/scheduler",
            settings.kafka.max_record_bytes,
            settings.topics.outcomes,
            settings.topics.erasure,
        )
        await s.send(cancellation(cid, T0, reason="too_complex"))
        case = await s.case(cid)
        await s.fire_until(T0 + timedelta(days=2), step=timedelta(hours=6))
        await control_case(work, case.id, "pause")
        fixed = T0 + timedelta(days=3)
        s.clock.set(fixed)
        await s.send(
            cloudevent(
                "issue.resolved",
                {"issue": "ENG-2", "features": ["x"], "tags": ["poor experience"]},
                time=fixed,
            )
        )
        woken = await eventually(lambda: _step_keys(engine, cid), lambda k: "issue_fixed" in k)
        assert "issue_fixed" in woken
        await s.fire_until(fixed + timedelta(days=1))
        while_paused = [c["data"]["step_key"] for c in await s.dispatched()]
        await control_case(work, case.id, "resume")
        await s.fire_until(fixed + timedelta(days=2))
        resumed = [c["data"]["step_key"] for c in await s.dispatched()]
    assert "issue_fixed" not in while_paused
    assert resumed.count("issue_fixed") == 1


async def test_a_competitors_news_wakes_those_who_left_for_it_with_its_name(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    left = not_in_holdout("cus_cx", "competitor")
    elsewhere = not_in_holdout("cus_cy", "competitor")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(left, T0, reason="switched_service", competitor="Rival CRM"))
        await s.send(cancellation(elsewhere, T0, reason="switched_service", competitor="Other"))
        assert (await s.case(left)).playbook == "competitor"
        assert (await s.case(elsewhere)).playbook == "competitor"
        news = T0 + timedelta(days=40)
        s.clock.set(news)
        await s.send(
            cloudevent(
                "competitor.changed",
                {"competitor": "rival_crm", "kind": "price_increase", "note": "+30% from May"},
                time=news,
            )
        )
        keys = await eventually(lambda: _step_keys(engine, left), lambda k: "competitor_news" in k)
        assert "competitor_news" in keys
        await s.fire_until(news + timedelta(days=1))
        commands = [c["data"] for c in await s.dispatched()]
    woken = [c for c in commands if c["step_key"] == "competitor_news"]
    assert [c["customer"]["id"] for c in woken] == [left]
    assert woken[0]["competitor"] == "rival_crm"
    assert woken[0]["template"] == "competitor_news"
    assert "competitor_news" not in await _step_keys(engine, elsewhere)


async def test_the_budget_check_in_lands_at_the_start_of_the_customers_fiscal_year(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_fy", "budget")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(
            cloudevent(
                "customer.updated",
                {"customer_id": cid, "customer": {"fiscal_year_start_month": 9}},
                time=T0 - timedelta(days=1),
            )
        )

        async def month() -> Any:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        select(scheduler_customers.c.fiscal_year_start_month).where(
                            scheduler_customers.c.id == cid
                        )
                    )
                ).scalar()

        assert await eventually(month, lambda m: m == 9) == 9
        await s.send(cancellation(cid, T0, reason="budget"))
        case = await s.case(cid)
        steps = await s.steps(cid)
    assert case.playbook == "budget"
    (checkin,) = [st for st in steps if st.step_key == "budget_cycle_checkin"]
    local = checkin.due_at.astimezone(HELSINKI)
    assert (local.year, local.month, local.day) == (2026, 9, 1)


async def test_an_erased_customers_later_profile_event_does_not_bring_the_email_back(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = "cus_erased_later"
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(
            cloudevent(
                "customer.updated",
                {"customer_id": cid, "customer": {"email": "a@example.com", "name": "Aino"}},
                time=T0,
            )
        )

        async def row() -> Any:
            async with engine.connect() as conn:
                return (await conn.execute(customers.select().where(customers.c.id == cid))).first()

        assert (await eventually(row, lambda r: r is not None and r.email is not None)).name
        async with engine.begin() as conn:
            await erase(conn, [cid, "cus_never_seen"])
        s.clock.set(T0 + timedelta(hours=1))
        await s.send(
            cloudevent(
                "customer.updated",
                {
                    "customer_id": cid,
                    "customer": {"email": "a@example.com", "name": "Aino", "plan": "pro"},
                },
                time=T0 + timedelta(hours=1),
            )
        )
        after = await eventually(row, lambda r: r is not None and r.plan == "pro")
        async with engine.connect() as conn:
            unseen = (
                await conn.execute(customers.select().where(customers.c.id == "cus_never_seen"))
            ).one()
    assert after.plan == "pro"  # the event was applied: only the erased fields stay away
    assert (after.email, after.name) == (None, None)
    assert after.erased_at is not None
    assert unseen.erased_at is not None
    assert unseen.email is None
