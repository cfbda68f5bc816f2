"""Preview and test send over real HTTP and PostgreSQL, the fake provider as SendGrid/Twilio:
a preview with sample data, with inline data, with a known customer's profile; the errors
(unknown template, a template not on the channel, a missing field, an unknown customer, an
unknown field) as 4xx problem+json naming the field; SMS segments counted; a test send that
reaches the provider marked as a test and writes no delivery; a recipient not allowed."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.clock import FrozenClock
from shared.content import SHIPPED_CONTENT_DIR
from shared.db.tables import deliveries, outbox
from shared.settings import DEV_SECRET, Settings
from tests.fakes.provider_server import FakeProviderServer
from tests.support.dispatcher import T0, dispatcher_config, seed, service, with_dispatcher
from tests.support.http import serve

pytestmark = pytest.mark.integration

KEY = {"Authorization": f"Bearer {DEV_SECRET}"}


@dataclass
class Harness:
    http: httpx.AsyncClient
    engine: AsyncEngine
    fake: FakeProviderServer

    async def preview(self, **body: Any) -> httpx.Response:
        return await self.http.post("/v1/preview", json=body, headers=KEY)

    async def send_test(self, **body: Any) -> httpx.Response:
        return await self.http.post("/v1/test-sends", json=body, headers=KEY)


@pytest.fixture
async def harness(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> AsyncIterator[Harness]:
    async with FakeProviderServer() as fake:
        config = dispatcher_config(
            fake, tmp_path, test_recipients=["*@acme.example", "+35840*"], sms_max_segments=1
        )
        svc = service(with_dispatcher(settings, config), engine, FrozenClock(T0))
        try:
            async with (
                serve(svc.app, lifespan="off") as url,
                httpx.AsyncClient(base_url=url) as http,
            ):
                yield Harness(http, engine, fake)
        finally:
            await svc.aclose()


async def _counts(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        d = await conn.scalar(select(func.count()).select_from(deliveries))
        o = await conn.scalar(select(func.count()).select_from(outbox))
    return int(d or 0), int(o or 0)


async def test_preview_with_sample_data_inline_data_and_a_customer(harness: Harness) -> None:
    before = await _counts(harness.engine)
    sample = await harness.preview(template="we_miss_you")
    assert sample.status_code == 200, sample.text
    body = sample.json()
    assert body["source"] == "sample"
    assert body["locale"] == "en"
    assert body["subject"]
    assert "Sample" in body["text"]  # the catalogue's sample name
    assert "Acme Analytics" in body["text"]  # the product from settings, never sample data
    assert body["html"] is not None
    assert "<p" in body["html"]

    inline = await harness.preview(
        template="special_offer",
        locale="fi-FI",
        offer="discount_50pct_3mo",
        data={"name": "Aino", "valid_until": "2026-12-31"},
    )
    assert inline.status_code == 200, inline.text
    shown = inline.json()
    assert shown["source"] == "data"
    assert shown["locale"] == "fi"
    assert "Aino" in shown["text"]
    assert "50" in shown["text"]  # the offer in Finnish words, from fi/offers.json

    await seed(harness.engine, "cus_preview", name="Mikko", mrr_minor=24900)
    real = await harness.preview(
        template="crm_personal_outreach", channel="crm", customer_id="cus_preview"
    )
    assert real.status_code == 200, real.text
    task = real.json()
    assert task["source"] == "customer"
    assert "Mikko" in task["subject"] + task["text"]
    assert "249" in task["text"]  # MRR from the profile, in major units

    nameless = await harness.preview(template="we_miss_you", data={"name": " "})
    assert nameless.status_code == 200, nameless.text  # a blank name is no name: greeted without
    assert "no name" in " ".join(nameless.json()["warnings"])
    featureless = await harness.preview(template="what_you_missed", data={"new_features": []})
    assert featureless.status_code == 422
    assert "data.new_features" in {e["field"] for e in featureless.json()["errors"]}
    assert await _counts(harness.engine) == before  # nothing written
    assert harness.fake.accepted() == []  # no provider called


async def test_preview_errors_name_the_field(harness: Harness) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"template": "free_upgrade"}, 422, "template"),
        ({"template": "what_you_missed", "channel": "sms"}, 422, "channel"),
        ({"template": "we_miss_you", "channel": "pigeon"}, 422, "channel"),
        ({"template": "we_miss_you", "data": {"shoe_size": "42"}}, 422, "data.shoe_size"),
        ({"template": "we_miss_you", "data": {"valid_until": "soon"}}, 422, "data.valid_until"),
        ({"template": "we_miss_you", "customer_id": "cus_nobody"}, 404, ""),
        ({"template": "we_miss_you", "customer_id": "c", "data": {}}, 422, ""),
    ]
    for body, status, field in cases:
        answer = await harness.preview(**body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        if field:
            assert field in {e["field"] for e in answer.json().get("errors", [])}, answer.text
    unauthorised = await harness.http.post("/v1/preview", json={"template": "we_miss_you"})
    assert unauthorised.status_code == 401


async def test_sms_segments_are_counted_and_warned_over_the_limit(harness: Harness) -> None:
    gsm = await harness.preview(template="we_miss_you", channel="sms")
    assert gsm.status_code == 200, gsm.text
    sms = gsm.json()["sms"]
    assert sms["encoding"] == "GSM-7"
    assert sms["segments"] >= 1
    long = await harness.preview(
        template="special_offer",
        channel="sms",
        offer="Ω" * 10 + "🎉 " * 40,
        data={"valid_until": "2026-12-31"},
    )
    assert long.status_code == 200, long.text
    shown = long.json()
    assert shown["sms"]["encoding"] == "UCS-2"
    assert shown["sms"]["segments"] > 1
    assert any("segments" in w for w in shown["warnings"])


async def test_a_test_send_goes_through_the_provider_marked_and_unrecorded(
    harness: Harness,
) -> None:
    before = await _counts(harness.engine)
    sent = await harness.send_test(template="we_miss_you", to="marketer@acme.example")
    assert sent.status_code == 200, sent.text
    result = sent.json()
    assert result["provider"] == "sendgrid"
    assert result["idempotency_key"].startswith("test-")
    [request] = harness.fake.accepted("sendgrid")
    payload = request.json
    assert payload["personalizations"][0]["to"][0]["email"] == "marketer@acme.example"
    assert payload["subject"].startswith("[Test] ")
    assert payload["custom_args"]["test"] == "true"
    assert await _counts(harness.engine) == before  # no delivery, no outbox row

    refused = await harness.send_test(template="we_miss_you", to="someone@gmail.example")
    assert refused.status_code == 403
    assert refused.json()["errors"][0]["field"] == "to"
    sms = await harness.send_test(template="we_miss_you", channel="sms", to="+358401234567")
    assert sms.status_code == 200, sms.text
    assert len(harness.fake.accepted("twilio")) == 1


async def test_a_content_variant_previews_and_sends_from_its_own_content_dir(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """A subject-line variant written in the content directory only (``like:``) is what the
    running dispatcher renders: preview and test send both carry the variant's subject."""
    content = tmp_path / "content"
    shutil.copytree(SHIPPED_CONTENT_DIR, content)
    with (content / "catalog.yaml").open("a", encoding="utf-8") as catalog:
        catalog.write(
            "  we_miss_you_short:\n"
            "    like: we_miss_you\n"
            '    subject: {en: "We kept your seat", fi: "Paikkasi odottaa"}\n'
        )
    async with FakeProviderServer() as fake:
        config = dispatcher_config(fake, tmp_path, test_recipients=["*@acme.example"])
        configured = with_dispatcher(settings, config).model_copy(update={"content_dir": content})
        svc = service(configured, engine, FrozenClock(T0))
        try:
            async with (
                serve(svc.app, lifespan="off") as url,
                httpx.AsyncClient(base_url=url) as http,
            ):
                shown = await http.post(
                    "/v1/preview",
                    json={"template": "we_miss_you_short", "locale": "fi"},
                    headers=KEY,
                )
                assert shown.status_code == 200, shown.text
                assert shown.json()["subject"] == "Paikkasi odottaa"
                sent = await http.post(
                    "/v1/test-sends",
                    json={"template": "we_miss_you_short", "to": "me@acme.example"},
                    headers=KEY,
                )
                assert sent.status_code == 200, sent.text
                [request] = fake.accepted("sendgrid")
                assert request.json["subject"] == "[Test] We kept your seat"
        finally:
            await svc.aclose()
