"""Re-onboarding only for churned customers who came back, and the re-churn rule for every one
of them: ingest and the scheduler on the real broker and database, clock frozen.

A trial that converts, a lost lead that buys and a passive user who logs in again close their
case as ``returned`` but get no "welcome back"; a churned customer who came back on their own
(no message credited) and churns again a year later is a re-churner: no discount playbook."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.tables import cases, scheduler_customers, win_backs
from shared.settings import Settings
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout, system
from tests.support.buses import ServiceBus
from tests.support.kafka import cloudevent
from tests.support.services import eventually

pytestmark = pytest.mark.integration
PROFILE = {"email": "x@example.com", "timezone": "Europe/Helsinki", "locale": "fi-FI"}


async def customer_cases(engine: AsyncEngine, cid: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            await conn.execute(
                cases.select().where(cases.c.customer_id == cid).order_by(cases.c.opened_at)
            )
        )


async def closed(engine: AsyncEngine, cid: str) -> list[Any]:
    return await eventually(
        lambda: customer_cases(engine, cid),
        lambda rows: bool(rows) and all(r.status == "closed" for r in rows),
    )


async def test_conversions_and_passive_users_active_again_get_no_welcome_back(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    trial, lead, passive = "cus_rt_trial", "cus_rt_lead", "cus_rt_passive"
    churned = not_in_holdout("cus_rt_churned", "price_discount")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(
            cloudevent(
                "trial.expired",
                {"customer_id": trial, "reason": "too_expensive", "customer": PROFILE},
                time=T0,
            ),
            cloudevent(
                "lead.lost",
                {"customer_id": lead, "reason": "competitor", "customer": PROFILE},
                time=T0,
            ),
            cloudevent(
                "user.inactive",
                {"customer_id": passive, "days_inactive": 40, "customer": PROFILE},
                time=T0,
            ),
            cancellation(churned, T0),
        )
        for cid in (trial, lead, passive, churned):
            await s.case(cid)
        back = T0 + timedelta(days=3)
        s.clock.set(back)
        await s.send(
            cloudevent(
                "subscription.created",
                {"customer_id": trial, "plan": "pro", "mrr_minor": 2900, "currency": "EUR"},
                time=back,
            ),
            cloudevent(
                "subscription.created",
                {"customer_id": lead, "plan": "pro", "mrr_minor": 2900, "currency": "EUR"},
                time=back,
            ),
            cloudevent("user.active", {"customer_id": passive}, time=back),
            cloudevent("subscription.reactivated", {"customer_id": churned}, time=back),
        )
        rows = {cid: await closed(engine, cid) for cid in (trial, lead, passive)}
        comeback = await eventually(
            lambda: customer_cases(engine, churned),
            lambda r: any(c.purpose == "reonboarding" for c in r),
        )
        async with engine.connect() as conn:
            recorded = set((await conn.execute(select(win_backs.c.customer_id))).scalars().all())
            flagged = dict(
                (
                    await conn.execute(
                        select(scheduler_customers.c.id, scheduler_customers.c.last_won_back_at)
                    )
                ).all()
            )
    for cid in (trial, lead, passive):
        assert [(r.purpose, r.close_reason) for r in rows[cid]] == [("winback", "returned")]
        assert flagged[cid] is None  # not a returner: no re-churn flag if they leave
    assert {trial, lead, passive, churned} <= recorded  # every return is attributed
    assert [c.purpose for c in comeback] == ["winback", "reonboarding"]
    assert flagged[churned] == back


async def test_a_churned_customer_back_on_their_own_is_a_rechurner_when_they_leave_again(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_rr", "price_discount")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0))
        first = await s.case(cid)
        # back the same hour, before any step was sent: nothing earns the credit
        back = T0 + timedelta(minutes=5)
        await s.reactivate(cid, at=back)
        await eventually(
            lambda: customer_cases(engine, cid),
            lambda r: any(c.purpose == "reonboarding" for c in r),
        )
        # more than a discount period later they cancel over price again
        again = back + timedelta(days=400)
        s.clock.set(again)
        await s.send(cancellation(cid, again))
        rows = await eventually(
            lambda: customer_cases(engine, cid),
            lambda r: len([c for c in r if c.purpose == "winback"]) == 2,
        )
        async with engine.connect() as conn:
            credited = (
                await conn.execute(
                    select(win_backs.c.step_key).where(win_backs.c.case_id == first.id)
                )
            ).scalar_one()
    second = [c for c in rows if c.purpose == "winback"][-1]
    assert first.playbook == "price_discount"
    assert credited is None  # came back on their own
    assert second.is_rechurn is True
    assert second.segment["is_rechurn"] is True
    assert second.playbook != "price_discount"  # the discount playbook excludes re-churners
