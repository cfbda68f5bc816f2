"""Moving open cases onto a new playbook version over real HTTP, on the real database and
broker: a scheduler started with version 1 opens the cases; a scheduler deployed with
versions 1 and 2 (a playbook directory of the test's own) migrates them; the timer then fires
the migrated steps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.bootstrap import SchedulerService
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts.messages import MessageOutcome
from shared.db.tables import case_steps, cases, outbox
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import T0, System, cancellation, system
from tests.support.http import serve
from tests.support.services import eventually

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}
DAY = timedelta(days=1)
NAME = "migration_test"

HEAD = """name: migration_test
version: {version}
priority: 100
match:
  lifecycle: [churned_customer]
steps:
"""
V1 = (
    HEAD.format(version=1)
    + """  - {key: s0, offset: 0d, channel: email, template: we_miss_you}
  - {key: s3, offset: 3d, channel: email, template: what_you_missed}
  - {key: s7, offset: 7d, channel: email, template: last_chance}
"""
)
# drops s3, moves s7 from day 7 to day 10 with another template, adds s5
V2 = (
    HEAD.format(version=2)
    + """  - {key: s0, offset: 0d, channel: email, template: we_miss_you}
  - {key: s5, offset: 5d, channel: email, template: what_you_missed}
  - {key: s7, offset: 10d, channel: email, template: check_in}
"""
)


def with_playbooks(settings: Settings, directory: Path, *texts: str) -> Settings:
    directory.mkdir()
    for version, text in enumerate(texts, 1):
        (directory / f"{NAME}_v{version}.yaml").write_text(text)
    return settings.model_copy(
        update={"scheduler": settings.scheduler.model_copy(update={"playbooks_dir": directory})}
    )


@asynccontextmanager
async def deployed(
    s: System, settings: Settings
) -> AsyncIterator[tuple[SchedulerService, httpx.AsyncClient]]:
    """A scheduler deployed with the new playbook files, its API on a loopback port."""
    new = scheduler_bootstrap(settings, engine=s.engine, clock=s.clock)
    async with (
        serve(new.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
    ):
        yield new, http


async def sent(s: System, case_id: str, step_key: str) -> None:
    """The dispatcher reports the step sent: its ``message.sent`` goes through the scheduler's
    own consume → transact path (handed to the pipeline directly: a consumer that joined
    before the outcomes topic's metadata reached it gets those partitions only later)."""
    command = next(
        c["data"]
        for c in await s.dispatched()
        if (c["data"]["case_id"], c["data"]["step_key"]) == (case_id, step_key)
    )
    outcome = MessageOutcome(
        idempotency_key=command["idempotency_key"],
        case_id=case_id,
        step_key=step_key,
        step_id=command["step_id"],
        customer_id=command["customer"]["id"],
        channel=command["channel"],
        provider="file",
        provider_message_id=None,
        template=command["template"],
        variant=command["variant"],
        crm_owner=command["customer"]["crm_owner"],
        playbook=command["playbook"],
    )
    event = CloudEvent(
        id=str(uuid.uuid4()),
        source="/winback/dispatcher",
        type=de.MESSAGE_SENT,
        data=outcome.to_data(),
        time=s.clock.now(),
    )
    pipeline = s.scheduler.pipeline
    result = await pipeline.transact([pipeline.decode_payload(event, b"k", None)])
    assert result.handled == 1


async def steps_by_key(s: System, case_id: str) -> dict[str, Any]:
    async with s.engine.connect() as conn:
        rows = await conn.execute(case_steps.select().where(case_steps.c.case_id == case_id))
        return {r.step_key: r for r in rows}


async def case_row(s: System, case_id: str) -> Any:
    async with s.engine.connect() as conn:
        return (await conn.execute(cases.select().where(cases.c.id == case_id))).one()


async def migrated_events(s: System) -> list[dict[str, Any]]:
    async with s.engine.connect() as conn:
        values = (
            await conn.execute(
                select(outbox.c.value)
                .where(outbox.c.topic == s.settings.topics.outcomes)
                .order_by(outbox.c.id)
            )
        ).scalars()
        events = [orjson.loads(v) for v in values]
    return [e for e in events if e["type"] == de.CASE_MIGRATED]


async def test_open_cases_move_to_the_new_version_and_their_steps_fire(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    v1_only = with_playbooks(settings, tmp_path / "v1", V1)
    both = with_playbooks(settings, tmp_path / "v2", V1, V2)
    a, b, gone = "cus_mig_a", "cus_mig_b", "cus_mig_gone"
    async with system(v1_only, engine) as s:
        await s.send(*(cancellation(cid, T0) for cid in (a, b, gone)))
        case_a, case_b, case_gone = [await s.case(cid) for cid in (a, b, gone)]
        assert {c.playbook_version for c in (case_a, case_b, case_gone)} == {1}
        await s.fire_until(T0 + timedelta(hours=1))  # s0 goes out for all three
        await sent(s, case_a.id, "s0")  # a's s0 is sent; b's is still in flight
        await s.reactivate(gone, at=T0 + timedelta(hours=20))
        await eventually(lambda: case_row(s, case_gone.id), lambda r: r.status == "closed")
        s.clock.set(T0 + DAY)
        before_a = await steps_by_key(s, case_a.id)
        before_gone = await steps_by_key(s, case_gone.id)

        async with deployed(s, both) as (new, http):
            url = f"/v1/playbooks/{NAME}/migrations"
            dry = await http.post(url, json={"from_version": 1, "dry_run": True})
            assert dry.status_code == 200, dry.text
            assert await steps_by_key(s, case_a.id) == before_a, "a dry run writes nothing"
            assert (await case_row(s, case_a.id)).playbook_version == 1
            assert await migrated_events(s) == []

            first = await http.post(url, json={"from_version": 1, "to_version": 2, "limit": 1})
            second = await http.post(url, json={"from_version": 1, "limit": 1})
            third = await http.post(url, json={"from_version": 1})
            in_flight = (await steps_by_key(s, case_b.id))["s0"]
            await sent(s, case_b.id, "s0")  # the in-flight step's outcome still lands
            after_a = await steps_by_key(s, case_a.id)
            after_b = await steps_by_key(s, case_b.id)
            events = await migrated_events(s)

            await s.fire_until(T0 + 15 * DAY)
            # the old timer or the new one: the timer does not read playbooks
            assert (await new.firer.fire_once()).claimed == 0
            commands = [c["data"] for c in await s.dispatched()]
            final_a = await steps_by_key(s, case_a.id)
        gone_after = await steps_by_key(s, case_gone.id)
        gone_case = await case_row(s, case_gone.id)

    # the dry run: every open case's plan, nothing written
    plan = dry.json()
    assert plan["dry_run"] is True
    assert (plan["to_version"], plan["cases_migrated"], plan["remaining"]) == (2, 2, 0)
    assert (plan["steps_added"], plan["steps_cancelled"], plan["steps_retimed"]) == (2, 2, 2)
    by_case = {c["customer_id"]: c for c in plan["cases"]}
    assert set(by_case) == {a, b}  # the closed case is not touched
    dry_a = by_case[a]
    assert dry_a["kept"] == ["s0"]
    assert [(c["step_key"], c["cause"]) for c in dry_a["cancelled"]] == [("s3", "removed")]
    assert [st["step_key"] for st in dry_a["added"]] == ["s5"]
    (retimed,) = dry_a["retimed"]
    assert retimed["step_key"] == "s7"
    assert set(retimed["changed"]) >= {"due_at", "original_due_at", "template"}

    # bounded calls, then nothing left to do
    assert (first.json()["cases_migrated"], first.json()["remaining"]) == (1, 1)
    assert first.json()["cases"] is None
    assert (second.json()["cases_migrated"], second.json()["remaining"]) == (1, 0)
    assert (third.status_code, third.json()["cases_migrated"], third.json()["remaining"]) == (
        200,
        0,
        0,
    )
    totals = [first.json(), second.json()]
    assert sum(t["steps_added"] for t in totals) == 2
    assert sum(t["steps_cancelled"] for t in totals) == 2
    assert sum(t["steps_retimed"] for t in totals) == 2

    # a's steps: sent one untouched, dropped one cancelled, changed one retimed, new one planned
    assert after_a["s0"] == before_a["s0"]
    assert after_a["s0"].state == "sent"
    assert (after_a["s3"].state, after_a["s3"].state_reason) == ("cancelled", "migrated")
    assert after_a["s7"].state == "pending"
    assert after_a["s7"].due_at == T0 + 10 * DAY
    assert after_a["s7"].template == "check_in"
    assert after_a["s7"].id == before_a["s7"].id  # the same timer row, retimed
    assert (after_a["s5"].state, after_a["s5"].due_at) == ("pending", T0 + 5 * DAY)
    # b's step was in flight (dispatched) during the migration: kept, and its outcome landed
    assert by_case[b]["kept"] == ["s0"]
    assert in_flight.state == "dispatched"
    assert after_b["s0"].state == "sent"
    assert after_b["s3"].state == "cancelled"
    async with engine.connect() as conn:
        versions = dict(
            (await conn.execute(select(cases.c.customer_id, cases.c.playbook_version))).all()
        )
    assert versions == {a: 2, b: 2, gone: 1}

    # the closed case is untouched
    assert gone_case.status == "closed"
    assert gone_after == before_gone

    # one case.migrated event per case, with what changed
    assert sorted(e["data"]["customer_id"] for e in events) == [a, b]
    event_a = next(e for e in events if e["data"]["customer_id"] == a)
    assert event_a["subject"] == a
    assert (event_a["data"]["from_version"], event_a["data"]["to_version"]) == (1, 2)
    assert event_a["data"]["case_id"] == case_a.id
    assert [c["step_key"] for c in event_a["data"]["cancelled"]] == ["s3"]
    assert [st["step_key"] for st in event_a["data"]["added"]] == ["s5"]
    assert [st["step_key"] for st in event_a["data"]["retimed"]] == ["s7"]

    # the timer fires the migrated steps at their new times, each key once
    mine = [c for c in commands if c["case_id"] == case_a.id]
    assert [c["step_key"] for c in mine] == ["s0", "s5", "s7"]
    assert [c["template"] for c in mine] == ["we_miss_you", "what_you_missed", "check_in"]
    assert [c["playbook_version"] for c in mine] == [1, 2, 2]
    fired = {k: st.fired_at for k, st in final_a.items()}
    assert fired["s5"] == T0 + 5 * DAY
    assert fired["s7"] == T0 + 10 * DAY
    assert final_a["s3"].state == "cancelled"
    keys = [c["idempotency_key"] for c in commands]
    assert len(keys) == len(set(keys))
    assert not any(c["case_id"] == case_gone.id and c["step_key"] != "s0" for c in commands)


async def test_bad_migration_requests_answer_problems_naming_the_field(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    both = with_playbooks(settings, tmp_path / "v2", V1, V2)
    async with system(both, engine) as s, deployed(s, both) as (_, http):
        url = f"/v1/playbooks/{NAME}/migrations"
        unknown_name = await http.post("/v1/playbooks/nope/migrations", json={"from_version": 1})
        unknown_to = await http.post(url, json={"from_version": 1, "to_version": 9})
        unknown_from = await http.post(url, json={"from_version": 7})
        same = await http.post(url, json={"from_version": 2})
        invalid = {
            "from_version": await http.post(url, json={"from_version": "one"}),
            "limit": await http.post(url, json={"from_version": 1, "limit": 0}),
            "dry_run": await http.post(url, json={"from_version": 1, "dry_run": "yes"}),
            "to_version": await http.post(url, json={"from_version": 1, "to_version": 0}),
            "surprise": await http.post(url, json={"from_version": 1, "surprise": 1}),
        }
        missing = await http.post(url, json={})
        nobody = await http.post(url, json={"from_version": 1}, headers={"authorization": ""})
        wrong = await http.post(
            url, json={"from_version": 1}, headers={"authorization": "Bearer wrong"}
        )
        empty = await http.post(url, json={"from_version": 1})
    for response in (unknown_name, unknown_to, unknown_from):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert "version 9" in unknown_to.json()["detail"]
    assert "version 7" in unknown_from.json()["detail"]
    assert same.status_code == 422
    assert same.json()["errors"] == [
        {"field": "to_version", "reason": "2 (the latest loaded version) is from_version: "
         "nothing to migrate"}
    ]  # fmt: skip
    for field, response in invalid.items():
        assert response.status_code == 422, (field, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == field
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "from_version"
    assert nobody.status_code == 401
    assert wrong.status_code == 401  # a key the service does not know
    # a known version with no open case: nothing to do
    assert empty.status_code == 200
    assert empty.json()["cases_migrated"] == empty.json()["remaining"] == 0


async def test_rolling_back_brings_back_the_steps_the_newer_version_dropped(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    v1_only = with_playbooks(settings, tmp_path / "v1", V1)
    both = with_playbooks(settings, tmp_path / "v2", V1, V2)
    cid = "cus_mig_back"
    async with system(v1_only, engine) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        await s.fire_until(T0 + timedelta(hours=1))
        async with deployed(s, both) as (_, http):
            url = f"/v1/playbooks/{NAME}/migrations"
            forward = await http.post(url, json={"from_version": 1})
            s.clock.set(T0 + 2 * DAY)
            back = await http.post(url, json={"from_version": 2, "to_version": 1})
            steps = await steps_by_key(s, case.id)
            await s.fire_until(T0 + 8 * DAY)
            fired = [c["data"]["step_key"] for c in await s.dispatched()]
    assert forward.json()["cases_migrated"] == 1
    rolled = back.json()
    assert (rolled["to_version"], rolled["cases_migrated"]) == (1, 1)
    assert (rolled["steps_added"], rolled["steps_cancelled"], rolled["steps_retimed"]) == (1, 1, 1)
    assert (steps["s3"].state, steps["s3"].due_at) == ("pending", T0 + 3 * DAY)  # back again
    assert (steps["s5"].state, steps["s5"].state_reason) == ("cancelled", "migrated")
    assert (steps["s7"].due_at, steps["s7"].template) == (T0 + 7 * DAY, "last_chance")
    assert (await case_row(s, case.id)).playbook_version == 1
    assert fired == ["s0", "s3", "s7"]
