"""The scheduler's metrics: step outcomes, case gauges, overdue lag and the win-back KPIs."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter, Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

STEPS_FIRED = Counter(
    "winback_steps_fired_total",
    "Due steps decided by the timer, by outcome (dispatched, deferred, skipped)",
    ["outcome"],
)
CASES = Gauge(
    "winback_cases",
    "Cases by status, playbook and lifecycle segment",
    ["status", "playbook", "lifecycle"],
)
STEPS_DUE = Gauge("winback_steps_due", "Pending steps whose due time has passed")
STEPS_PENDING = Gauge("winback_steps_pending", "Pending steps in all")
OVERDUE_SECONDS = Gauge(
    "winback_steps_overdue_seconds", "Now minus the due time of the oldest due pending step"
)
REACTIVATION_RATE = Gauge(
    "winback_reactivation_rate",
    "Returned ÷ targeted over win-back cases, closed and open (holdout = cases that got no "
    "message); re-onboarding cases are not targets",
    ["group"],
)
# the counts behind the rate, so an alert can compare a window's rates (delta over the window)
# and ask for enough cases in each group before it does
REACTIVATION_TARGETED = Gauge(
    "winback_reactivation_targeted_cases",
    "Win-back cases (closed and open) by group: contacted, or holdout (got no message)",
    ["group"],
)
REACTIVATION_RETURNED = Gauge(
    "winback_reactivation_returned_cases",
    "Win-back cases whose customer returned (a win_backs row), by group as above",
    ["group"],
)
WINBACK_MRR = Gauge(
    "winback_won_back_mrr_minor", "MRR regained by credited win-backs", ["currency"]
)
TIME_TO_WINBACK = Gauge(
    "winback_time_to_winback_days", "Mean days from churn to return of credited win-backs"
)
SECOND_CHURN_RATE = Gauge(
    "winback_second_churn_rate", "Won-back customers who churned again ÷ won-back customers"
)
WINBACKS = Gauge("winback_won_back_customers", "Credited win-backs", ["channel"])


async def refresh(engine: AsyncEngine, now: datetime) -> None:
    async with engine.connect() as conn:
        CASES.clear()
        for r in await conn.execute(
            text(
                "SELECT status, playbook, segment->>'lifecycle' AS lifecycle, count(*) AS n "
                "FROM cases GROUP BY 1, 2, 3"
            )
        ):
            CASES.labels(r.status, r.playbook, r.lifecycle or "unknown").set(r.n)
        due = (
            await conn.execute(
                text(
                    "SELECT count(*) AS n, min(due_at) AS oldest FROM case_steps "
                    "WHERE state = 'pending' AND due_at <= :now"
                ),
                {"now": now},
            )
        ).one()
        STEPS_DUE.set(due.n)
        OVERDUE_SECONDS.set(max(0.0, (now - due.oldest).total_seconds()) if due.oldest else 0.0)
        STEPS_PENDING.set(
            await conn.scalar(text("SELECT count(*) FROM case_steps WHERE state = 'pending'")) or 0
        )
        for r in await conn.execute(
            text(
                "SELECT c.holdout, count(*) AS targeted, count(w.case_id) AS returned "
                "FROM cases c LEFT JOIN win_backs w ON w.case_id = c.id "
                "WHERE c.purpose = 'winback' GROUP BY c.holdout"
            )
        ):
            group = "holdout" if r.holdout else "contacted"
            REACTIVATION_RATE.labels(group).set(r.returned / r.targeted if r.targeted else 0.0)
            REACTIVATION_TARGETED.labels(group).set(r.targeted)
            REACTIVATION_RETURNED.labels(group).set(r.returned)
        WINBACK_MRR.clear()
        for r in await conn.execute(
            text(
                "SELECT coalesce(currency, 'unknown') AS currency, "
                "coalesce(sum(mrr_regained_minor), 0) AS mrr FROM win_backs "
                "WHERE step_key IS NOT NULL GROUP BY 1"
            )
        ):
            WINBACK_MRR.labels(r.currency).set(r.mrr)
        WINBACKS.clear()
        for r in await conn.execute(
            text(
                "SELECT channel, count(*) AS n FROM win_backs WHERE step_key IS NOT NULL "
                "GROUP BY channel"
            )
        ):
            WINBACKS.labels(r.channel).set(r.n)
        mean = await conn.scalar(
            text("SELECT avg(days_to_return) FROM win_backs WHERE step_key IS NOT NULL")
        )
        TIME_TO_WINBACK.set(float(mean or 0.0))
        churn = (
            await conn.execute(
                text(
                    "SELECT count(*) AS won, count(*) FILTER (WHERE EXISTS (SELECT 1 "
                    "FROM cases c2 WHERE c2.customer_id = w.customer_id "
                    "AND c2.purpose = 'winback' AND c2.churned_at > w.returned_at)) AS again "
                    "FROM win_backs w WHERE w.step_key IS NOT NULL"
                )
            )
        ).one()
        SECOND_CHURN_RATE.set(churn.again / churn.won if churn.won else 0.0)
