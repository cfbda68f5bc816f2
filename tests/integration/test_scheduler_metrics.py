"""The scheduler's KPI gauges, refreshed from real rows: re-onboarding cases (customers who
already came back) are neither targets of the reactivation rate nor re-churns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import metrics
from tests.integration.test_scheduler_reports import Seed

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


async def test_reactivation_and_second_churn_count_win_back_cases_only(
    engine: AsyncEngine,
) -> None:
    seed = Seed()
    for i in range(10):  # contacted: 2 of 10 return (credited)
        seed.case(
            f"c{i}",
            churned_at=T0,
            returned_after=20 * DAY if i < 2 else None,
            credited_step="d0" if i < 2 else None,
        )
    for i in range(4):  # holdout: 1 of 4 returns
        seed.case(f"h{i}", churned_at=T0, holdout=True, returned_after=30 * DAY if i < 1 else None)
    # two more win-backs, each followed by a re-onboarding case; one of them churns again
    seed.reonboarding("r0", returned_at=T0 + 40 * DAY)
    seed.reonboarding("r1", returned_at=T0 + 40 * DAY, rechurn_after=50 * DAY)
    for row in seed.win_backs:  # the two re-onboarded customers' returns were credited too
        if row["case_id"] in ("r0-wb", "r1-wb"):
            row.update(step_key="d0", channel="email", template="d0", variant="default")
    await seed.write(engine)

    await metrics.refresh(engine, T0 + 200 * DAY)

    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    # win-back cases: contacted 10 + r0-wb + r1-wb + r1-again = 13, of which 4 returned; the
    # two re-onboarding cases are not targets
    assert gauge("winback_reactivation_rate", group="contacted") == pytest.approx(4 / 13)
    assert gauge("winback_reactivation_rate", group="holdout") == pytest.approx(1 / 4)
    # and the counts behind them (the KPI alert compares a window's rates)
    assert gauge("winback_reactivation_targeted_cases", group="contacted") == 13
    assert gauge("winback_reactivation_returned_cases", group="contacted") == 4
    assert gauge("winback_reactivation_targeted_cases", group="holdout") == 4
    assert gauge("winback_reactivation_returned_cases", group="holdout") == 1
    # credited win-backs c0, c1, r0-wb, r1-wb; r1 churned again after returning
    assert gauge("winback_second_churn_rate") == pytest.approx(1 / 4)
