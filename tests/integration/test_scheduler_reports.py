"""The results reports over real HTTP on the migrated PostgreSQL: rows seeded directly, every
number checked against an independent calculation."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import deps, reports
from shared.clock import FrozenClock
from shared.db.tables import case_steps, cases, win_backs
from shared.http.app import create_app
from shared.settings import DEV_SECRET
from tests.support.http import serve

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}
AS_OF = datetime(2027, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
Z = 1.959963984540054


# -- independent arithmetic (not the code under test) ------------------------------------------
def wilson(x: int, n: int) -> tuple[float, float]:
    p = x / n
    denominator = 1 + Z**2 / n
    centre = (p + Z**2 / (2 * n)) / denominator
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / denominator
    return centre - half, centre + half


def newcombe(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    p1, p2 = x1 / n1, x2 / n2
    (l1, u1), (l2, u2) = wilson(x1, n1), wilson(x2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt(
        (u1 - p1) ** 2 + (p2 - l2) ** 2
    )


def percentile_cont(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


# -- seeding -------------------------------------------------------------------------------------
class Seed:
    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []
        self.win_backs: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def case(
        self,
        case_id: str,
        *,
        customer: str | None = None,
        churned_at: datetime,
        playbook: str = "price_discount",
        holdout: bool = False,
        reason: str = "price",
        value_tier: str = "medium",
        lifecycle: str = "churned_customer",
        labels: Sequence[str] = (),
        returned_after: timedelta | None = None,
        mrr: int | None = None,
        currency: str | None = "EUR",
        credited_step: str | None = None,
    ) -> str:
        customer = customer or f"cus-{case_id}"
        returned_at = churned_at + returned_after if returned_after is not None else None
        self.cases.append(
            {
                "id": case_id,
                "customer_id": customer,
                "episode_id": f"ep-{case_id}",
                "status": "closed",
                "purpose": "winback",
                "close_reason": "returned" if returned_at else "horizon",
                "playbook": playbook,
                "playbook_version": 1,
                "segment": {
                    "lifecycle": lifecycle,
                    "reason": reason,
                    "value_tier": value_tier,
                    "engagement": "medium",
                    "tenure": "established",
                    "is_rechurn": False,
                    "days_since_churn": 0,
                    "labels": sorted(labels),
                },
                "episode": {
                    "id": f"ep-{case_id}",
                    "kind": "subscription_cancelled",
                    "occurred_at": churned_at.isoformat(),
                    "reason": reason,
                    "mrr_at_churn_minor": mrr,
                },
                "holdout": holdout,
                "is_rechurn": False,
                "churned_at": churned_at,
                "opened_at": churned_at,
                "expires_at": churned_at + 365 * DAY,
                "closed_at": returned_at or churned_at + 365 * DAY,
                "returned_at": returned_at,
            }
        )
        if returned_at is not None and returned_after is not None:
            self.win_backs.append(
                {
                    "case_id": case_id,
                    "customer_id": customer,
                    "step_key": credited_step,
                    "channel": "email" if credited_step else None,
                    "template": credited_step,
                    "variant": "default" if credited_step else None,
                    "playbook": playbook,
                    "mrr_regained_minor": mrr,
                    "currency": currency,
                    "days_to_return": returned_after // DAY,
                    "holdout": holdout,
                    "churned_at": churned_at,
                    "returned_at": returned_at,
                }
            )
        return case_id

    def reonboarding(
        self,
        case_id: str,
        *,
        returned_at: datetime,
        holdout: bool = False,
        playbook: str = "welcome_back",
        opened_after: timedelta = timedelta(0),
        rechurn_after: timedelta | None = None,
    ) -> str:
        """A win-back case that returned at ``returned_at`` (churned 60 days before), the
        re-onboarding case opened on it (``opened_after`` the return) and, with
        ``rechurn_after``, the customer's next churn that long after the return."""
        customer = f"cus-{case_id}"
        churned_at = returned_at - 60 * DAY
        self.case(
            f"{case_id}-wb", customer=customer, churned_at=churned_at, returned_after=60 * DAY
        )
        opened_at = returned_at + opened_after
        self.cases.append(
            {
                "id": case_id,
                "customer_id": customer,
                "episode_id": f"ep-{case_id}",
                "status": "closed",
                "purpose": "reonboarding",
                "close_reason": "horizon",
                "playbook": playbook,
                "playbook_version": 1,
                "segment": {"lifecycle": "churned_customer", "reason": "price", "labels": []},
                "episode": {
                    "id": f"ep-{case_id}-wb",
                    "kind": "subscription_cancelled",
                    "occurred_at": churned_at.isoformat(),
                    "reason": "price",
                    "returned_at": returned_at.isoformat(),
                },
                "holdout": holdout,
                "is_rechurn": False,
                "churned_at": churned_at,  # the original churn, as the scheduler sets it
                "opened_at": opened_at,
                "expires_at": opened_at + 180 * DAY,
                "closed_at": opened_at + 180 * DAY,
                "returned_at": None,
            }
        )
        if rechurn_after is not None:
            self.case(f"{case_id}-again", customer=customer, churned_at=returned_at + rechurn_after)
        return case_id

    def step(
        self,
        case_id: str,
        step_key: str,
        *,
        variant: str = "default",
        template: str | None = None,
        channel: str = "email",
        state: str = "sent",
        holdout: bool = False,
        outcome: Sequence[str] = (),
    ) -> None:
        row = next(c for c in self.cases if c["id"] == case_id)
        at = row["churned_at"]
        self.steps.append(
            {
                "case_id": case_id,
                "customer_id": row["customer_id"],
                "step_key": step_key,
                "channel": channel,
                "template": template or step_key,
                "variant": variant,
                "window": "immediate",
                "on_cap": "defer",
                "holdout": holdout,
                "state": state,
                "due_at": at,
                "original_due_at": at,
                "expires_at": at + 30 * DAY,
                "outcome": {name: (at + DAY).isoformat() for name in outcome},
            }
        )

    async def write(self, engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            if self.cases:
                await conn.execute(cases.insert(), self.cases)
            if self.win_backs:
                await conn.execute(win_backs.insert(), self.win_backs)
            if self.steps:
                await conn.execute(case_steps.insert(), self.steps)


@asynccontextmanager
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        "winback reports test",
        checks=[],
        routers=[reports.router()],
        api_keys=[DEV_SECRET],
    )
    deps.install(app, engine, FrozenClock(AS_OF))
    async with (
        serve(app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
    ):
        yield http


async def winback(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await http.get("/v1/reports/winback", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_key(body: dict[str, Any], *names: str) -> dict[Any, dict[str, Any]]:
    found: dict[Any, dict[str, Any]] = {}
    for group in body["groups"]:
        key = tuple(group["key"][n] for n in names)
        found[key[0] if len(key) == 1 else key] = group
    return found


# -- the tests -------------------------------------------------------------------------------------
async def test_lift_of_1000_contacted_against_1000_held_out(engine: AsyncEngine) -> None:
    seed = Seed()
    start = datetime(2026, 3, 1, 9, tzinfo=UTC)
    contacted_days = [(i * 7) % 120 + 1 for i in range(150)]
    holdout_days = [(i * 11) % 150 + 3 for i in range(100)]
    for i in range(1000):
        returned = contacted_days[i] * DAY if i < 150 else None
        seed.case(
            f"c{i}",
            churned_at=start + (i % 28) * DAY,
            returned_after=returned,
            mrr=4900 if i < 100 else (1500 if i < 150 else None),
            currency="EUR" if i < 100 else "USD",
            credited_step="d3_what_you_missed" if i < 140 else None,
        )
    for i in range(1000):
        returned = holdout_days[i] * DAY if i < 100 else None
        seed.case(
            f"h{i}",
            churned_at=start + (i % 28) * DAY,
            holdout=True,
            returned_after=returned,
            mrr=4900 if i < 100 else None,
        )
    await seed.write(engine)

    async with client(engine) as http:
        body = await winback(http)
        unauthorised = await http.get(
            "/v1/reports/winback", headers={"authorization": "Bearer wrong"}
        )

    assert unauthorised.status_code == 401  # a key the service does not know
    assert body["group_by"] == "none"
    assert body["as_of"].startswith("2027-01-01T00:00:00")
    [group] = body["groups"]
    assert group["key"] == {}
    contacted, holdout, lift = group["contacted"], group["holdout"], group["lift"]
    assert (contacted["targeted"], contacted["returned"], contacted["credited"]) == (1000, 150, 140)
    assert (holdout["targeted"], holdout["returned"], holdout["credited"]) == (1000, 100, 0)
    assert contacted["rate"] == pytest.approx(0.15)
    assert holdout["rate"] == pytest.approx(0.10)
    assert contacted["rate_ci"] == {
        "low": pytest.approx(wilson(150, 1000)[0]),
        "high": pytest.approx(wilson(150, 1000)[1]),
    }
    low, high = newcombe(150, 1000, 100, 1000)
    assert lift["absolute"] == pytest.approx(0.05)
    assert lift["ci"] == {"low": pytest.approx(low), "high": pytest.approx(high)}
    assert round(low, 4) == 0.0210
    assert round(high, 4) == 0.0790
    pooled = 250 / 2000
    z = 0.05 / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert lift["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert lift["p_value"] < 0.01
    assert lift["relative"] == pytest.approx(0.5)
    assert lift["incremental_returns"] == pytest.approx(50.0)
    assert lift["incremental_returns_ci"] == {
        "low": pytest.approx(low * 1000),
        "high": pytest.approx(high * 1000),
    }
    assert contacted["mrr_regained"] == [
        {"currency": "EUR", "returns": 100, "mrr_regained_minor": 490_000},
        {"currency": "USD", "returns": 50, "mrr_regained_minor": 75_000},
    ]
    assert holdout["mrr_regained"] == [
        {"currency": "EUR", "returns": 100, "mrr_regained_minor": 490_000}
    ]
    assert contacted["days_to_return"] == {
        "median": pytest.approx(percentile_cont(contacted_days, 0.5)),
        "p90": pytest.approx(percentile_cont(contacted_days, 0.9)),
    }
    assert holdout["days_to_return"] == {
        "median": pytest.approx(percentile_cont(holdout_days, 0.5)),
        "p90": pytest.approx(percentile_cont(holdout_days, 0.9)),
    }
    # the database agrees with the independent percentile (and with itself)
    async with engine.connect() as conn:
        pg_median = await conn.scalar(
            select(func.percentile_cont(0.5).within_group(win_backs.c.days_to_return)).where(
                win_backs.c.holdout.is_(False)
            )
        )
    assert pg_median == pytest.approx(percentile_cont(contacted_days, 0.5))


async def test_rechurn_counts_only_matured_returns(engine: AsyncEngine) -> None:
    seed = Seed()
    churned = datetime(2025, 9, 1, tzinfo=UTC)
    ago = {  # return: (days before AS_OF it came back, time from return to the next churn)
        "a": (400, 60 * DAY),
        "b": (200, 100 * DAY),
        "c": (100, None),
        "d": (30, 10 * DAY),  # re-churned, but too recent to judge at any horizon
        "e": (400, 300 * DAY),
        "f": (400, 90 * DAY),  # exactly 90 days after: a 90-day re-churn
        "g": (400, 90 * DAY + timedelta(hours=1)),  # just past 90 days
        "h": (90, None),  # returned exactly 90 days ago: matured at 90
    }
    for name, (days_ago, next_churn) in ago.items():
        returned_at = AS_OF - days_ago * DAY
        seed.case(name, churned_at=churned, returned_after=returned_at - churned)
        if next_churn is not None:
            seed.case(f"{name}-again", customer=f"cus-{name}", churned_at=returned_at + next_churn)
    # the holdout's return stays in the holdout arm
    seed.case("i", churned_at=churned, holdout=True, returned_after=AS_OF - 400 * DAY - churned)
    # a churn of the same customer before the return is not a re-churn (nor one before the
    # case); another customer's churn is not either
    seed.case("c-before", customer="cus-c", churned_at=datetime(2025, 1, 1, tzinfo=UTC))
    seed.case("c-between", customer="cus-c", churned_at=datetime(2026, 1, 1, tzinfo=UTC))
    seed.case("stranger", churned_at=AS_OF - 95 * DAY)
    await seed.write(engine)

    async with client(engine) as http:
        body = await winback(http, **{"from": "2025-08-01", "to": "2025-09-30"})
        everything = await winback(http)

    [group] = body["groups"]
    assert body["filters"] == {"from": "2025-08-01", "to": "2025-09-30", "playbook": None}
    assert group["contacted"]["targeted"] == 8
    assert group["contacted"]["returned"] == 8
    rechurn = {r["days"]: r for r in group["contacted"]["rechurn"]}
    assert {d: (r["matured"], r["rechurned"]) for d, r in rechurn.items()} == {
        90: (7, 2),  # matured a b c e f g h; re-churned a f
        180: (5, 4),  # matured a b e f g; re-churned a b f g
        365: (4, 4),  # matured a e f g; all re-churned within a year
    }
    assert rechurn[90]["rate"] == pytest.approx(2 / 7)
    assert rechurn[90]["rate_ci"] == {
        "low": pytest.approx(wilson(2, 7)[0]),
        "high": pytest.approx(wilson(2, 7)[1]),
    }
    holdout = {r["days"]: (r["matured"], r["rechurned"]) for r in group["holdout"]["rechurn"]}
    assert holdout == {90: (1, 0), 180: (1, 0), 365: (1, 0)}
    # unfiltered, the later cases and the stranger are targeted too; the re-churn is the same
    [whole] = everything["groups"]
    assert whole["contacted"]["targeted"] == 8 + 6 + 3
    assert whole["contacted"]["rechurn"] == group["contacted"]["rechurn"]


async def test_reonboarding_rechurn_contacted_against_holdout(engine: AsyncEngine) -> None:
    seed = Seed()
    contacted = {  # name: (days before AS_OF it returned, time from return to the next churn)
        "r1": (400, 60 * DAY),
        "r2": (300, 120 * DAY),  # re-churned after 90 days, within 180
        "r3": (200, None),
        "r4": (100, 30 * DAY),  # matured at 90 only
        "r5": (50, 10 * DAY),  # re-churned, but too recent to judge at any horizon
        "r6": (400, 90 * DAY),  # exactly 90 days after: a 90-day re-churn
    }
    holdout = {
        "h1": (400, 30 * DAY),
        "h2": (300, 45 * DAY),
        "h3": (250, 90 * DAY + timedelta(hours=1)),  # just past 90 days
        "h4": (200, 100 * DAY),
        "h5": (120, 20 * DAY),  # matured at 90 only
        "h6": (10, None),  # immature
        "h7": (150, 50 * DAY),  # matured at 90 only
    }
    for arm, rows in ((False, contacted), (True, holdout)):
        for name, (days, rechurn) in rows.items():
            seed.reonboarding(
                name, returned_at=AS_OF - days * DAY, holdout=arm, rechurn_after=rechurn
            )
    # timed by the return, not by when the case was opened: 95 days since the return (matured
    # at 90) though opened 10 days later (85 days before AS_OF); not re-churned
    seed.reonboarding("r7", returned_at=AS_OF - 95 * DAY, opened_after=10 * DAY)
    # another customer's churn soon after r3's return is not r3's re-churn
    seed.case("stranger", churned_at=AS_OF - 180 * DAY)
    # another re-onboarding playbook: counted only unfiltered or in its own group
    seed.reonboarding("o1", returned_at=AS_OF - 200 * DAY, playbook="other_reonboarding")
    await seed.write(engine)

    async with client(engine) as http:
        body = await winback(http, playbook="welcome_back")
        everything = await winback(http)
        per_playbook = await winback(http, group_by="playbook")
        per_reason = await winback(http, group_by="reason")
        by_return = await winback(http, **{"from": "2026-03-01", "to": "2026-06-15"})
        nobody = await winback(http, playbook="nobody")

    [group] = body["reonboarding"]
    assert group["key"] == {}
    c, h = group["contacted"], group["holdout"]
    assert (c["cases"], h["cases"]) == (7, 7)
    counts = {
        arm: {r["days"]: (r["matured"], r["rechurned"]) for r in side["rechurn"]}
        for arm, side in (("contacted", c), ("holdout", h))
    }
    assert counts == {
        # 90: matured r1 r2 r3 r4 r6 r7, re-churned r1 r4 r6; 180: matured r1 r2 r3 r6,
        # re-churned r1 r2 r6 (r5 never matured)
        "contacted": {90: (6, 3), 180: (4, 3)},
        # 90: matured h1 h2 h3 h4 h5 h7, re-churned h1 h2 h5 h7; 180: matured h1 h2 h3 h4, all
        # re-churned (h6 never matured)
        "holdout": {90: (6, 4), 180: (4, 4)},
    }
    c90, h90 = c["rechurn"][0], h["rechurn"][0]
    assert (c90["days"], h90["days"]) == (90, 90)
    assert c90["rate"] == pytest.approx(0.5)
    assert h90["rate"] == pytest.approx(4 / 6)
    assert c90["rate_ci"] == {
        "low": pytest.approx(wilson(3, 6)[0]),
        "high": pytest.approx(wilson(3, 6)[1]),
    }
    assert h["rechurn"][1]["rate_ci"] == {"low": pytest.approx(wilson(4, 4)[0]), "high": 1.0}
    prevented = {p["days"]: p for p in group["prevented"]}
    assert list(prevented) == [90, 180]
    # holdout - contacted: 4/6 - 3/6 = 1/6 fewer re-churns per contacted case, times 6
    low, high = newcombe(4, 6, 3, 6)
    pooled = 7 / 12
    z = (1 / 6) / math.sqrt(pooled * (1 - pooled) * (1 / 6 + 1 / 6))
    assert prevented[90]["difference"] == pytest.approx(1 / 6)
    assert prevented[90]["ci"] == {"low": pytest.approx(low), "high": pytest.approx(high)}
    assert prevented[90]["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert prevented[90]["rechurns_prevented"] == pytest.approx(1.0)
    assert prevented[90]["rechurns_prevented_ci"] == {
        "low": pytest.approx(low * 6),
        "high": pytest.approx(high * 6),
    }
    # 4/4 - 3/4 = 0.25 per case, times the 4 contacted matured cases
    assert prevented[180]["difference"] == pytest.approx(0.25)
    assert prevented[180]["rechurns_prevented"] == pytest.approx(1.0)
    low, high = newcombe(4, 4, 3, 4)
    assert prevented[180]["ci"] == {"low": pytest.approx(low), "high": pytest.approx(high)}
    assert prevented[180]["p_value"] == pytest.approx(
        math.erfc(0.25 / math.sqrt(7 / 8 * 1 / 8 * (2 / 4)) / math.sqrt(2))
    )

    # the win-back report still counts win-back cases only: 16 returned ones (one per
    # re-onboarding case), 10 re-churns and the stranger; no re-onboarding case
    [whole] = everything["groups"]
    assert whole["contacted"]["targeted"] + whole["holdout"]["targeted"] == 16 + 10 + 1
    [unfiltered] = everything["reonboarding"]
    assert (unfiltered["contacted"]["cases"], unfiltered["holdout"]["cases"]) == (8, 7)
    assert [(r["matured"], r["rechurned"]) for r in unfiltered["contacted"]["rechurn"]] == [
        (7, 3),  # + o1, matured at 90 and 180, not re-churned
        (5, 3),
    ]
    assert per_reason["reonboarding"] == everything["reonboarding"]  # only ungrouped
    playbooks = {g["key"]["playbook"]: g for g in per_playbook["reonboarding"]}
    assert list(playbooks) == ["other_reonboarding", "welcome_back"]
    assert playbooks["welcome_back"]["contacted"] == c
    assert playbooks["welcome_back"]["prevented"] == group["prevented"]
    other = playbooks["other_reonboarding"]
    assert (other["contacted"]["cases"], other["holdout"]["cases"]) == (1, 0)
    assert other["prevented"][0] == {
        "days": 90,
        "difference": None,
        "ci": None,
        "p_value": None,
        "rechurns_prevented": None,
        "rechurns_prevented_ci": None,
    }
    # from/to select re-onboarding cases by return date: r2 (7 March), r3 and o1 (15 June),
    # h2, h3 (26 April), h4; by churn date (60 days earlier) it would be r3, o1, h4 and h7
    [dated] = by_return["reonboarding"]
    assert (dated["contacted"]["cases"], dated["holdout"]["cases"]) == (3, 3)
    [empty] = nobody["reonboarding"]
    assert (empty["contacted"]["cases"], empty["holdout"]["cases"]) == (0, 0)
    assert [(r["days"], r["matured"], r["rate"]) for r in empty["contacted"]["rechurn"]] == [
        (90, 0, None),
        (180, 0, None),
    ]
    assert empty["prevented"][1]["difference"] is None


async def test_group_by_splits_and_filters_select(engine: AsyncEngine) -> None:
    seed = Seed()
    t = datetime(2026, 5, 10, tzinfo=UTC)
    # price_discount: 4 contacted (2 returned), 2 held out (1 returned)
    seed.case("p1", churned_at=t, labels=["high_value"], value_tier="high", returned_after=DAY)
    seed.case("p2", churned_at=t, labels=["high_value", "feature_gap"], returned_after=2 * DAY)
    seed.case("p3", churned_at=t)
    seed.case("p4", churned_at=t + 40 * DAY)
    seed.case("p5", churned_at=t, holdout=True, returned_after=3 * DAY, labels=["high_value"])
    seed.case("p6", churned_at=t, holdout=True)
    # competitor_comparison: 2 contacted (1 returned), no holdout
    for name, returned in (("k1", 5 * DAY), ("k2", None)):
        seed.case(
            name,
            churned_at=t,
            playbook="competitor_comparison",
            reason="competitor",
            returned_after=returned,
        )
    # variants of the first step (holdout cases are assigned variants too)
    for case_id, variant in (("p1", "a"), ("p2", "b"), ("p3", "a"), ("p4", "b")):
        seed.step(case_id, "d0_we_miss_you", variant=variant)
    seed.step("p5", "d0_we_miss_you", variant="a", holdout=True, state="skipped")
    seed.step("p6", "d0_we_miss_you", variant="b", holdout=True, state="skipped")
    await seed.write(engine)

    async with client(engine) as http:
        per_playbook = await winback(http, group_by="playbook")
        per_reason = await winback(http, group_by="reason")
        per_label = await winback(http, group_by="label")
        per_tier = await winback(http, group_by="value_tier")
        per_variant = await winback(http, group_by="variant")
        one_playbook = await winback(http, playbook="competitor_comparison")
        june = await winback(http, **{"from": "2026-06-01", "to": "2026-06-30"})
        day = await winback(http, **{"from": "2026-05-10", "to": "2026-05-10"})
        nothing = await winback(http, playbook="nobody")

    playbooks = by_key(per_playbook, "playbook")
    assert list(playbooks) == ["competitor_comparison", "price_discount"]
    price = playbooks["price_discount"]
    assert (price["contacted"]["targeted"], price["contacted"]["returned"]) == (4, 2)
    assert (price["holdout"]["targeted"], price["holdout"]["returned"]) == (2, 1)
    assert price["lift"]["absolute"] == pytest.approx(0.0)
    assert price["lift"]["ci"]["low"] < 0 < price["lift"]["ci"]["high"]
    assert price["lift"]["p_value"] == pytest.approx(1.0)
    competitor = playbooks["competitor_comparison"]
    assert (competitor["contacted"]["targeted"], competitor["contacted"]["returned"]) == (2, 1)
    assert competitor["holdout"]["targeted"] == 0
    assert competitor["holdout"]["rate"] is None
    assert competitor["lift"] == {
        "absolute": None,
        "ci": None,
        "p_value": None,
        "relative": None,
        "incremental_returns": None,
        "incremental_returns_ci": None,
    }

    reasons = by_key(per_reason, "reason")
    assert {
        k: (g["contacted"]["targeted"], g["holdout"]["targeted"]) for k, g in reasons.items()
    } == {
        "competitor": (2, 0),
        "price": (4, 2),
    }

    labels = by_key(per_label, "label")
    assert {
        k: (g["contacted"]["targeted"], g["contacted"]["returned"], g["holdout"]["targeted"])
        for k, g in labels.items()
    } == {
        "feature_gap": (1, 1, 0),
        "high_value": (2, 2, 1),
        None: (4, 1, 1),  # p3, p4, k1 (returned), k2 contacted; p6 held out
    }
    assert list(labels) == ["feature_gap", "high_value", None]

    tiers = by_key(per_tier, "value_tier")
    assert {k: g["contacted"]["targeted"] for k, g in tiers.items()} == {"high": 1, "medium": 5}

    variants = by_key(per_variant, "playbook", "step_key", "variant")
    a = variants[("price_discount", "d0_we_miss_you", "a")]
    b = variants[("price_discount", "d0_we_miss_you", "b")]
    assert len(variants) == 2
    assert (a["contacted"]["targeted"], a["contacted"]["returned"]) == (2, 1)  # p1 p3
    assert (a["holdout"]["targeted"], a["holdout"]["returned"]) == (1, 1)  # p5
    assert (b["contacted"]["targeted"], b["contacted"]["returned"]) == (2, 1)  # p2 p4
    assert (b["holdout"]["targeted"], b["holdout"]["returned"]) == (1, 0)  # p6
    assert b["lift"]["absolute"] == pytest.approx(0.5)

    [only] = one_playbook["groups"]
    assert only["contacted"]["targeted"] == 2
    [later] = june["groups"]
    assert later["contacted"]["targeted"] == 1  # p4, churned 19 June
    [same_day] = day["groups"]
    assert same_day["contacted"]["targeted"] + same_day["holdout"]["targeted"] == 7
    [empty] = nothing["groups"]
    assert empty["contacted"]["targeted"] == 0
    assert empty["contacted"]["rate"] is None
    assert empty["contacted"]["days_to_return"] == {"median": None, "p90": None}
    assert [(r["days"], r["matured"], r["rate"]) for r in empty["contacted"]["rechurn"]] == [
        (90, 0, None),
        (180, 0, None),
        (365, 0, None),
    ]


async def test_message_engagement_per_step_template_variant_and_channel(
    engine: AsyncEngine,
) -> None:
    seed = Seed()
    t = datetime(2026, 5, 10, tzinfo=UTC)
    for i in range(10):
        seed.case(f"m{i}", churned_at=t)
    seed.case("old", churned_at=datetime(2025, 1, 1, tzinfo=UTC))
    seed.case("other", churned_at=t, playbook="competitor_comparison")
    seed.case("held", churned_at=t, holdout=True)
    # variant a of d0: 4 sent; 3 delivered, 2 opened, 1 clicked, 1 bounced, 1 complained
    seed.step("m0", "d0", variant="a", outcome=["sent", "delivered", "opened", "clicked"])
    seed.step("m1", "d0", variant="a", outcome=["sent", "delivered", "opened", "complained"])
    seed.step("m2", "d0", variant="a", outcome=["sent", "delivered"])
    seed.step("m3", "d0", variant="a", outcome=["sent", "bounced"])
    seed.step("m4", "d0", variant="a", state="failed", outcome=["failed"])
    seed.step("m5", "d0", variant="a", state="pending")  # not fired: not counted
    # variant b of d0: an open with no delivery report proves delivery; one unsubscribed
    seed.step("m6", "d0", variant="b", outcome=["sent", "opened", "unsubscribed"])
    seed.step("m7", "d0", variant="b", state="suppressed")
    seed.step("m8", "d0", variant="b", state="dispatched")
    # an SMS step without delivery reports: rates over sent
    seed.step("m0", "d3_sms", channel="sms", template="sms_nudge", outcome=["sent"])
    seed.step("m1", "d3_sms", channel="sms", template="sms_nudge", outcome=["sent"])
    # filtered out: another playbook, an old churn, the holdout (never sent)
    seed.step("other", "d0", variant="a", outcome=["sent", "delivered", "opened"])
    seed.step("old", "d0", variant="a", outcome=["sent", "delivered", "opened"])
    seed.step("held", "d0", variant="a", holdout=True, state="skipped")
    await seed.write(engine)

    async with client(engine) as http:
        response = await http.get(
            "/v1/reports/messages",
            params={"playbook": "price_discount", "from": "2026-01-01", "to": "2026-12-31"},
        )
        unfiltered = await http.get("/v1/reports/messages")
    assert response.status_code == 200, response.text
    items = {
        (i["key"]["step_key"], i["key"]["variant"], i["key"]["channel"], i["key"]["template"]): i
        for i in response.json()["items"]
    }
    assert set(items) == {
        ("d0", "a", "email", "d0"),
        ("d0", "b", "email", "d0"),
        ("d3_sms", "default", "sms", "sms_nudge"),
    }
    a = items[("d0", "a", "email", "d0")]
    counts = {
        name: a[name]
        for name in (
            "dispatched",
            "sent",
            "delivered",
            "opened",
            "clicked",
            "bounced",
            "complained",
            "unsubscribed",
            "failed",
            "suppressed",
        )
    }
    assert counts == {
        "dispatched": 5,
        "sent": 4,
        "delivered": 3,
        "opened": 2,
        "clicked": 1,
        "bounced": 1,
        "complained": 1,
        "unsubscribed": 0,
        "failed": 1,
        "suppressed": 0,
    }
    assert a["rate_base"] == "delivered"
    assert a["open_rate"] == pytest.approx(2 / 3)
    assert a["click_rate"] == pytest.approx(1 / 3)
    assert a["bounce_rate"] == pytest.approx(1 / 4)
    assert a["open_rate_ci"] == {
        "low": pytest.approx(wilson(2, 3)[0]),
        "high": pytest.approx(wilson(2, 3)[1]),
    }
    b = items[("d0", "b", "email", "d0")]
    assert (b["dispatched"], b["sent"], b["delivered"], b["opened"], b["suppressed"]) == (
        3,
        1,
        1,
        1,
        1,
    )
    assert b["unsubscribe_rate"] == pytest.approx(1.0)
    sms = items[("d3_sms", "default", "sms", "sms_nudge")]
    assert (sms["sent"], sms["delivered"], sms["rate_base"], sms["open_rate"]) == (2, 0, "sent", 0)
    everything = {
        (i["key"]["playbook"], i["key"]["step_key"], i["key"]["variant"]): i
        for i in unfiltered.json()["items"]
    }
    assert sum(i["dispatched"] for i in everything.values()) == 5 + 3 + 2 + 2  # + other, old
    assert everything[("price_discount", "d0", "a")]["opened"] == 3  # + old
    assert everything[("competitor_comparison", "d0", "a")]["opened"] == 1


async def test_bad_parameters_are_named_in_problem_json(engine: AsyncEngine) -> None:
    async with client(engine) as http:
        answers = {
            "group_by": await http.get("/v1/reports/winback", params={"group_by": "nonsense"}),
            "from": await http.get("/v1/reports/winback", params={"from": "yesterday"}),
            "to": await http.get(
                "/v1/reports/winback", params={"from": "2026-02-01", "to": "2026-01-01"}
            ),
            "playbook": await http.get("/v1/reports/messages", params={"playbook": ""}),
        }
        messages_to = await http.get("/v1/reports/messages", params={"to": "2026-13-01"})
        missing_token = await http.get("/v1/reports/messages", headers={"authorization": ""})
    for field, response in {**answers, "messages to": messages_to}.items():
        assert response.status_code == 422, field
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"].endswith(field.split()[-1]), field
    assert "group_by" in answers["group_by"].json()["detail"]
    assert missing_token.status_code == 401
