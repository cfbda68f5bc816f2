"""Every way a case closes publishes ``case.closed`` with its reason — the horizon sweep and
GDPR erasure included — and the status API measures a case's timing window on its own
playbook's ladder, from the return for a re-onboarding case. Real broker, database and HTTP."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared import domain_events as de
from shared.db.tables import case_steps, cases, outbox
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import (
    T0,
    cancellation,
    not_in_holdout,
    outside_both_holdouts,
    system,
)
from tests.support.http import serve
from tests.support.kafka import cloudevent
from tests.support.services import eventually

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}


async def closed_events(settings: Settings, engine: AsyncEngine) -> list[dict[str, Any]]:
    """The ``case.closed`` events in the outbox, oldest first."""
    async with engine.connect() as conn:
        values = (
            await conn.execute(
                select(outbox.c.value)
                .where(outbox.c.topic == settings.topics.outcomes)
                .order_by(outbox.c.id)
            )
        ).scalars()
        events = [orjson.loads(v) for v in values]
    return [e for e in events if e["type"] == de.CASE_CLOSED]


async def case_rows(engine: AsyncEngine, customers: list[str]) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(cases.select().where(cases.c.customer_id.in_(customers)))
        return {r.customer_id: r for r in rows}


async def pending_steps(engine: AsyncEngine, customers: list[str]) -> list[str]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    select(case_steps.c.step_key).where(
                        case_steps.c.customer_id.in_(customers), case_steps.c.state == "pending"
                    )
                )
            ).scalars()
        )


async def test_cases_closed_at_their_horizon_publish_case_closed_horizon_in_batches(
    settings: Settings, engine: AsyncEngine
) -> None:
    ids = [not_in_holdout(f"cus_h{i}_", "price_discount") for i in range(5)]
    async with system(settings, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in ids])
        for cid in ids:
            await s.case(cid)
        opened = await case_rows(engine, ids)
        # a sweeper taking two cases per transaction, as several would share the work
        sweeper = StepFirer(
            engine,
            s.clock,
            policy(settings.scheduler),
            settings.topics.dispatch,
            "/test/scheduler",
            batch_size=2,
            outcomes_topic=settings.topics.outcomes,
        )
        s.clock.set(max(r.expires_at for r in opened.values()) - timedelta(seconds=1))
        before_horizon = await sweeper.expire_cases()
        s.clock.advance(timedelta(seconds=1))
        closed = await sweeper.expire_cases()
        again = await sweeper.expire_cases()
        rows = await case_rows(engine, ids)
        pending = await pending_steps(engine, ids)
        events = await closed_events(settings, engine)
    assert (before_horizon, closed, again) == (0, 5, 0)
    assert {r.status for r in rows.values()} == {"closed"}
    assert {r.close_reason for r in rows.values()} == {"horizon"}
    assert pending == []
    assert sorted(e["data"]["customer_id"] for e in events) == sorted(ids)
    for event in events:
        cid = event["data"]["customer_id"]
        assert event["data"] == {
            "case_id": rows[cid].id,
            "customer_id": cid,
            "reason": "horizon",
            "playbook": "price_discount",
        }
        assert event["subject"] == cid


async def test_erasure_and_cancellation_publish_case_closed_with_their_reason(
    settings: Settings, engine: AsyncEngine
) -> None:
    erased = not_in_holdout("cus_x", "price_discount")
    cancelled = not_in_holdout("cus_y", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(erased, T0), cancellation(cancelled, T0))
        case = await s.case(erased)
        other = await s.case(cancelled)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            deleted = await http.delete(f"/v1/customers/{erased}")
            stopped = await http.post(f"/v1/cases/{other.id}/cancel")
            again = await http.delete(f"/v1/customers/{erased}")
        pending = await pending_steps(engine, [erased, cancelled])
        events = await closed_events(settings, engine)
    assert (deleted.status_code, stopped.status_code, again.status_code) == (202, 200, 202)
    assert pending == []
    assert [e["data"] for e in events] == [
        {
            "case_id": case.id,
            "customer_id": erased,
            "reason": "erased",
            "playbook": "price_discount",
        },
        {
            "case_id": other.id,
            "customer_id": cancelled,
            "reason": "cancelled",
            "playbook": "price_discount",
        },
    ]  # erasing again closes nothing more


async def test_closes_from_events_publish_one_case_closed_each_with_its_reason(
    settings: Settings, engine: AsyncEngine
) -> None:
    twice = not_in_holdout("cus_t", "price_discount")
    opted = not_in_holdout("cus_o", "price_discount")
    back = outside_both_holdouts("cus_r")
    customers = [twice, opted, back]
    async with system(settings, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in customers])
        first = {cid: await s.case(cid) for cid in customers}
        s.clock.set(T0 + timedelta(days=2))
        at = s.clock.now()
        await s.send(
            cancellation(twice, at, "switched_service"),  # a new churn supersedes the case
            cloudevent("consent.withdrawn", {"customer_id": opted, "channel": "all"}, time=at),
        )
        await s.reactivate(back, at=at)
        events = await eventually(
            functools.partial(closed_events, settings, engine), lambda e: len(e) >= 3
        )
        rows = {cid: await s.case(cid) for cid in customers}
        async with engine.connect() as conn:
            pending_cases = set(
                (
                    await conn.execute(
                        select(case_steps.c.case_id).where(case_steps.c.state == "pending")
                    )
                ).scalars()
            )
    reasons = {e["data"]["case_id"]: e["data"]["reason"] for e in events}
    assert len(events) == 3
    assert reasons == {
        first[twice].id: "superseded",
        first[opted].id: "unsubscribed",
        first[back].id: "returned",
    }
    # the newer cases (win-back after the new churn, re-onboarding after the return) are open
    assert {rows[twice].status, rows[back].status} == {"open"}
    assert rows[back].purpose == "reonboarding"
    assert pending_cases.isdisjoint(c.id for c in first.values())  # all cancelled


async def test_a_reonboarding_case_is_in_the_window_of_its_own_ladder_counted_from_the_return(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = outside_both_holdouts("cus_w")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        await s.case(cid)
        back = T0 + timedelta(days=5)
        await s.reactivate(cid, at=back)

        async def reonboarding() -> Any:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        cases.select().where(
                            cases.c.customer_id == cid, cases.c.purpose == "reonboarding"
                        )
                    )
                ).one_or_none()

        case = await eventually(functools.partial(reonboarding), lambda r: r is not None)
        # three days after the return, eight after the churn: "welcome" on the re-onboarding
        # ladder from the return ("settling_in" from the churn)
        s.clock.set(back + timedelta(days=3))
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            status = (await http.get(f"/v1/customers/{cid}/winback")).json()
            welcome = await http.get("/v1/cases", params={"window": "welcome"})
            settling = await http.get("/v1/cases", params={"window": "settling_in"})
            immediate = await http.get("/v1/cases", params={"window": "immediate"})
            series = await http.get("/v1/cases", params={"window": "email_series"})
            unknown = await http.get("/v1/cases", params={"window": "someday"})
    assert status["open_case"]["id"] == case.id
    assert status["open_case"]["window"] == "welcome"
    assert welcome.status_code == 200
    assert [c["id"] for c in welcome.json()["items"]] == [case.id]
    assert [c["window"] for c in welcome.json()["items"]] == ["welcome"]
    assert settling.json()["items"] == []
    assert case.id not in [c["id"] for c in immediate.json()["items"]]
    # the closed win-back case (eight days after churn, default ladder): email_series
    assert [c["purpose"] for c in series.json()["items"]] == ["winback"]
    assert unknown.status_code == 422
    assert "welcome" in unknown.json()["errors"][0]["reason"]


async def test_the_window_filter_uses_the_cases_own_playbook_ladder(
    settings: Settings, engine: AsyncEngine
) -> None:
    budget = not_in_holdout("cus_b", "budget")
    price = not_in_holdout("cus_p", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(budget, T0, "Budget cut"), cancellation(price, T0))
        case = await s.case(budget)
        await s.case(price)
        # thirteen months on: past the default one-year ladder, inside budget's 15 months
        s.clock.set(T0 + timedelta(days=395))
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            last = (await http.get("/v1/cases", params={"window": "last_attempt"})).json()
            status = (await http.get(f"/v1/customers/{budget}/winback")).json()
    assert case.playbook == "budget"
    assert status["open_case"]["window"] == "last_attempt"
    assert [c["customer_id"] for c in last["items"]] == [budget]
