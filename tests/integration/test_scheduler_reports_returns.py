"""Every return is recorded against the customer's latest win-back case within its attribution
horizon, open or closed: a return 200 days after the case closed at its horizon, after an
unsubscribe, after consent was withdrawn and after a supersede are each counted (in the case
row, the win-back row and the report's intent-to-treat arms). Real broker, database and HTTP,
the scheduler's real handler."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared import domain_events as de
from shared.db.tables import cases, outbox, scheduler_customers, win_backs
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout, system
from tests.integration.test_scheduler_reports import client, winback
from tests.support.http import serve
from tests.support.kafka import cloudevent, produce, structured
from tests.support.services import eventually

pytestmark = pytest.mark.integration
DAY = timedelta(days=1)
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}

# one playbook: price churners only (another reason matches nothing, so a new churn for it
# supersedes the case without opening one), a 60-day horizon, no holdout
SHORT = """
name: short_price
version: 1
match:
  reasons: [price]
horizon: 60d
steps:
  - key: d0_we_miss_you
    offset: 0d
    channel: email
    template: we_miss_you
  - key: d3_what_you_missed
    offset: 3d
    channel: email
    template: what_you_missed
"""


@pytest.fixture
def short(settings: Settings, tmp_path: Path) -> Settings:
    folder = tmp_path / "playbooks"
    folder.mkdir()
    (folder / "short_price.yaml").write_text(SHORT)
    scheduler = settings.scheduler.model_copy(update={"playbooks_dir": folder})
    return settings.model_copy(update={"scheduler": scheduler})


async def row_of(engine: AsyncEngine, case_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(cases.select().where(cases.c.id == case_id))).one()


async def win_back_of(engine: AsyncEngine, case_id: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(win_backs.select().where(win_backs.c.case_id == case_id))
        ).first()


async def seen_at(engine: AsyncEngine, customer_id: str) -> datetime | None:
    """When the scheduler last took an event of the customer (its row's ``updated_at``)."""
    async with engine.connect() as conn:
        found: datetime | None = await conn.scalar(
            select(scheduler_customers.c.updated_at).where(scheduler_customers.c.id == customer_id)
        )
        return found


async def outbox_types(engine: AsyncEngine, topic: str) -> list[str]:
    async with engine.connect() as conn:
        values = (
            await conn.execute(select(outbox.c.value).where(outbox.c.topic == topic))
        ).scalars()
        return [orjson.loads(v)["type"] for v in values]


async def test_returns_after_a_case_closed_are_each_counted(
    short: Settings, engine: AsyncEngine
) -> None:
    horizon, unsubscribed, withdrawn, superseded, beyond = (
        "cus_horizon",
        "cus_unsub",
        "cus_consent",
        "cus_super",
        "cus_beyond",
    )
    everyone = [horizon, unsubscribed, withdrawn, superseded, beyond]
    async with system(short, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in everyone])
        opened = {cid: await s.case(cid) for cid in everyone}
        await s.fire_until(T0 + 4 * DAY, step=timedelta(hours=6))  # d0 and d3 leave

        s.clock.set(T0 + 5 * DAY)
        at = s.clock.now()
        await s.send(
            cloudevent("consent.withdrawn", {"customer_id": withdrawn, "channel": "all"}, time=at),
            cancellation(superseded, at, "switched_service"),  # no playbook: no new case
        )
        await produce(
            short.kafka.bootstrap_servers,
            short.topics.outcomes,
            [
                (
                    unsubscribed.encode(),
                    *structured(
                        {
                            "specversion": "1.0",
                            "id": "unsub-late-1",
                            "source": "/winback/dispatcher",
                            "type": de.CUSTOMER_UNSUBSCRIBED,
                            "time": at.isoformat(),
                            "data": {
                                "customer_id": unsubscribed,
                                "case_id": opened[unsubscribed].id,
                                "step_key": "d0_we_miss_you",
                                "channel": "email",
                            },
                        }
                    ),
                )
            ],
        )
        for cid, reason in (
            (withdrawn, "unsubscribed"),
            (superseded, "superseded"),
            (unsubscribed, "unsubscribed"),
        ):
            row = await eventually(
                functools.partial(row_of, engine, opened[cid].id), lambda r: r.status == "closed"
            )
            assert row.close_reason == reason
        sweeper = StepFirer(
            engine,
            s.clock,
            policy(short.scheduler),
            short.topics.dispatch,
            "/test/scheduler",
            outcomes_topic=short.topics.outcomes,
        )
        s.clock.set(opened[horizon].expires_at)
        assert await sweeper.expire_cases() == 2  # horizon and beyond

        # 200 days after the horizon (260 after the churn: inside the default 12 months)
        back = opened[horizon].expires_at + 200 * DAY
        await s.reactivate(horizon, unsubscribed, withdrawn, superseded, at=back, mrr_minor=3100)
        rows = {
            cid: await eventually(
                functools.partial(row_of, engine, opened[cid].id),
                lambda r: r.returned_at is not None,
            )
            for cid in (horizon, unsubscribed, withdrawn, superseded)
        }
        # beyond the attribution horizon (12 months after the churn): not recorded
        late = T0 + 366 * DAY
        await s.reactivate(beyond, at=late)
        await eventually(
            functools.partial(seen_at, engine, beyond), lambda at: at is not None and at >= late
        )
        credits = {cid: await win_back_of(engine, opened[cid].id) for cid in everyone}
        beyond_row = await row_of(engine, opened[beyond].id)
        async with client(engine) as http:
            report = await winback(http, playbook="short_price")
        async with engine.connect() as conn:
            reonboarding = (
                await conn.execute(select(cases.c.id).where(cases.c.purpose == "reonboarding"))
            ).all()

    for cid, reason in (
        (horizon, "horizon"),
        (unsubscribed, "unsubscribed"),
        (withdrawn, "unsubscribed"),
        (superseded, "superseded"),
    ):
        row = rows[cid]
        assert (row.status, row.close_reason) == ("closed", reason)  # closed for its own reason
        assert row.returned_at == back
        credit = credits[cid]
        assert credit is not None, cid
        assert credit.returned_at == back
        assert credit.mrr_regained_minor == 3100
        assert credit.days_to_return == (back - T0) // DAY
        # the last message went out ~257 days before: outside the 90-day attribution window
        assert credit.step_key is None
    assert beyond_row.returned_at is None
    assert credits[beyond] is None
    assert reonboarding == []  # no re-onboarding playbook in this folder
    [group] = report["groups"]
    contacted = group["contacted"]
    # intent to treat: every case in its arm, its return counted whatever closed it first
    assert (contacted["targeted"], contacted["returned"]) == (5, 4)
    assert contacted["returned_after_close"] == 4
    assert report["lift_definition"] == "intent_to_treat"


async def test_a_return_on_a_closed_case_inside_the_attribution_window_is_credited(
    short: Settings, engine: AsyncEngine
) -> None:
    cid = "cus_credit"
    async with system(short, engine) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        await s.fire_until(T0 + 4 * DAY, step=timedelta(hours=6))
        s.clock.set(T0 + 5 * DAY)
        await s.send(
            cloudevent(
                "consent.withdrawn", {"customer_id": cid, "channel": "all"}, time=s.clock.now()
            )
        )
        await eventually(functools.partial(row_of, engine, case.id), lambda r: r.status == "closed")
        back: datetime = T0 + 30 * DAY
        await s.reactivate(cid, at=back, mrr_minor=2900)
        credit = await eventually(
            functools.partial(win_back_of, engine, case.id), lambda r: r is not None
        )
        won = await outbox_types(engine, short.topics.outcomes)
    assert credit.step_key == "d3_what_you_missed"
    assert credit.crm_owner == "owner-3"
    assert won.count(de.CASE_WON_BACK) == 1


async def test_no_reonboarding_after_a_return_on_an_unsubscribed_case(
    settings: Settings, engine: AsyncEngine
) -> None:
    """With the shipped playbooks: a customer who withdrew consent and came back later has the
    return recorded but gets no re-onboarding; one who came back while the case was open does."""
    quiet, open_ = (
        not_in_holdout("cus_q", "price_discount"),
        not_in_holdout("cus_o", "price_discount"),
    )
    async with system(settings, engine) as s:
        await s.send(cancellation(quiet, T0), cancellation(open_, T0))
        first = {cid: await s.case(cid) for cid in (quiet, open_)}
        s.clock.set(T0 + DAY)
        await s.send(
            cloudevent(
                "consent.withdrawn", {"customer_id": quiet, "channel": "all"}, time=s.clock.now()
            )
        )
        await eventually(
            functools.partial(row_of, engine, first[quiet].id), lambda r: r.status == "closed"
        )
        back = T0 + 40 * DAY
        await s.reactivate(quiet, open_, at=back, mrr_minor=2900)
        rows = {
            cid: await eventually(
                functools.partial(row_of, engine, first[cid].id),
                lambda r: r.returned_at is not None,
            )
            for cid in (quiet, open_)
        }
        await eventually(functools.partial(s.case, open_), lambda r: r.purpose == "reonboarding")
        latest = {cid: await s.case(cid) for cid in (quiet, open_)}
    assert rows[quiet].close_reason == "unsubscribed"
    assert rows[open_].close_reason == "returned"
    assert latest[quiet].id == first[quiet].id  # no re-onboarding case
    assert latest[open_].purpose == "reonboarding"


async def test_a_return_after_an_operator_cancel_counts_after_an_erasure_not(
    short: Settings, engine: AsyncEngine
) -> None:
    kept, erased = "cus_cancelled", "cus_erased"
    async with system(short, engine) as s:
        await s.send(cancellation(kept, T0), cancellation(erased, T0))
        first = {cid: await s.case(cid) for cid in (kept, erased)}
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            for cid in (kept, erased):
                answer = await http.post(f"/v1/cases/{first[cid].id}/cancel")
                assert answer.status_code == 200, answer.text
            deleted = await http.delete(f"/v1/customers/{erased}")
        assert deleted.status_code == 202
        back = T0 + 100 * DAY
        await s.reactivate(erased, kept, at=back, mrr_minor=1900)
        row = await eventually(
            functools.partial(row_of, engine, first[kept].id), lambda r: r.returned_at is not None
        )
        # a consent change after the return, on the same key: once the scheduler has taken it
        # (the erased row's consent is still written), it has taken the return before it
        s.clock.set(back + DAY)
        marker = cloudevent(
            "consent.withdrawn", {"customer_id": erased, "channel": "sms"}, time=back + DAY
        )
        await s.send(marker)
        seen = await eventually(
            functools.partial(seen_at, engine, erased), lambda at: at is not None and at > back
        )
        erased_row = await row_of(engine, first[erased].id)
        credits = {cid: await win_back_of(engine, first[cid].id) for cid in (kept, erased)}
    assert (row.close_reason, row.returned_at) == ("cancelled", back)
    assert credits[kept] is not None
    assert credits[kept].mrr_regained_minor == 1900
    assert seen == back + DAY
    assert erased_row.returned_at is None
    assert credits[erased] is None
