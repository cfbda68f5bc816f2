"""RFC 8058 one-click unsubscribe over real HTTP, through to the event on the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import DispatcherService
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.integration.test_dispatcher_support import (
    T0,
    command,
    delivery_rows,
    dispatcher_config,
    emitted,
    seed,
    service,
    started,
    suppression_rows,
    with_dispatcher,
)
from tests.support.http import serve
from tests.support.kafka import event_of, read_all

pytestmark = pytest.mark.integration


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviderServer]:
    async with FakeProviderServer() as server:
        yield server


@pytest.fixture
def configured(settings: Settings, fake: FakeProviderServer, tmp_path: Path) -> Settings:
    return with_dispatcher(settings, dispatcher_config(fake, tmp_path))


async def link_in_a_sent_email(
    svc: DispatcherService, engine: AsyncEngine, fake: FakeProviderServer, customer: str
) -> str:
    case = await seed(engine, customer)
    items = [svc.pipeline.decode_payload(from_json_dict(command(customer, case)), None, None)]
    await svc.pipeline.transact_reliably(items)
    await svc.sender.drain()
    header: str = fake.requests_for("sendgrid")[-1].json["headers"]["List-Unsubscribe"]
    return header[1 : header.index(">")]


async def test_one_click_unsubscribe_suppresses_at_once_and_tells_the_scheduler(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    async with started(svc), serve(svc.app, lifespan="off") as base:
        url = await link_in_a_sent_email(svc, engine, fake, "cus_unsub")
        path = url.removeprefix("https://winback.example.com")
        async with httpx.AsyncClient(base_url=base, follow_redirects=False) as http:
            first = await http.post(
                path,
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            second = await http.post(path, content=b"List-Unsubscribe=One-Click")
        records = await read_all(
            configured.kafka.bootstrap_servers,
            configured.topics.outcomes,
            expect=2,
            timeout=15,
        )
        # the next step for this customer is stopped before any provider sees it
        case = (await delivery_rows(engine))[0].case_id
        items = [
            svc.pipeline.decode_payload(
                from_json_dict(
                    command("cus_unsub", case, "d3_what_you_missed", template="what_you_missed")
                ),
                None,
                None,
            )
        ]
        await svc.pipeline.transact_reliably(items)
        await svc.sender.drain()
    assert first.status_code == 200
    assert second.status_code == 200
    assert "location" not in first.headers
    assert first.json() == {"unsubscribed": True, "channel": "email"}
    unsubscribed = [
        event_of(r) for r in records if event_of(r)["type"] == model.CUSTOMER_UNSUBSCRIBED
    ]
    assert len(unsubscribed) == 1  # the second click had no second effect
    assert unsubscribed[0]["data"]["customer_id"] == "cus_unsub"
    assert unsubscribed[0]["data"]["channel"] == "email"
    hashes = {r.address_hash: r.reason for r in await suppression_rows(engine)}
    assert hashes == {
        model.customer_key_hash("email", "cus_unsub"): "unsubscribed",
        model.address_hash("email", "cus_unsub@example.com"): "unsubscribed",
    }
    assert len(fake.requests_for("sendgrid")) == 1
    (stopped,) = await emitted(engine, configured.topics.outcomes, model.MESSAGE_SUPPRESSED)
    assert stopped["data"]["reason"] == "suppressed: unsubscribed"


async def test_the_visible_link_shows_a_confirmation_page_and_unsubscribes(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    try:
        url = await link_in_a_sent_email(svc, engine, fake, "cus_page")
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get(url.removeprefix("https://winback.example.com"))
    finally:
        await svc.aclose()
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "You are unsubscribed" in page.text
    assert "Acme Analytics" in page.text
    assert len(await suppression_rows(engine)) == 2
    (event,) = await emitted(engine, configured.topics.outcomes, model.CUSTOMER_UNSUBSCRIBED)
    assert event["data"]["method"] == "page"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # altered signature
        lambda t: "1.Y3VzX290aGVyCmVtYWlsCjE3NzgwMDAwMDA.c2lnbmF0dXJlLW9mLW15LW93bg",  # forged
        lambda t: "not-a-token-at-all",
    ],
    ids=["altered", "forged", "garbage"],
)
async def test_a_forged_token_is_refused_and_suppresses_nothing(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer, mangle: object
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    try:
        token = svc.tokens.issue("cus_victim", "email")
        assert callable(mangle)
        bad = mangle(token)
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            post = await http.post(f"/u/{bad}", content=b"List-Unsubscribe=One-Click")
            get = await http.get(f"/u/{bad}")
    finally:
        await svc.aclose()
    for response in (post, get):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    assert await suppression_rows(engine) == []
    assert await emitted(engine, configured.topics.outcomes) == []
