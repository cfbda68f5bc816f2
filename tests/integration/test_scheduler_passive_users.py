"""Passive users found by winback itself: ``user.active`` through ingest pushes each customer's
inactivity timer forward; the step timer loop claims due timers (``SKIP LOCKED``, in batches)
and opens a passive-user case after ``scheduler.inactivity_days`` of silence — once; activity
closes it at once. Real broker and database, frozen clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.inactivity import InactivityTimer, inactivity_rule
from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared import domain_events as de
from shared.db.tables import cases, inactivity_timers, outbox, scheduler_customers
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import T0, System, cancellation, system
from tests.support.buses import ServiceBus
from tests.support.http import serve
from tests.support.kafka import cloudevent
from tests.support.services import eventually

pytestmark = pytest.mark.integration
DAYS = 30  # scheduler.inactivity_days, the default
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}


def profile(cid: str) -> dict[str, Any]:
    return cloudevent(
        "customer.updated",
        {
            "customer_id": cid,
            "customer": {
                "email": f"{cid}@example.com",
                "timezone": "Europe/Helsinki",
                "locale": "fi-FI",
                "plan": "pro",
                "mrr_minor": 4900,
                "currency": "EUR",
            },
        },
        time=T0 - timedelta(days=1),
    )


async def timers(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(inactivity_timers.select())
        return {r.customer_id: r for r in rows}


async def customer_cases(engine: AsyncEngine, cid: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            await conn.execute(
                cases.select().where(cases.c.customer_id == cid).order_by(cases.c.opened_at)
            )
        )


async def active(s: System, *customers: str, at: Any) -> None:
    """Product activity of ``customers`` at ``at`` (the clock moves there); returns once the
    scheduler has pushed their timers to it."""
    s.clock.set(at)
    await s.send(*(cloudevent("user.active", {"customer_id": c}, time=at) for c in customers))
    await eventually(
        lambda: timers(s.engine),
        lambda t: all(c in t and t[c].last_active_at == at for c in customers),
    )


async def last_active(engine: AsyncEngine, cid: str) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(
            select(scheduler_customers.c.last_active_at).where(scheduler_customers.c.id == cid)
        )


async def outcome_events(s: System) -> list[dict[str, Any]]:
    async with s.engine.connect() as conn:
        values = (
            await conn.execute(
                select(outbox.c.value)
                .where(outbox.c.topic == s.settings.topics.outcomes)
                .order_by(outbox.c.id)
            )
        ).scalars()
        return [orjson.loads(v) for v in values]


async def test_silence_opens_one_passive_case_activity_before_defers_it_after_closes_it(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    silent, busy, churned = "cus_pu_silent", "cus_pu_busy", "cus_pu_churned"
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(*(profile(c) for c in (silent, busy, churned)))
        await active(s, silent, busy, churned, at=T0)
        armed = await timers(engine)
        # the busy one uses the product again on day 20; the churned one cancels on day 1
        await active(s, busy, at=T0 + timedelta(days=20))
        s.clock.set(T0 + timedelta(days=1))
        await s.send(cancellation(churned, T0 + timedelta(days=1)))
        await eventually(lambda: customer_cases(engine, churned), bool)
        # a second before the silent one's N days: nothing
        s.clock.set(T0 + timedelta(days=DAYS) - timedelta(seconds=1))
        early = await s.scheduler.firer.find_passive_users()
        s.clock.set(T0 + timedelta(days=DAYS))
        claimed = await s.scheduler.firer.find_passive_users()
        again = await s.scheduler.firer.find_passive_users()
        s.clock.advance(timedelta(days=1))
        later = await s.scheduler.firer.find_passive_users()
        opened = {c: await customer_cases(engine, c) for c in (silent, busy, churned)}
        left = await timers(engine)
        # the busy one's own N days after day 20
        s.clock.set(T0 + timedelta(days=20 + DAYS))
        busy_claimed = await s.scheduler.firer.find_passive_users()
        busy_cases = await customer_cases(engine, busy)
        # the silent one comes back: the passive-user case closes at once
        await active(s, silent, at=T0 + timedelta(days=DAYS + 3))
        closed = await eventually(
            lambda: customer_cases(engine, silent), lambda r: r[0].status == "closed"
        )
        events = await outcome_events(s)

    assert armed[silent].due_at == T0 + timedelta(days=DAYS)
    assert (early, claimed, again, later) == (0, 2, 0, 0)  # the silent and the churned one
    [case] = opened[silent]
    assert (case.status, case.purpose, case.playbook) == ("open", "winback", "passive_user")
    assert case.segment["lifecycle"] == "passive_user"
    assert case.episode["kind"] == "user_inactive"
    assert case.churned_at == T0 + timedelta(days=DAYS)
    assert opened[busy] == []
    assert [c.playbook for c in opened[churned]] == ["price_discount"]  # no passive case
    assert silent not in left  # claimed: opened a case
    assert churned not in left  # churned: no passive user, the timer is dropped
    assert left[busy].due_at == T0 + timedelta(days=20 + DAYS)
    assert busy_claimed == 1
    assert [c.playbook for c in busy_cases] == ["passive_user"]
    assert (closed[0].close_reason, len(closed)) == ("activity", 1)
    mine = [e["data"] for e in events if e["data"].get("customer_id") == silent]
    assert [(e.get("reason"), e["playbook"]) for e in mine if "reason" in e] == [
        ("activity", "passive_user")
    ]
    assert (
        sum(1 for e in events if e["type"] == de.CASE_OPENED and e["data"]["customer_id"] == silent)
        == 1
    )


async def test_due_timers_are_claimed_set_based_in_batches(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    ids = [f"cus_pb{i}" for i in range(5)]
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(*(profile(c) for c in ids))
        await active(s, *ids, at=T0)
        # a second timer loop taking two timers per transaction, as several would share them
        sweeper = StepFirer(
            engine,
            s.clock,
            policy(settings.scheduler),
            settings.topics.dispatch,
            "/test/scheduler",
            batch_size=2,
            outcomes_topic=settings.topics.outcomes,
            inactivity=InactivityTimer(
                s.scheduler.playbooks,
                inactivity_rule(settings.scheduler),
                settings.topics.outcomes,
                batch_size=2,
            ),
        )
        s.clock.set(T0 + timedelta(days=DAYS))
        batches = [await sweeper.find_passive_users() for _ in range(4)]
        opened = {c: await customer_cases(engine, c) for c in ids}
    assert batches == [2, 2, 1, 0]
    assert {c: [r.playbook for r in rows] for c, rows in opened.items()} == {
        c: ["passive_user"] for c in ids
    }


async def test_an_erased_customer_has_no_inactivity_timer(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = "cus_pu_erased"
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(profile(cid))
        await active(s, cid, at=T0)
        armed = await timers(engine)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            erased = await http.delete(f"/v1/customers/{cid}")
        gone = await eventually(lambda: timers(engine), lambda t: cid not in t)
        # activity after the erasure arms nothing
        again = T0 + timedelta(days=1)
        s.clock.set(again)
        await s.send(cloudevent("user.active", {"customer_id": cid}, time=again))
        seen = await eventually(lambda: last_active(engine, cid), lambda at: at == again)
        s.clock.set(T0 + timedelta(days=DAYS + 2))
        claimed = await s.scheduler.firer.find_passive_users()
        after = await timers(engine)
        rows = await customer_cases(engine, cid)
    assert cid in armed
    assert erased.status_code == 202
    assert cid not in gone
    assert seen == again  # the scheduler took the activity
    assert claimed == 0
    assert cid not in after
    assert rows == []
