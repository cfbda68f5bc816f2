"""The scheduler's status API over real HTTP, and its start-up checks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from services.scheduler.domain.errors import PlaybookError
from shared import domain_events as de
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout, system
from tests.support.http import serve
from tests.support.kafka import event_of, read_all
from tests.support.services import eventually

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}


async def test_a_customers_status_shows_the_open_case_and_its_next_step_in_local_time(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_s", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        await s.case(cid)
        await s.fire_until(T0 + timedelta(hours=1))
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            status = (await http.get(f"/v1/customers/{cid}/winback")).json()
            missing = await http.get("/v1/customers/nobody/winback")
    case = status["open_case"]
    assert case["playbook"] == "price_discount"
    assert case["playbook_version"] == 1
    assert case["segment"]["reason"] == "price"
    assert case["window"] == "immediate"
    assert case["steps"][0]["state"] == "dispatched"
    nxt = case["next_step"]
    assert nxt["step_key"] == "d3_what_you_missed"
    assert nxt["due_at_local"].endswith("+02:00")  # Helsinki in March
    assert status["past_cases"] == []
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_cases_are_filtered_and_paged_with_a_cursor(
    settings: Settings, engine: AsyncEngine
) -> None:
    ids = [not_in_holdout(f"cus_l{i}_", "price_discount") for i in range(5)]
    async with system(settings, engine) as s:
        await s.send(*[cancellation(cid, T0) for cid in ids])
        await s.send(cancellation("cus_comp", T0, "switched_service"))
        for cid in [*ids, "cus_comp"]:
            await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            seen: list[str] = []
            cursor = None
            pages = 0
            while True:
                params: dict[str, Any] = {"limit": 2, "segment": "price", "status": "open"}
                if cursor:
                    params["cursor"] = cursor
                page = (await http.get("/v1/cases", params=params)).json()
                seen += [c["customer_id"] for c in page["items"]]
                pages += 1
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            competitors = (await http.get("/v1/cases", params={"segment": "competitor"})).json()
            due = (
                await http.get(
                    "/v1/cases", params={"due_before": (T0 + timedelta(days=4)).isoformat()}
                )
            ).json()
            bad = await http.get("/v1/cases", params={"window": "someday"})
            bad_cursor = await http.get("/v1/cases", params={"cursor": "%%%"})
            bad_status = await http.get("/v1/cases", params={"status": "sleeping"})
    assert sorted(seen) == sorted(ids)
    assert pages == 3
    assert [c["customer_id"] for c in competitors["items"]] == ["cus_comp"]
    assert len(due["items"]) == 6
    for response, field in ((bad, "window"), (bad_cursor, "cursor"), (bad_status, "status")):
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"].endswith(field)


async def test_pause_resume_and_cancel_a_case(settings: Settings, engine: AsyncEngine) -> None:
    cid = not_in_holdout("cus_c", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            paused = await http.post(f"/v1/cases/{case.id}/pause")
            fired_while_paused = await s.scheduler.firer.fire_once()
            resumed = await http.post(f"/v1/cases/{case.id}/resume")
            cancelled = await http.post(f"/v1/cases/{case.id}/cancel")
            again = await http.post(f"/v1/cases/{case.id}/cancel")
            unknown = await http.post("/v1/cases/nope/pause")
            unauthorised = await http.post(
                f"/v1/cases/{case.id}/pause", headers={"authorization": "Bearer wrong"}
            )
        await s.fire_until(T0 + timedelta(days=20), step=timedelta(days=1))
        assert await s.dispatched() == []
    assert paused.json()["status"] == "paused"
    assert fired_while_paused.claimed == 0
    assert resumed.json()["status"] == "open"
    assert cancelled.json()["status"] == "closed"
    assert {st["state"] for st in cancelled.json()["steps"]} == {"cancelled"}
    assert again.status_code == 409
    assert unknown.status_code == 404
    assert unauthorised.status_code == 401  # a key the service does not know


async def test_erasure_removes_contact_points_closes_the_case_and_is_published(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_e", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            erased = await http.delete(f"/v1/customers/{cid}")
            status = (await http.get(f"/v1/customers/{cid}/winback")).json()
        await s.fire_until(T0 + timedelta(days=20), step=timedelta(days=1))
        commands = await s.dispatched()
        published = await read_all(settings.kafka.bootstrap_servers, settings.topics.erasure, 1)
    assert erased.status_code == 202
    assert status["erased"] is True
    assert status["open_case"] is None
    assert status["past_cases"][0]["close_reason"] == "erased"
    assert commands == []
    event = event_of(published[0])
    assert event["type"] == de.CUSTOMER_ERASED
    assert set(event["data"]["address_hashes"]) == {"email"}
    assert f"{cid}@example.com" not in published[0].value.decode()


def test_a_playbook_with_an_error_stops_start_up_naming_file_line_and_field(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "broken.yaml").write_text(
        "name: broken\nversion: 1\nmatch: {}\nexit_on: [reactivated, unsubscribed_all]\n"
        "steps:\n  - key: a\n    offset: 3 days\n    channel: email\n    template: we_miss_you\n"
    )
    bad = settings.model_copy(
        update={"scheduler": settings.scheduler.model_copy(update={"playbooks_dir": tmp_path})}
    )
    with pytest.raises(PlaybookError) as info:
        scheduler_bootstrap(bad)
    message = str(info.value)
    assert "broken.yaml:7" in message
    assert "steps[0].offset" in message


async def test_ingest_forgets_contact_points_and_comments_of_an_erased_customer(
    settings: Settings, engine: AsyncEngine
) -> None:
    from sqlalchemy import select

    from shared.db.tables import churn_episodes, customers

    cid = not_in_holdout("cus_g", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0, comment="call me on +358401234567"))
        await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            assert (await http.delete(f"/v1/customers/{cid}")).status_code == 202

        async def row() -> Any:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        select(
                            customers.c.email,
                            customers.c.phone,
                            customers.c.status,
                            churn_episodes.c.comment,
                            churn_episodes.c.reason,
                        )
                        .join(churn_episodes, churn_episodes.c.customer_id == customers.c.id)
                        .where(customers.c.id == cid)
                    )
                ).one()

        erased = await eventually(row, lambda r: r.email is None)
    assert erased.email is None
    assert erased.comment is None
    assert erased.status == "churned"  # anonymised facts stay
    assert erased.reason == "price"


async def test_a_returned_customer_shows_a_reonboarding_case_after_the_win_back(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_ro", "price_discount")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        winback = await s.case(cid)
        await s.fire_until(T0 + timedelta(days=4))
        await s.reactivate(cid, at=T0 + timedelta(days=5), mrr_minor=3900)
        reonboarding = await eventually(
            lambda: s.case(cid), lambda row: row is not None and row.id != winback.id
        )
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            status = (await http.get(f"/v1/customers/{cid}/winback")).json()
            listed = (await http.get("/v1/cases", params={"purpose": "reonboarding"})).json()
            wrong = await http.get("/v1/cases", params={"purpose": "both"})
    assert status["open_case"]["id"] == reonboarding.id
    assert status["open_case"]["purpose"] == "reonboarding"
    assert status["open_case"]["playbook"] == "reonboarding_price"
    assert [(c["id"], c["purpose"], c["close_reason"]) for c in status["past_cases"]] == [
        (winback.id, "winback", "returned")
    ]
    assert [c["id"] for c in listed["items"]] == [reonboarding.id]
    assert wrong.status_code == 422
    assert "purpose" in wrong.text
