"""A realistic stream for `winback run --demo`, on an accelerated clock.

Cancellations with each churn reason and value tier, an expired trial, inactivity, a lost
lead, then (in simulated days) a feature release, a reactivation and an opt-out. The events
go to the first inbound topic exactly as a billing system would send them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from shared.clock import AcceleratedClock
from shared.cloudevents import CloudEvent
from shared.messaging.transport import OutgoingRecord, Transport

log = logging.getLogger(__name__)

PEOPLE: list[dict[str, Any]] = [
    {
        "id": "demo-aino",
        "name": "Aino",
        "locale": "fi-FI",
        "timezone": "Europe/Helsinki",
        "mrr": 49_900,
        "engagement": "high",
        "reason": "too_expensive",
        "crm": "owner-anna",
    },
    {
        "id": "demo-mads",
        "name": "Mads",
        "locale": "da-DK",
        "timezone": "Europe/Copenhagen",
        "mrr": 2_900,
        "engagement": "medium",
        "reason": "missing_features",
        "feature": "SSO",
    },
    {
        "id": "demo-siti",
        "name": "Siti",
        "locale": "ms-MY",
        "timezone": "Asia/Kuala_Lumpur",
        "mrr": 9_900,
        "engagement": "high",
        "reason": "switched_service",
        "competitor": "Rival",
    },
    {
        "id": "demo-john",
        "name": "John",
        "locale": "en-US",
        "timezone": "America/New_York",
        "mrr": 19_900,
        "engagement": "high",
        "reason": "Budget cut this year",
    },
    {
        "id": "demo-emma",
        "name": "Emma",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "mrr": 4_900,
        "engagement": "medium",
        "reason": "customer_service",
    },
    {
        "id": "demo-liisa",
        "name": "Liisa",
        "locale": "fi",
        "timezone": "Europe/Helsinki",
        "mrr": 1_900,
        "engagement": "low",
        "reason": "unused",
    },
    {
        "id": "demo-omar",
        "name": "Omar",
        "locale": "en",
        "timezone": "Asia/Dubai",
        "mrr": 9_900,
        "engagement": "high",
        "reason": "Project ended",
    },
]


@dataclass
class DemoFeeder:
    transport: Transport
    topic: str
    clock: AcceleratedClock
    prefix: str = "com.example"

    def _event(self, type_: str, data: dict[str, Any], days_ago: float = 0) -> OutgoingRecord:
        event = CloudEvent(
            id=str(uuid.uuid4()),
            source="/demo/billing",
            type=f"{self.prefix}.{type_}",
            time=self.clock.now() - timedelta(days=days_ago),
            data=data,
        )
        value, headers = event.to_structured()
        key = str(data.get("customer_id") or data.get("feature") or "demo").encode()
        return OutgoingRecord(self.topic, key, value, tuple(headers))

    async def _sleep_sim(self, delta: timedelta) -> None:
        await asyncio.sleep(delta.total_seconds() / self.clock.factor)

    async def run(self) -> None:
        publisher = self.transport.publisher()
        await publisher.start()
        try:
            first = []
            for p in PEOPLE:
                first.append(
                    self._event(
                        "subscription.cancelled",
                        {
                            "customer_id": p["id"],
                            "reason": p["reason"],
                            "feature": p.get("feature"),
                            "competitor": p.get("competitor"),
                            "customer": {
                                "email": f"{p['id']}@example.com",
                                "name": p["name"],
                                "locale": p["locale"],
                                "timezone": p["timezone"],
                                "mrr_minor": p["mrr"],
                                "currency": "EUR",
                                "engagement": p["engagement"],
                                "crm_owner": p.get("crm"),
                                "customer_since": "2024-02-01T00:00:00Z",
                            },
                        },
                    )
                )
            first.append(
                self._event(
                    "trial.expired",
                    {
                        "customer_id": "demo-trial",
                        "customer": {
                            "email": "demo-trial@example.com",
                            "name": "Tia",
                            "locale": "en",
                            "timezone": "Europe/Berlin",
                        },
                    },
                )
            )
            first.append(
                self._event(
                    "user.inactive",
                    {
                        "customer_id": "demo-quiet",
                        "days_inactive": 30,
                        "customer": {
                            "email": "demo-quiet@example.com",
                            "name": "Quinn",
                            "locale": "en",
                            "timezone": "America/Chicago",
                            "engagement": "medium",
                            "mrr_minor": 2_900,
                            "currency": "USD",
                        },
                    },
                )
            )
            first.append(
                self._event(
                    "lead.lost",
                    {
                        "customer_id": "demo-lead",
                        "reason": "chose a competitor",
                        "competitor": "Rival",
                        "customer": {
                            "email": "demo-lead@example.com",
                            "name": "Lee",
                            "locale": "en",
                            "timezone": "Australia/Sydney",
                        },
                    },
                )
            )
            # a churn recorded late: it starts in the window that matches, no burst
            first.append(
                self._event(
                    "subscription.cancelled",
                    {
                        "customer_id": "demo-late",
                        "reason": "too_expensive",
                        "customer": {
                            "email": "demo-late@example.com",
                            "name": "Lauri",
                            "locale": "fi",
                            "timezone": "Europe/Helsinki",
                            "engagement": "high",
                            "mrr_minor": 9_900,
                            "currency": "EUR",
                        },
                    },
                    days_ago=40,
                )
            )
            await publisher.publish(first)
            log.info("demo: %d lifecycle events sent", len(first))
            await self._sleep_sim(timedelta(days=3))
            await publisher.publish(
                [
                    self._event(
                        "feature.released",
                        {
                            "feature": "sso",
                            "name": "Single sign-on (SSO)",
                            "description": "Log in with your company's identity provider.",
                        },
                    )
                ]
            )
            log.info("demo: feature.released sso")
            await self._sleep_sim(timedelta(days=2))
            await publisher.publish(
                [
                    self._event(
                        "subscription.reactivated",
                        {
                            "customer_id": "demo-aino",
                            "plan": "pro",
                            "mrr_minor": 39_900,
                            "currency": "EUR",
                        },
                    )
                ]
            )
            log.info("demo: demo-aino came back")
            await self._sleep_sim(timedelta(days=1))
            await publisher.publish(
                [self._event("consent.withdrawn", {"customer_id": "demo-siti", "channel": "all"})]
            )
            log.info("demo: demo-siti opted out")
            await self._sleep_sim(timedelta(days=2))
            await publisher.publish([self._event("user.active", {"customer_id": "demo-quiet"})])
            log.info("demo: demo-quiet is active again")
        finally:
            await publisher.stop()
