"""``POST /v1/simulate`` and ``GET /v1/playbooks`` on real HTTP and PostgreSQL, and simulate
against the real step timer: the same customer, churned at night under a frozen clock, gets
the steps simulate said, at the times it said."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.simulate import SimulationOut, render_table
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import HELSINKI, T0, cancellation, not_in_holdout, system
from tests.support.buses import ServiceBus
from tests.support.http import serve
from tests.support.kafka import cloudevent

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}
NIGHT = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 03:00 in Helsinki
TICK = timedelta(hours=1)  # how far the test's clock moves between the timer's passes


def high_value_cancellation(cid: str, at: datetime) -> dict[str, Any]:
    """A price churner worth 900 EUR a month: the CRM call (no consent needed) and the SMS
    nudge (no SMS consent: skipped) are planned too."""
    return cloudevent(
        "subscription.cancelled",
        {
            "customer_id": cid,
            "reason": "too_expensive",
            "customer": {
                "email": f"{cid}@example.com",
                "timezone": "Europe/Helsinki",
                "locale": "fi-FI",
                "engagement": "high",
                "mrr_minor": 90_000,
                "currency": "EUR",
                "customer_since": "2024-05-01T00:00:00Z",
                "crm_owner": "owner-3",
            },
        },
        time=at,
    )


async def test_simulate_agrees_with_what_the_timers_do(
    settings: Settings, engine: AsyncEngine, service_bus: ServiceBus
) -> None:
    cid = not_in_holdout("cus_sim", "price_discount")
    until = NIGHT + timedelta(days=20)
    async with system(settings, engine, start=NIGHT, bus=service_bus) as s:
        await s.send(high_value_cancellation(cid, NIGHT))
        case = await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            body = {"customer_id": cid, "now": NIGHT.isoformat(), "until": "2026-03-21"}
            answer = await http.post("/v1/simulate", json=body)
        await s.fire_until(until, step=TICK)
        commands = await s.dispatched()
        steps = {row.step_key: row for row in await s.steps(cid)}
    assert answer.status_code == 200, answer.text
    simulated = SimulationOut.model_validate(answer.json())
    assert simulated.customer.known
    assert simulated.churn.source == "recorded"
    assert simulated.playbook is not None
    assert (simulated.playbook.name, simulated.playbook.version) == (
        case.playbook,
        case.playbook_version,
    )
    assert simulated.segment.model_dump(exclude={"labels"}) == {
        k: v for k, v in case.segment.items() if k != "labels"
    }
    assert simulated.holdout is not None
    assert simulated.holdout.in_holdout is False

    sent = [step for step in simulated.timeline if step.outcome == "sent"]
    by_key = {c["data"]["step_key"]: c["data"] for c in commands}
    # the same steps go out, in the same order, each in the same timer pass (the clock moves
    # an hour at a time: a step is fired at the first pass at or after its time)
    assert [c["data"]["step_key"] for c in commands] == [step.step_key for step in sent]
    assert len(sent) >= 5
    for step in sent:
        requested = datetime.fromisoformat(by_key[step.step_key]["requested_at"])
        assert timedelta(0) <= requested - step.at < TICK, step.step_key
        assert by_key[step.step_key]["template"] == step.sent_template
        assert by_key[step.step_key]["offer"] == step.sent_offer
        assert by_key[step.step_key]["variant"] == step.variant
        local = requested.astimezone(HELSINKI)
        assert 9 <= local.hour < 20
    # what simulate skips, the timer skips, for the same reason
    skipped = [step for step in simulated.timeline if step.outcome == "skipped"]
    assert [step.step_key for step in skipped] == ["d10_sms_nudge"]
    assert skipped[0].reason == "no_consent: not_given"
    assert steps["d10_sms_nudge"].state == "skipped"
    assert steps["d10_sms_nudge"].state_reason == skipped[0].reason
    # deferred out of the night: the first step says when, and it went then
    first = simulated.timeline[0]
    assert first.action == "defer"
    assert first.deferrals[0].reason == "quiet_hours"
    assert first.at_local.startswith("2026-03-02T09:00")
    # the offer found the weekly cap full when it fell due (day 0, 1 and 3 sent): it waited
    # until the day-0 message left the 7 days, and the timer sent it then too
    offer = next(step for step in simulated.timeline if step.step_key == "d7_special_offer")
    assert [d.reason for d in offer.deferrals] == ["frequency_cap"]
    assert steps["d7_special_offer"].defer_count == 1
    # planned alike: each simulated step is a step of the case, due at the same time
    for step in simulated.timeline:
        assert steps[step.step_key].original_due_at == step.due_at, step.step_key


async def test_the_routes_need_a_key_name_a_bad_field_and_know_their_customers(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_simh", "price_discount")
    inline: dict[str, Any] = {
        "profile": {
            "id": cid,
            "timezone": "America/New_York",
            "engagement": "medium",
            "mrr_minor": 9000,
            "currency": "USD",
            "consent": {"email": True},
        },
        "churn": {"reason": "price", "occurred_at": T0.isoformat()},
        "now": T0.isoformat(),
        "from": "2026-03-02",
        "until": "2026-03-31",
    }
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        case = await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            anonymous_list = await http.get("/v1/playbooks")
            anonymous_sim = await http.post("/v1/simulate", json=inline)
            http.headers.update(AUTH)
            listed = await http.get("/v1/playbooks")
            answer = await http.post("/v1/simulate", json=inline)
            known = await http.post("/v1/simulate", json={"customer_id": cid})
            what_if = await http.post(
                "/v1/simulate",
                json={
                    "customer_id": cid,
                    "churn": {"reason": "competitor", "competitor": "Acme"},
                    "now": T0.isoformat(),
                },
            )
            bad_zone = await http.post(
                "/v1/simulate",
                json={**inline, "profile": {**inline["profile"], "timezone": "Mars/Olympus"}},
            )
            bad_reason = await http.post(
                "/v1/simulate", json={**inline, "churn": {"reason": "too_expensive"}}
            )
            neither = await http.post("/v1/simulate", json={"now": T0.isoformat()})
            no_churn = await http.post("/v1/simulate", json={"profile": {"id": "x"}})
            backwards = await http.post(
                "/v1/simulate", json={**inline, "from": "2026-04-01", "until": "2026-03-01"}
            )
            unknown = await http.post("/v1/simulate", json={"customer_id": "nobody"})
    for response in (anonymous_list, anonymous_sim):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"

    assert listed.status_code == 200
    playbooks = {p["name"]: p for p in listed.json()["items"]}
    price = playbooks["price_discount"]
    assert price["match"]["reasons"] == ["price"]
    assert price["holdout"] == 0.05
    assert price["steps"][0] == {
        "key": "d0_we_miss_you",
        "timing": "0d after churn",
        "channel": "email",
        "template": "we_miss_you",
        "offer": None,
        "is_discount": False,
        "without_discount": None,
        "on_cap": "defer",
        "when": None,
        "variants": [],
    }
    assert playbooks["reonboarding_default"]["starts_on"] == "returned"

    assert answer.status_code == 200, answer.text
    out = SimulationOut.model_validate(answer.json())
    assert out.customer.known is False
    assert out.customer.timezone == "America/New_York"
    assert out.segment.value_tier == "medium"
    assert out.playbook is not None
    assert out.playbook.name == "price_discount"
    # T0 is 03:00 in New York: the day-0 email waits for 09:00 there
    first = out.timeline[0]
    assert first.step_key == "d0_we_miss_you"
    assert first.due_at_local == "2026-03-02T03:00:00-05:00"
    assert first.at_local == "2026-03-02T09:00:00-05:00"
    assert out.timeline
    assert all(date(2026, 3, 2) <= step.due_at.date() <= date(2026, 3, 31) for step in out.timeline)
    assert "d90_whats_new" not in {step.step_key for step in out.timeline}  # after until
    table = render_table(out)
    assert "d0_we_miss_you" in table
    assert "sent 2026-03-02 14:00 UTC (2026-03-02 09:00 local)" in table

    assert known.status_code == 200, known.text
    assert known.json()["churn"]["source"] == "recorded"
    assert known.json()["customer"]["known"] is True
    # a known customer with another churn: their profile, that churn
    assert what_if.status_code == 200, what_if.text
    assert what_if.json()["churn"]["source"] == "given"
    assert what_if.json()["churn"]["competitor"] == "Acme"
    assert what_if.json()["playbook"]["name"] == "competitor"
    assert what_if.json()["customer"]["timezone"] == "Europe/Helsinki"
    # a recorded churn is simulated from when the scheduler recorded it: the case's whole run
    assert datetime.fromisoformat(known.json()["now"]) == case.opened_at

    for response, field in (
        (bad_zone, "profile.timezone"),
        (bad_reason, "churn.reason"),
        (neither, "customer_id"),
        (no_churn, "churn"),
        (backwards, "from"),
    ):
        assert response.status_code == 422, (field, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == field
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
