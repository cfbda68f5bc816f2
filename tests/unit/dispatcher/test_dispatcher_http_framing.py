"""The pooled transport's own HTTP/1.1 framing and its lean ``post_bytes`` path, against raw
servers on loopback: chunked, interim, close-delimited and coded answers, keep-alive rules,
every answer it cannot read refused as ``httpx.RemoteProtocolError``, no header that could
split a request, and no connection slot lost to a waiter that gave up."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from services.dispatcher.errors import TransientSendError
from services.dispatcher.providers import OutboundMessage, SendGridProvider
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.transport import PooledClient
from services.dispatcher.transport import client as pooled_client
from tests.fakes.provider_server import FakeProviderServer
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


class RawServer:
    """Reads one request head and body per connection turn, then writes ``answers`` in order
    (one per request; ``None`` closes the connection without answering). With ``close`` it
    closes the connection after each answer."""

    def __init__(self, answers: list[bytes | None], close: bool = False) -> None:
        self.answers = answers
        self.close = close
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v3/mail/send"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def lean(timeout: float = 2.0) -> PooledClient:
    return pooled_client(max_connections=4, timeout=httpx.Timeout(timeout))


async def test_a_chunked_answer_with_extensions_and_trailers_is_read_whole() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Message-Id: m-1\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    async with RawServer([answer, answer]) as server, lean() as http:
        first = await http.post_bytes(server.url, b"{}", {"Content-Type": "application/json"})
        second = await http.post_bytes(server.url, b"{}", {"Content-Type": "application/json"})
    assert (first.status_code, first.content, first.headers["x-message-id"]) == (
        200,
        b"hello, world",
        "m-1",
    )
    assert second.content == b"hello, world"
    assert server.connections == 1  # the chunked answer left the connection reusable


async def test_interim_answers_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer([answer]) as server, lean() as http:
        response = await http.post_bytes(server.url, b"{}", {})
    assert (response.status_code, response.content) == (202, b"ok")


async def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    answers: list[bytes | None] = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
    ]
    async with RawServer(answers) as server, lean() as http:
        bodies = [(await http.post_bytes(server.url, b"", {})).content for _ in range(3)]
        assert http.pooled.idle_connections == 1
    assert bodies == [b"a", b"b", b"c"]
    assert server.connections == 3


async def test_an_answer_framed_by_the_connection_closing_is_read_to_the_end() -> None:
    async with (
        RawServer([b"HTTP/1.1 200 OK\r\n\r\nall of it"], close=True) as server,
        lean() as http,
    ):
        response = await http.post_bytes(server.url, b"", {})
        assert http.pooled.idle_connections == 0
    assert response.content == b"all of it"


async def test_a_gzip_answer_is_decoded_as_httpx_would() -> None:
    body = gzip.compress(b'{"errors": []}')
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
    async with RawServer([answer % len(body) + body]) as server, lean() as http:
        response = await http.post_bytes(server.url, b"", {})
    assert response.json() == {"errors": []}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "header field"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "mid-answer"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", "64 KiB"),
    ],
)
async def test_an_answer_we_cannot_read_is_a_remote_protocol_error(
    answer: bytes, reason: str
) -> None:
    async with RawServer([answer], close=True) as server, lean() as http:
        with pytest.raises(httpx.RemoteProtocolError, match=reason) as info:
            await http.post_bytes(server.url, b"{}", {})
        assert http.pooled.idle_connections == 0
    assert info.value.request.url == server.url  # the request is named for the error


async def test_no_answer_at_all_is_a_remote_protocol_error_and_ambiguous() -> None:
    async with RawServer([None]) as server, lean() as http:
        provider = SendGridProvider(
            http,
            api_key="SG.key",
            from_email="b@x.io",
            base_url=server.url[: -len("/v3/mail/send")],
        )
        with pytest.raises(TransientSendError) as info:
            await provider.send(MESSAGE)
    assert info.value.ambiguous
    assert "without sending a response" in str(info.value.__cause__)


async def test_the_lean_path_sends_what_httpx_would() -> None:
    ok = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    async with RawServer([ok, ok]) as server:
        async with lean() as http:
            await http.post_bytes(server.url, b'{"a":1}', {**AUTH, "Content-Type": "x/y"})
        async with httpx.AsyncClient() as plain:
            await plain.post(
                server.url, content=b'{"a":1}', headers={**AUTH, "Content-Type": "x/y"}
            )
    ours, theirs = (request.split(b"\r\n") for request in server.requests)
    assert ours[0] == theirs[0] == b"POST /v3/mail/send HTTP/1.1"
    assert sorted(ours[1:]) == sorted(theirs[1:])  # the same fields and body


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\x00b"])
async def test_a_header_value_that_could_split_the_request_is_refused(value: str) -> None:
    async with RawServer([]) as server, lean() as http:
        with pytest.raises(httpx.LocalProtocolError):
            await http.post_bytes(server.url, b"", {"X-Key": value})
        with pytest.raises(httpx.LocalProtocolError):
            await http.post(server.url, headers={"X-Key": value})
    assert server.requests == []


async def test_a_waiter_that_times_out_leaves_no_slot_behind(server: FakeProviderServer) -> None:
    server.set_latency("sendgrid", 0.3)
    async with pooled_client(max_connections=1, timeout=httpx.Timeout(2.0, pool=0.05)) as http:
        url = f"{server.base_url}/v3/mail/send"
        body = json.dumps(BODY).encode()
        slow = asyncio.create_task(http.post_bytes(url, body, AUTH))

        async def received() -> int:  # the slow request holds the one connection
            return len(server.requests_for("sendgrid"))

        assert await eventually(received, lambda n: n == 1, timeout=5, interval=0.01) == 1
        waiters = [asyncio.create_task(http.post_bytes(url, body, AUTH)) for _ in range(5)]
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, httpx.PoolTimeout) for r in results)
        assert (await slow).status_code == 202
        # the one slot is free again: requests one after another all get it
        for _ in range(3):
            assert (await http.post_bytes(url, body, AUTH)).status_code == 202
    assert http.pooled.connections_opened == 1
