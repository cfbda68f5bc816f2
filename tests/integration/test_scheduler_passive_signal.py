"""An external ``user.inactive`` signal (``churn.recorded`` of kind ``user_inactive``) opens a
passive-user case when its usage drop reaches ``scheduler.usage_drop_percent`` or its days
reach the plan's inactivity period; one below both leaves it to winback's own inactivity
timer; one with neither figure is the detector's judgement. The handler on real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.domain.segmentation import InactivityRule
from services.scheduler.handler import SchedulerHandler
from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.db.tables import cases
from shared.messaging.pipeline import Pipeline
from tests.integration.test_scheduler_batch import (
    OUTCOMES,
    PLAYBOOKS,
    T0,
    churn,
    empty,
    incoming,
)

pytestmark = pytest.mark.integration
RULE = InactivityRule(
    period=timedelta(days=30), by_plan={"enterprise": timedelta(days=14)}, usage_drop_percent=60
)


def inactive(cid: str, plan: str = "pro", **figures: Any) -> CloudEvent:
    event = churn(cid, f"{cid}-e1", T0, plan=plan)
    assert event.data is not None
    event.data["episode"].update(kind="user_inactive", reason="unused", **figures)
    return event


async def test_a_usage_drop_or_enough_days_opens_a_passive_case_a_mild_signal_does_not(
    engine: AsyncEngine,
) -> None:
    await empty(engine)
    clock = FrozenClock(T0)
    pipe = Pipeline(
        engine,
        "scheduler",
        SchedulerHandler(PLAYBOOKS, OUTCOMES, inactivity=RULE),
        clock,
        "test.dlq",
        "/winback/scheduler",
    )
    events = [
        inactive("drop", usage_drop_percent=85.0, days_inactive=3),
        inactive("mild", usage_drop_percent=20.0, days_inactive=10),
        inactive("long", days_inactive=31),
        inactive("plan", plan="enterprise", days_inactive=14),
        inactive("bare"),
    ]
    result = await pipe.transact(incoming(pipe, events))
    async with engine.connect() as conn:
        rows = {r.customer_id: r for r in await conn.execute(cases.select())}
    assert result.handled == len(events)
    assert sorted(rows) == ["bare", "drop", "long", "plan"]
    assert {r.playbook for r in rows.values()} == {"passive_user"}
    assert {r.segment["lifecycle"] for r in rows.values()} == {"passive_user"}
