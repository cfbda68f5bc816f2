"""The README's "Adding a channel" recipe, followed by a test: a ``push`` channel that exists
only here (one registry entry, one template with its spec, one provider adapter speaking HTTP to
a loopback server) goes end to end through the dispatcher — a dispatch command on the real
broker ends ``message.sent`` and the push server got the request — with no other module edited."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import model
from services.dispatcher.bootstrap import bootstrap
from services.dispatcher.errors import PermanentSendError, TransientSendError
from services.dispatcher.providers import OutboundMessage, SendResult
from services.dispatcher.rendering import TEMPLATE_SPECS, TEMPLATES_DIR, TemplateSpec
from shared import channels
from shared.channels import Channel, ChannelSpec
from shared.clock import FrozenClock
from shared.settings import Settings
from tests.support.dispatcher import (
    T0,
    command,
    delivery_rows,
    emitted,
    seed,
    send_commands,
    started,
    with_dispatcher,
)
from tests.support.services import eventually

pytestmark = pytest.mark.integration

# 1. one registry entry
PUSH = ChannelSpec(
    name="push",
    address_field="push_token",
    template_dir="push",
    template_parts=("txt",),
    provider_kinds=("push",),
    suppressible=False,
    unsubscribe_link=False,
    unsubscribe_wording={"en": "push notifications"},
)


# 2. its template (a file per locale, here English only: other locales fall back) and its spec
def push_templates(root: Path) -> Path:
    templates = root / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "en" / "push").mkdir()
    (templates / "en" / "push" / "we_miss_you.txt").write_text(
        "{% if name is defined %}{{ name }}, w{% else %}W{% endif %}e miss you at {{ product }}: "
        "{{ cta_url }}",
        encoding="utf-8",
    )
    return templates


def push_specs() -> dict[tuple[str, Channel], TemplateSpec]:
    """The shipped specs and the push template's (once ``push`` is registered)."""
    push = TemplateSpec(required=frozenset({"product", "cta_url"}), optional=frozenset({"name"}))
    return {**TEMPLATE_SPECS, ("we_miss_you", Channel("push")): push}


# 3. one provider adapter
class PushProvider:
    """Posts ``{"to", "body"}`` to a push gateway; 5xx is transient, 4xx permanent."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url

    @property
    def name(self) -> str:
        return "pushgw"

    @property
    def channel(self) -> Channel:
        return Channel("push")

    async def send(self, message: OutboundMessage) -> SendResult:
        body = {"to": message.to, "body": message.content.text, "key": message.idempotency_key}
        try:
            answer = await self._client.post(self._url, json=body)
        except httpx.HTTPError as exc:
            raise TransientSendError(str(exc), provider=self.name) from exc
        if answer.status_code >= 500:
            raise TransientSendError("gateway error", provider=self.name, status_code=500)
        if answer.status_code >= 400:
            raise PermanentSendError("refused", provider=self.name, status_code=400)
        return SendResult(self.name, str(answer.json()["id"]))


@dataclass
class PushGateway:
    """A push gateway on 127.0.0.1 (real HTTP/1.1 over asyncio streams, h11): records bodies."""

    received: list[dict[str, Any]] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/v1/push"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            self.received.append(orjson.loads(body))
            answer = orjson.dumps({"id": f"push-{len(self.received)}"})
            headers = [("content-type", "application/json"), ("content-length", str(len(answer)))]
            headers.append(("connection", "close"))
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=answer)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def gateway() -> AsyncIterator[PushGateway]:
    gw = PushGateway()
    gw.server = await asyncio.start_server(gw.handle, "127.0.0.1", 0)
    try:
        yield gw
    finally:
        gw.server.close()
        await gw.server.wait_closed()


async def test_a_channel_registered_in_a_test_sends_end_to_end(
    settings: Settings, engine: AsyncEngine, tmp_path: Path, gateway: PushGateway
) -> None:
    configured = with_dispatcher(
        settings, {"public_base_url": "https://winback.example.com", "poll_seconds": 0.02}
    )
    with channels.registered(PUSH):
        async with httpx.AsyncClient() as client:
            svc = bootstrap(
                configured,
                engine=engine,
                clock=FrozenClock(T0),
                providers={"push": [PushProvider(client, gateway.url)]},
                templates=push_templates(tmp_path),
                template_specs=push_specs(),
            )
            case = await seed(engine, "cus_push", consent={"push": True})
            event = command("cus_push", case, "d0_push", channel="push")
            event["data"]["customer"]["push_token"] = "tok-123"
            async with started(svc):
                await send_commands(configured, event)
                rows = await eventually(
                    lambda: delivery_rows(engine),
                    lambda rows: bool(rows) and rows[0].state == "sent",
                )
    (row,) = rows
    assert (row.channel, row.state, row.provider_message_id) == ("push", "sent", "push-1")
    (sent,) = await emitted(engine, configured.topics.outcomes, model.MESSAGE_SENT)
    assert (sent["data"]["channel"], sent["data"]["case_id"]) == ("push", case)
    (request,) = gateway.received
    assert request["to"] == "tok-123"
    assert request["key"] == f"{case}:d0_push"
    assert request["body"].startswith("Aino, we miss you at ")
    assert "utm_medium=push" in request["body"]
    assert "push" not in channels.REGISTRY  # gone with the test
