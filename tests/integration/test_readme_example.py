"""The README's own example, end to end: its exact event (customer ``c1``, no name) posted to
ingest over HTTP, with ingest, scheduler and dispatcher running on the real broker and
PostgreSQL, ends in a sent day-0 email greeted without a name."""

from __future__ import annotations

import email
import email.policy
import re
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.db.tables import case_steps, deliveries
from shared.settings import DEV_SECRET, Settings
from tests.support.dispatcher import with_dispatcher
from tests.support.http import serve
from tests.support.kafka import event_of, read_all
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> tuple[str, dict[str, Any]]:
    """The ``curl … -d '…'`` body under "Post your own events", byte for byte."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("Post your own events") :]
    found = re.search(r"curl -s -XPOST localhost:8081/v1/events .*?-d '(\{.*?\})'\n", section, re.S)
    assert found, "the README's example event is gone"
    body = found.group(1)
    return body, orjson.loads(body)


async def test_the_readme_example_event_gets_its_day_0_email_sent(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    body, event = readme_example()
    customer = event["data"]["customer"]
    assert event["data"]["customer_id"] == "c1"
    assert "name" not in customer  # the point: a customer without a name
    assert customer["timezone"] == "Europe/Helsinki"
    # a few seconds after the cancellation: 12:00 in Helsinki, inside the 09:00-20:00 window
    churned = datetime.fromisoformat(event["time"])
    clock = FrozenClock(churned.replace(second=5))
    assert datetime(2026, 11, 20, 10, 0, 5, tzinfo=UTC) == clock.now()
    folder = tmp_path / "messages"
    configured = with_dispatcher(
        settings,
        {
            # what `winback run` uses: the file provider
            "email": {"primary": {"kind": "file", "directory": str(folder)}},
            "public_base_url": "https://winback.example.com",
            "poll_seconds": 0.02,
        },
    )
    ingest = ingest_bootstrap(configured, engine=engine, clock=clock)
    scheduler = scheduler_bootstrap(configured, engine=engine, clock=clock)
    dispatcher = dispatcher_bootstrap(configured, engine=engine, clock=clock)

    async def day_0() -> list[Any]:
        async with engine.connect() as conn:
            return list(
                await conn.execute(deliveries.select().where(deliveries.c.customer_id == "c1"))
            )

    async with AsyncExitStack() as stack:
        for service in (ingest, scheduler, dispatcher):
            await stack.enter_async_context(running(service.core.runtime))
        base = await stack.enter_async_context(serve(ingest.app, lifespan="off"))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base))
        headers = {
            "authorization": f"Bearer {DEV_SECRET}",
            "content-type": "application/cloudevents+json",
        }
        first = await http.post("/v1/events", content=body, headers=headers)
        again = await http.post("/v1/events", content=body, headers=headers)
        rows = await eventually(
            day_0, lambda rows: bool(rows) and rows[0].state not in ("queued", "sending"), 60
        )
        records = await read_all(
            configured.kafka.bootstrap_servers, configured.topics.outcomes, expect=1, timeout=30
        )

        async def steps() -> list[Any]:
            async with engine.connect() as conn:
                return list(
                    await conn.execute(
                        select(case_steps.c.step_key, case_steps.c.state)
                        .where(case_steps.c.customer_id == "c1")
                        .order_by(case_steps.c.due_at)
                    )
                )

        planned = await eventually(steps, lambda s: bool(s) and s[0].state == "sent", 30)

    assert (first.status_code, first.json()) == (202, {"accepted": 1, "duplicates": 0})
    assert (again.status_code, again.json()) == (202, {"accepted": 0, "duplicates": 1})
    (row,) = rows
    assert (row.state, row.error) == ("sent", None)
    assert row.provider == "file"
    assert planned[0].state == "sent"  # the scheduler recorded the day-0 step as sent
    assert planned[0].step_key == row.step_key
    sent = [event_of(r) for r in records if event_of(r)["type"] == de.MESSAGE_SENT]
    assert [e["data"]["customer_id"] for e in sent] == ["c1"]
    (path,) = (folder / "email").glob("*.eml")
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "a@example.com"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None
    assert html is not None
    lines = text.get_content().splitlines()
    assert lines[:2] == ["Hi there,", ""]  # the name-less greeting, a paragraph of its own
    assert "<p>Hi there,</p>" in html.get_content()
    assert "None" not in text.get_content()
