"""The pooled HTTP/1.1 transport against the fake provider over loopback: keep-alive, the
connection limit, and every failure mapped to the httpx exception the adapters expect."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from services.dispatcher.errors import TransientSendError
from services.dispatcher.providers import OutboundMessage, SendGridProvider
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.transport import PooledTransport
from tests.fakes.provider_server import FakeProviderServer, Fault
from tests.support.services import eventually

BODY = {"personalizations": [{"to": [{"email": "a@example.com"}]}], "from": {"email": "b@x.io"}}
AUTH = {"Authorization": "Bearer SG.key"}
MESSAGE = OutboundMessage(
    "case-1:d0",
    Channel.EMAIL,
    "a@example.com",
    RenderedMessage("we_miss_you", Channel.EMAIL, "en", "Hi", "Hi", "<p>Hi</p>"),
)


@pytest.fixture
async def server() -> AsyncIterator[FakeProviderServer]:
    async with FakeProviderServer() as fake:
        yield fake


def client(transport: PooledTransport, timeout: float = 2.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout))


async def test_requests_reuse_one_keep_alive_connection(server: FakeProviderServer) -> None:
    transport = PooledTransport(max_connections=4)
    async with client(transport) as http:
        for _ in range(5):
            response = await http.post(f"{server.base_url}/v3/mail/send", json=BODY, headers=AUTH)
            assert response.status_code == 202
            assert response.headers["X-Message-Id"]
        assert transport.connections_opened == 1
        assert transport.idle_connections == 1
    assert transport.idle_connections == 0  # closed with the client


async def test_no_more_connections_than_the_limit(server: FakeProviderServer) -> None:
    server.set_latency("sendgrid", 0.05)
    transport = PooledTransport(max_connections=3)
    async with client(transport) as http:
        url = f"{server.base_url}/v3/mail/send"
        answers = await asyncio.gather(
            *(http.post(url, json=BODY, headers=AUTH) for _ in range(12))
        )
    assert [a.status_code for a in answers] == [202] * 12
    assert transport.connections_opened == 3
    assert len(server.accepted("sendgrid")) == 12


async def test_a_json_answer_and_its_status_come_through(server: FakeProviderServer) -> None:
    server.fail_next("postmark", Fault.http(422, {"ErrorCode": 406, "Message": "inactive"}))
    async with client(PooledTransport()) as http:
        response = await http.post(f"{server.base_url}/email", json={})
    assert response.status_code == 422
    assert response.json() == {"ErrorCode": 406, "Message": "inactive"}


async def test_a_dropped_connection_is_ambiguous_and_the_next_request_reconnects(
    server: FakeProviderServer,
) -> None:
    server.fail_next("sendgrid", Fault.drop())
    transport = PooledTransport()
    async with client(transport) as http:
        provider = SendGridProvider(
            http, api_key="SG.key", from_email="b@x.io", base_url=server.base_url
        )
        with pytest.raises(TransientSendError) as info:
            await provider.send(MESSAGE)
        assert info.value.ambiguous
        assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
        assert (await provider.send(MESSAGE)).provider_message_id
    assert transport.connections_opened == 2


async def test_no_answer_in_time_is_a_read_timeout(server: FakeProviderServer) -> None:
    server.fail_next("sendgrid", Fault.hang(5))
    async with client(PooledTransport(), timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{server.base_url}/v3/mail/send", json=BODY, headers=AUTH)


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    async with client(PooledTransport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/v3/mail/send", json=BODY)


async def test_waiting_too_long_for_a_free_connection_is_a_pool_timeout(
    server: FakeProviderServer,
) -> None:
    server.fail_next("sendgrid", Fault.hang(2))
    transport = PooledTransport(max_connections=1)
    async with client(transport, timeout=1.0) as http:
        url = f"{server.base_url}/v3/mail/send"
        hung = asyncio.create_task(http.post(url, json=BODY, headers=AUTH))

        async def received() -> int:  # the hung request holds the one connection
            return len(server.requests_for("sendgrid"))

        assert await eventually(received, lambda n: n == 1, timeout=5, interval=0.01) == 1
        with pytest.raises(httpx.PoolTimeout):
            await http.post(url, json=BODY, headers=AUTH, timeout=httpx.Timeout(1.0, pool=0.1))
        with pytest.raises(httpx.ReadTimeout):
            await hung


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    server: FakeProviderServer,
) -> None:
    transport = PooledTransport()
    async with client(transport) as http:
        url = f"{server.base_url}/v3/mail/send"
        assert (await http.post(url, json=BODY, headers=AUTH)).status_code == 202
        for writer in list(server._writers):  # the server drops its idle keep-alive
            writer.transport.abort()

        async def seen_closed() -> bool:  # the client's end of the idle connection saw it
            idle = [c for pooled in transport._idle.values() for c in pooled]
            return bool(idle) and not any(c.usable(time.monotonic(), 30.0) for c in idle)

        assert await eventually(seen_closed, bool, timeout=5, interval=0.01)
        assert (await http.post(url, json=BODY, headers=AUTH)).status_code == 202
    assert transport.connections_opened == 2
