"""Unsubscribe over real HTTP with the real database: the RFC 8058 one-click POST and the
page's confirming POST unsubscribe (through to the event on the real broker); a GET of the
link — what a link scanner does — only shows the page; a forged token is refused."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from markupsafe import escape
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import DispatcherService
from shared.clock import FrozenClock
from shared.cloudevents import from_json_dict
from shared.db.tables import scheduler_customers
from shared.settings import Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import (
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


class _Form(HTMLParser):
    """The page's forms as a browser sees them: method, action and the fields it submits."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "form":
            self.forms.append({"method": found.get("method"), "action": found.get("action")})
            self.forms[-1]["fields"] = {}
        elif tag == "input" and self.forms and found.get("name"):
            self.forms[-1]["fields"][found["name"]] = found.get("value") or ""


def form_of(page: str) -> dict[str, Any]:
    parser = _Form()
    parser.feed(page)
    (form,) = parser.forms
    return form


async def test_a_get_of_the_link_shows_a_confirmation_page_and_unsubscribes_nothing(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    try:
        url = await link_in_a_sent_email(svc, engine, fake, "cus_scanned")
        path = url.removeprefix("https://winback.example.com")
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            # a link scanner fetches every link, sometimes more than once
            pages = [await http.get(path) for _ in range(3)]
            head = await http.head(path)
    finally:
        await svc.aclose()
    page = pages[0]
    assert [p.status_code for p in pages] == [200, 200, 200]
    assert head.status_code in (200, 405)
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["content-language"] == "en"
    assert '<html lang="en">' in page.text
    assert "Unsubscribe from Acme Analytics?" in page.text
    assert "You are unsubscribed" not in page.text
    form = form_of(page.text)
    assert form == {"method": "post", "action": None, "fields": {"confirm": "unsubscribe"}}
    assert await suppression_rows(engine) == []
    assert await emitted(engine, configured.topics.outcomes, model.CUSTOMER_UNSUBSCRIBED) == []


async def test_the_pages_confirm_button_unsubscribes(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    try:
        url = await link_in_a_sent_email(svc, engine, fake, "cus_page")
        path = url.removeprefix("https://winback.example.com")
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get(path)
            form = form_of(page.text)
            # what a browser does with the form: POST its fields, urlencoded, to the page's URL
            done = await http.post(path, data=form["fields"])
            again = await http.post(path, data=form["fields"])
    finally:
        await svc.aclose()
    assert done.status_code == 200
    assert again.status_code == 200
    assert done.headers["content-type"].startswith("text/html")
    assert done.headers["cache-control"] == "no-store"
    assert "You are unsubscribed" in done.text
    assert "no more emails from Acme Analytics" in done.text
    assert "Mannerheimintie 1" in done.text
    assert "<form" not in done.text
    hashes = {r.address_hash: r.reason for r in await suppression_rows(engine)}
    assert hashes == {
        model.customer_key_hash("email", "cus_page"): "unsubscribed",
        model.address_hash("email", "cus_page@example.com"): "unsubscribed",
    }
    (event,) = await emitted(engine, configured.topics.outcomes, model.CUSTOMER_UNSUBSCRIBED)
    assert event["data"]["method"] == "page"
    assert event["data"]["customer_id"] == "cus_page"


@pytest.mark.parametrize(
    ("profile_locale", "lang", "heading", "done"),
    [
        ("fi-FI", "fi", "Perutaanko palvelun Acme Analytics viestit?", "Viestit on peruttu"),
        ("da", "da", "Afmeld beskeder fra Acme Analytics?", "Du er afmeldt"),
        ("ms-MY", "ms", "Berhenti melanggan Acme Analytics?", "Anda telah berhenti melanggan"),
        ("sv-SE", "en", "Unsubscribe from Acme Analytics?", "You are unsubscribed"),
        (None, "en", "Unsubscribe from Acme Analytics?", "You are unsubscribed"),
    ],
)
async def test_the_page_speaks_the_customers_language(
    configured: Settings,
    engine: AsyncEngine,
    profile_locale: str | None,
    lang: str,
    heading: str,
    done: str,
) -> None:
    svc = service(configured, engine, FrozenClock(T0))
    try:
        await seed(engine, "cus_lang")
        async with engine.begin() as conn:
            await conn.execute(
                update(scheduler_customers)
                .where(scheduler_customers.c.id == "cus_lang")
                .values(locale=profile_locale)
            )
        path = f"/u/{svc.tokens.issue('cus_lang', 'email')}"
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get(path)
            confirmed = await http.post(path, data=form_of(page.text)["fields"])
    finally:
        await svc.aclose()
    for response in (page, confirmed):
        assert response.status_code == 200
        assert response.headers["content-language"] == lang
        assert f'<html lang="{lang}">' in response.text
    assert heading in page.text
    assert done in confirmed.text


async def test_a_customer_we_know_only_from_a_message_gets_its_language(
    configured: Settings, engine: AsyncEngine, fake: FakeProviderServer
) -> None:
    """No profile row (erased, or the scheduler has not seen them): the locale of the latest
    message we sent them; a customer we know nothing about gets English."""
    svc = service(configured, engine, FrozenClock(T0))
    try:
        case = await seed(engine, "cus_msg")
        event = command("cus_msg", case)
        event["data"]["customer"]["locale"] = "da-DK"
        await svc.pipeline.transact_reliably(
            [svc.pipeline.decode_payload(from_json_dict(event), None, None)]
        )
        async with engine.begin() as conn:
            await conn.execute(
                delete(scheduler_customers).where(scheduler_customers.c.id == "cus_msg")
            )
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            known = await http.get(f"/u/{svc.tokens.issue('cus_msg', 'email')}")
            unknown = await http.get(f"/u/{svc.tokens.issue('cus_nobody', 'sms')}")
    finally:
        await svc.aclose()
    assert known.headers["content-language"] == "da"
    assert "e-mails fra Acme Analytics" in known.text
    assert unknown.headers["content-language"] == "en"
    assert "no more text messages from Acme Analytics" in unknown.text


async def test_nothing_from_the_request_or_the_customer_reaches_the_page_unescaped(
    settings: Settings, engine: AsyncEngine, fake: FakeProviderServer, tmp_path: Path
) -> None:
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    configured = with_dispatcher(
        settings,
        dispatcher_config(
            fake, tmp_path, product_name=f"Acme {evil}", company_name=f"Acme Oy {evil}"
        ),
    )
    svc = service(configured, engine, FrozenClock(T0))
    try:
        await seed(engine, evil, name=evil)
        token = svc.tokens.issue(evil, "email")
        async with serve(svc.app, lifespan="off") as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get(f"/u/{token}")
            done = await http.post(f"/u/{token}", data=form_of(page.text)["fields"])
            forged = await http.get(f"/u/1.{quote(evil.replace('/', ''), safe='')}.x")
            query = await http.get(f"/u/{token}", params={"q": evil})
    finally:
        await svc.aclose()
    for response in (page, done, query):
        assert response.status_code == 200
        assert "<script" not in response.text
        assert "<img" not in response.text
        assert str(escape(f"Acme {evil}")) in response.text  # the brand, escaped
        assert evil not in response.text
        assert token not in response.text  # the form posts back to its own URL
    # a refused token is a problem document, never HTML: the path it echoes is data
    assert forged.status_code == 404
    assert forged.headers["content-type"] == "application/problem+json"
    assert forged.json()["detail"].startswith("not a valid unsubscribe link")
    (event,) = await emitted(engine, configured.topics.outcomes, model.CUSTOMER_UNSUBSCRIBED)
    assert event["data"]["customer_id"] == evil


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
            form = await http.post(f"/u/{bad}", data={"confirm": "unsubscribe"})
    finally:
        await svc.aclose()
    for response in (post, get, form):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    assert await suppression_rows(engine) == []
    assert await emitted(engine, configured.topics.outcomes) == []
