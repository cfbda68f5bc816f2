"""The scheduler end to end: ingest → domain events → cases → timed dispatch commands, on the
real broker and database, with an injected clock running months in milliseconds."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import IngestService
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import SchedulerService
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from services.scheduler.domain import in_holdout
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.db.tables import case_steps, cases, outbox, scheduler_customers, win_backs
from shared.settings import Settings
from tests.support.buses import ServiceBus, event_of
from tests.support.kafka import cloudevent, produce, structured
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration
HELSINKI = ZoneInfo("Europe/Helsinki")
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday, 10:00 in Helsinki


@dataclass
class System:
    settings: Settings
    engine: AsyncEngine
    clock: FrozenClock
    ingest: IngestService
    scheduler: SchedulerService
    bus: ServiceBus

    async def send(self, *events: dict[str, Any]) -> None:
        await self.bus.produce(
            self.settings.topics.inbound[0],
            [(e["data"].get("customer_id", "k").encode(), *structured(e)) for e in events],
        )

    async def reactivate(self, *customers: str, at: datetime, **data: Any) -> None:
        """The billing system reports these customers back at ``at``; the clock moves there."""
        self.clock.set(at)
        await self.send(
            *(
                cloudevent("subscription.reactivated", {"customer_id": c, **data}, time=at)
                for c in customers
            )
        )

    async def case(self, customer: str) -> Any:
        async def probe() -> Any:
            async with self.engine.connect() as conn:
                return (
                    await conn.execute(
                        cases.select()
                        .where(cases.c.customer_id == customer)
                        .order_by(cases.c.opened_at.desc())
                    )
                ).first()

        return await eventually(probe, lambda r: r is not None)

    async def steps(self, customer: str) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(
                await conn.execute(
                    case_steps.select()
                    .where(case_steps.c.customer_id == customer)
                    .order_by(case_steps.c.due_at)
                )
            )

    async def fire_until(self, until: datetime, step: timedelta = timedelta(hours=1)) -> None:
        """Move the clock forward in steps, firing whatever falls due."""
        while self.clock.now() < until:
            self.clock.advance(step)
            while (await self.scheduler.firer.fire_once()).claimed:
                pass

    async def dispatched(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            values = (
                await conn.execute(
                    select(outbox.c.value)
                    .where(outbox.c.topic == self.settings.topics.dispatch)
                    .order_by(outbox.c.id)
                )
            ).scalars()
            return [orjson.loads(v) for v in values]


@asynccontextmanager
async def system(
    settings: Settings, engine: AsyncEngine, start: datetime = T0, bus: ServiceBus | None = None
) -> AsyncIterator[System]:
    """Ingest and the scheduler running on ``bus`` (the real broker if none is given)."""
    bus = bus or ServiceBus("kafka", settings.kafka.bootstrap_servers)
    clock = FrozenClock(start)
    ingest = ingest_bootstrap(settings, engine=engine, clock=clock, transport=bus.transport)
    scheduler = scheduler_bootstrap(settings, engine=engine, clock=clock, transport=bus.transport)
    # the test drives the timer itself, step by step
    scheduler.core.runtime.extra_parts = [
        p for p in scheduler.core.runtime.extra_parts if p[0] != "step-timer"
    ]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running(ingest.core.runtime))
        await stack.enter_async_context(running(scheduler.core.runtime))
        yield System(settings, engine, clock, ingest, scheduler, bus)


def not_in_holdout(prefix: str, playbook: str, share: float = 0.05) -> str:
    for i in range(1000):
        cid = f"{prefix}{i}"
        if not in_holdout(cid, playbook, share):
            return cid
    raise AssertionError("no customer outside the holdout")


def cancellation(
    cid: str, at: datetime, reason: str = "too_expensive", **extra: Any
) -> dict[str, Any]:
    return cloudevent(
        "subscription.cancelled",
        {
            "customer_id": cid,
            "reason": reason,
            **extra,
            "customer": {
                "email": f"{cid}@example.com",
                "timezone": "Europe/Helsinki",
                "locale": "fi-FI",
                "engagement": "high",
                "mrr_minor": 2900,
                "currency": "EUR",
                "customer_since": "2024-05-01T00:00:00Z",
                "crm_owner": "owner-3",
            },
        },
        time=at,
    )


async def test_a_cancellation_yields_dispatch_commands_at_the_right_local_times(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_p", "price_discount")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        assert case.playbook == "price_discount"
        assert case.segment["reason"] == "price"
        await s.fire_until(T0 + timedelta(days=15))
        commands = await s.dispatched()
    assert [c["data"]["step_key"] for c in commands] == [
        "d0_we_miss_you",
        "d3_what_you_missed",
        "d7_special_offer",
        "d14_last_chance",
    ]
    for command in commands:
        sent_at = datetime.fromisoformat(command["data"]["requested_at"]).astimezone(HELSINKI)
        assert 9 <= sent_at.hour < 20, f"{command['data']['step_key']} in quiet hours"
        assert command["data"]["customer"]["email"] == f"{cid}@example.com"
        assert command["data"]["idempotency_key"] == f"{case.id}:{command['data']['step_key']}"
        # what the dispatcher re-checks at send time: the window in the customer's zone and
        # the step's expiry
        assert command["data"]["send_window"] == {
            "start": "09:00",
            "end": "20:00",
            "timezone": "Europe/Helsinki",
        }
        assert datetime.fromisoformat(command["data"]["expires_at"]) > sent_at
    offsets = [datetime.fromisoformat(c["data"]["requested_at"]) - T0 for c in commands]
    assert [o.days for o in offsets] == [0, 3, 7, 14]
    offer = commands[2]["data"]
    assert offer["is_discount"] is True
    assert offer["offer"] in ("discount_50pct_3mo", "free_month")
    assert offer["valid_until"] is not None


async def test_a_step_due_at_night_goes_at_the_start_of_the_local_send_window(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_n", "price_discount")
    night = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 03:00 in Helsinki
    async with system(settings, engine, start=night) as s:
        await s.send(cancellation(cid, night))
        await s.case(cid)
        await s.fire_until(night + timedelta(hours=12), step=timedelta(minutes=30))
        commands = await s.dispatched()
    first = datetime.fromisoformat(commands[0]["data"]["requested_at"]).astimezone(HELSINKI)
    assert (first.hour, first.minute) == (9, 0)


async def test_a_reactivation_cancels_pending_steps_and_credits_the_last_touch(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_w", "price_discount")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        await s.fire_until(T0 + timedelta(days=4))
        back = T0 + timedelta(days=5)
        await s.reactivate(cid, at=back, mrr_minor=3900)

        async def closed() -> Any:
            async with engine.connect() as conn:
                return (await conn.execute(cases.select().where(cases.c.id == case.id))).one()

        row = await eventually(closed, lambda r: r.status == "closed")
        await s.fire_until(back + timedelta(days=30), step=timedelta(hours=6))
        steps = await s.steps(cid)
        commands = await s.dispatched()
        won = await s.bus.read(s.settings.topics.outcomes, expect=3, timeout=10)
    assert row.close_reason == "returned"
    # (the re-onboarding case the return opens has its own steps)
    assert [c["data"]["step_key"] for c in commands if c["data"]["case_id"] == case.id] == [
        "d0_we_miss_you",
        "d3_what_you_missed",
    ]
    assert {
        st.state
        for st in steps
        if st.case_id == case.id and st.step_key not in ("d0_we_miss_you", "d3_what_you_missed")
    } == {"cancelled"}
    async with engine.connect() as conn:
        credit = (await conn.execute(win_backs.select())).one()
    assert credit.step_key == "d3_what_you_missed"
    assert credit.crm_owner == "owner-3"
    assert credit.mrr_regained_minor == 3900
    assert credit.days_to_return == 5
    won_back = [e for e in map(event_of, won) if e["type"] == de.CASE_WON_BACK]
    assert len(won_back) == 1
    assert won_back[0]["data"]["step_key"] == "d3_what_you_missed"
    assert won_back[0]["data"]["crm_owner"] == "owner-3"


async def test_an_unsubscribe_from_a_message_closes_the_case_and_marks_the_step(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_u", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        await s.fire_until(T0 + timedelta(hours=2))
        (command,) = await s.dispatched()
        clicked = T0 + timedelta(hours=3)
        s.clock.set(clicked)
        # what the dispatcher publishes after a one-click unsubscribe (or a Twilio STOP)
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.outcomes,
            [
                (
                    cid.encode(),
                    *structured(
                        {
                            "specversion": "1.0",
                            "id": "unsub-1",
                            "source": "/winback/dispatcher",
                            "type": de.CUSTOMER_UNSUBSCRIBED,
                            "time": clicked.isoformat(),
                            "data": {
                                "customer_id": cid,
                                "case_id": case.id,
                                "step_key": command["data"]["step_key"],
                                "channel": "email",
                                "provider": "sendgrid",
                            },
                        }
                    ),
                )
            ],
        )

        async def closed() -> Any:
            async with engine.connect() as conn:
                return (await conn.execute(cases.select().where(cases.c.id == case.id))).one()

        row = await eventually(closed, lambda r: r.status == "closed")
        steps = {st.step_key: st for st in await s.steps(cid)}
    assert row.close_reason == "unsubscribed"
    marked = steps[command["data"]["step_key"]]
    assert marked.outcome["unsubscribed"] == clicked.isoformat()
    assert marked.outcome["provider"] == "sendgrid"
    assert {st.state for key, st in steps.items() if key != marked.step_key} == {"cancelled"}


async def test_a_feature_release_wakes_exactly_the_customers_who_asked_for_it(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    sso = not_in_holdout("cus_sso", "missing_feature", 0.1)
    api = not_in_holdout("cus_api", "missing_feature", 0.1)
    price = not_in_holdout("cus_pr", "price_discount")
    long_ago = T0 - timedelta(days=200)
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(
            cancellation(sso, long_ago, "missing_features", feature="SSO login"),
            cancellation(api, long_ago, "missing_features", feature="public api"),
            cancellation(price, T0),
        )
        for cid in (sso, api, price):
            await s.case(cid)
        await s.fire_until(T0 + timedelta(hours=3))
        before = {
            c["data"]["customer"]["id"]
            for c in await s.dispatched()
            if c["data"]["template"] == "feature_built"
        }
        await s.send(
            cloudevent(
                "feature.released", {"feature": "sso_login", "name": "SSO"}, time=s.clock.now()
            )
        )

        async def woken() -> list[Any]:
            async with engine.connect() as conn:
                return list(
                    await conn.execute(case_steps.select().where(case_steps.c.trigger.is_not(None)))
                )

        triggered = await eventually(woken, lambda rows: len(rows) >= 1)
        await s.fire_until(s.clock.now() + timedelta(hours=2))
        built = [
            c["data"] for c in await s.dispatched() if c["data"]["template"] == "feature_built"
        ]
    assert before == set()
    assert {t.customer_id for t in triggered} == {sso}
    assert [b["customer"]["id"] for b in built] == [sso]
    assert built[0]["features"] == ["SSO"]


async def test_two_timers_on_one_database_never_fire_a_step_twice(
    settings: Settings, engine: AsyncEngine, migrated_url: str
) -> None:
    from shared.db.engine import make_engine

    customers = [not_in_holdout(f"cus_t{i}_", "price_discount") for i in range(40)]
    async with system(settings, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in customers])
        await eventually(_case_count(engine), lambda n: n >= len(customers))
        s.clock.advance(timedelta(days=30))
        other_engine = make_engine(migrated_url, pool_size=2)
        other = scheduler_bootstrap(settings, engine=other_engine, clock=s.clock)
        s.scheduler.firer.batch_size = other.firer.batch_size = 7
        s.scheduler.firer.policy = other.firer.policy = _no_caps(s.scheduler.firer.policy)

        async def drain(firer: Any) -> int:
            fired = 0
            while (result := await firer.fire_once()).claimed:
                fired += result.dispatched
            return fired

        counts = await asyncio.gather(
            drain(s.scheduler.firer),
            drain(other.firer),
            drain(s.scheduler.firer),
            drain(other.firer),
        )
        await other_engine.dispose()
        commands = await s.dispatched()
        steps = [st for cid in customers for st in await s.steps(cid)]
    keys = [c["data"]["idempotency_key"] for c in commands]
    assert len(keys) == len(set(keys)), "a step was dispatched twice"
    assert sum(counts) == len(keys)
    assert all(
        st.state in ("dispatched", "skipped")
        for st in steps
        if st.due_at <= T0 + timedelta(days=30)
    )
    assert len(keys) >= 4 * len(customers)


async def test_a_timer_killed_mid_batch_loses_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    customers = [not_in_holdout(f"cus_k{i}_", "price_discount") for i in range(10)]
    async with system(settings, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in customers])
        await eventually(_case_count(engine), lambda n: n >= len(customers))
        s.clock.advance(timedelta(hours=2))
        firer = s.scheduler.firer
        real_clock = firer.clock

        class DiesMidBatch:
            calls = 0

            def now(self) -> datetime:
                self.calls += 1
                if self.calls > 1:
                    raise Killed
                return real_clock.now()

        firer.clock = DiesMidBatch()
        original = firer._command

        def command_then_die(*args: Any) -> dict[str, Any]:
            firer.clock.now()  # the second call dies, after some steps were decided
            return original(*args)

        firer._command = command_then_die  # type: ignore[method-assign,assignment]
        with pytest.raises(Killed):
            await firer.fire_once()
        firer.clock, firer._command = real_clock, original  # type: ignore[method-assign]
        async with engine.connect() as conn:
            pending = await conn.scalar(
                select(func.count())
                .select_from(case_steps)
                .where(case_steps.c.state == "pending", case_steps.c.due_at <= s.clock.now())
            )
        assert pending == len(customers)
        assert await s.dispatched() == []
        while (await firer.fire_once()).claimed:
            pass
        commands = await s.dispatched()
    assert sorted(c["data"]["customer"]["id"] for c in commands) == sorted(customers)


class Killed(Exception):
    pass


def _case_count(engine: AsyncEngine) -> Any:
    async def probe() -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(cases)) or 0)

    return probe


def _no_caps(policy: Any) -> Any:
    from dataclasses import replace

    from services.scheduler.domain.guardrails import FrequencyCap

    return replace(policy, caps=(FrequencyCap(1000, timedelta(days=1)),), send_window=None)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_over_random_clock_jumps_every_due_step_fires_exactly_once(
    settings: Settings, engine: AsyncEngine, seed: int
) -> None:
    import random

    rnd = random.Random(seed)
    customers = [not_in_holdout(f"cus_r{seed}_{i}_", "price_discount") for i in range(6)]
    reasons = ["too_expensive", "switched_service", "Budget cut", "customer_service", "other"]
    async with system(settings, engine) as s:
        await s.send(
            *[
                cancellation(cid, T0 - timedelta(days=rnd.randint(0, 60)), rnd.choice(reasons))
                for cid in customers
            ]
        )
        await eventually(_case_count(engine), lambda n: n >= len(customers))
        horizon = T0 + timedelta(days=400)
        while s.clock.now() < horizon:
            s.clock.advance(timedelta(hours=rnd.choice([1, 5, 13, 30, 24 * 9, 24 * 40])))
            for _ in range(rnd.randint(1, 3)):
                await s.scheduler.firer.fire_once()
        while (await s.scheduler.firer.fire_once()).claimed:
            pass
        await s.scheduler.firer.expire_cases()
        commands = await s.dispatched()
        steps = [st for cid in customers for st in await s.steps(cid)]
    keys = [c["data"]["idempotency_key"] for c in commands]
    assert len(keys) == len(set(keys)), "a step fired twice"
    fired = {f"{st.case_id}:{st.step_key}" for st in steps if st.state == "dispatched"}
    assert set(keys) == fired, "every dispatched step has exactly one command, and vice versa"
    assert [st.step_key for st in steps if st.state == "pending"] == [], "a due step never fired"
    for st in steps:
        if st.fired_at is not None:
            assert st.original_due_at <= st.fired_at < st.expires_at, st.step_key


def outside_both_holdouts(prefix: str) -> str:
    for i in range(1000):
        cid = f"{prefix}{i}"
        if not in_holdout(cid, "price_discount", 0.05) and not in_holdout(
            cid, "reonboarding_price", 0.05
        ):
            return cid
    raise AssertionError("no customer outside the holdouts")


async def test_a_won_back_customer_is_re_onboarded_and_watched_until_they_churn_again(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    active = outside_both_holdouts("cus_ra")
    quiet = outside_both_holdouts("cus_rq")
    async with system(settings, engine, bus=service_bus) as s:
        await s.send(cancellation(active, T0), cancellation(quiet, T0))
        first = {cid: await s.case(cid) for cid in (active, quiet)}
        await s.fire_until(T0 + timedelta(days=4))
        back = T0 + timedelta(days=5)
        await s.reactivate(active, quiet, at=back)

        async def reonboarding(cid: str) -> Any:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        cases.select().where(
                            cases.c.customer_id == cid, cases.c.purpose == "reonboarding"
                        )
                    )
                ).one_or_none()

        opened = {
            cid: await eventually(functools.partial(reonboarding, cid), lambda r: r is not None)
            for cid in (active, quiet)
        }
        planned = {st.step_key: st for st in await s.steps(quiet) if st.case_id == opened[quiet].id}
        # a return during re-onboarding changes nothing
        await s.reactivate(quiet, at=back + timedelta(hours=2))
        # the active one uses the product after the return; the quiet one does not
        used = back + timedelta(days=5)
        await s.fire_until(used)
        await s.send(cloudevent("user.active", {"customer_id": active}, time=used))

        async def last_active() -> Any:
            async with engine.connect() as conn:
                return await conn.scalar(
                    select(scheduler_customers.c.last_active_at).where(
                        scheduler_customers.c.id == active
                    )
                )

        await eventually(last_active, lambda v: v is not None)
        await s.fire_until(back + timedelta(days=22), step=timedelta(hours=3))
        at_risk = {
            cid: next(
                st
                for st in await s.steps(cid)
                if st.case_id == opened[cid].id and st.step_key == "d21_at_risk"
            )
            for cid in (active, quiet)
        }
        commands = await s.dispatched()
        # a new churn ends re-onboarding and opens a win-back case flagged re-churn
        rechurn_at = back + timedelta(days=30)
        s.clock.set(rechurn_at)
        await s.send(cancellation(quiet, rechurn_at))

        async def newest() -> Any:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        cases.select()
                        .where(cases.c.customer_id == quiet, cases.c.status == "open")
                        .order_by(cases.c.opened_at.desc())
                    )
                ).first()

        second = await eventually(newest, lambda r: r is not None and r.purpose == "winback")
        async with engine.connect() as conn:
            ended = (await conn.execute(cases.select().where(cases.c.id == opened[quiet].id))).one()
            count = await conn.scalar(
                select(func.count()).select_from(cases).where(cases.c.customer_id == quiet)
            )
            events = [
                orjson.loads(v)
                for v in (
                    await conn.execute(
                        select(outbox.c.value)
                        .where(outbox.c.topic == s.settings.topics.outcomes)
                        .order_by(outbox.c.id)
                    )
                ).scalars()
            ]

    for cid in (active, quiet):
        assert first[cid].purpose == "winback"
        case = opened[cid]
        assert case.playbook == "reonboarding_price"
        assert case.segment["reason"] == "price"
        assert case.episode["reason"] == "price"
        assert case.expires_at == back + timedelta(days=90)
    assert planned["d1_welcome_back"].due_at == back + timedelta(days=1)
    assert planned["d14_plan_value"].due_at == back + timedelta(days=14)
    for key in ("d1_welcome_back", "d14_plan_value"):
        local = planned[key].due_at.astimezone(HELSINKI)
        assert 9 <= local.hour < 20
    sent = {(c["data"]["customer"]["id"], c["data"]["step_key"]) for c in commands}
    assert {(active, "d1_welcome_back"), (quiet, "d1_welcome_back")} <= sent
    assert {(active, "d14_plan_value"), (quiet, "d14_plan_value")} <= sent
    assert (quiet, "d21_at_risk") in sent
    assert (active, "d21_at_risk") not in sent
    assert at_risk[quiet].state == "dispatched"
    assert at_risk[active].state == "pending"
    assert at_risk[active].state_reason == "not_at_risk"
    assert at_risk[active].due_at == used + timedelta(days=21)
    assert not any(
        c["data"]["is_discount"] or c["data"]["offer"]
        for c in commands
        if c["data"]["playbook"].startswith("reonboarding")
    )
    assert ended.status == "closed"
    assert ended.close_reason == "superseded"
    assert second.is_rechurn is True
    assert count == 3  # the first win-back, re-onboarding, the re-churn case
    opened_events = [
        e["data"]
        for e in events
        if e["type"] == de.CASE_OPENED and e["data"]["customer_id"] == quiet
    ]
    assert [e["purpose"] for e in opened_events] == ["winback", "reonboarding", "winback"]
