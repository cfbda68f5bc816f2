"""A small HTTP/1.1 keep-alive transport for httpx: h11 over asyncio streams.

Why: httpx's default transport (httpcore over anyio) scans its whole connection pool, and
probes every idle socket, for each request; at a few hundred requests in flight that costs
more CPU than everything else the dispatcher does per message (0.5 to 2.5 ms per request in our
profile). Here checkout is a ``list.pop`` from the origin's idle stack, and a request is one
h11 round trip. Provider adapters keep using ``httpx.AsyncClient`` and see httpx's own
exceptions, so nothing above this layer changes.

Scope: HTTP/1.1 with keep-alive, TLS via an ``ssl.SSLContext``, no proxies, no HTTP/2, no
streaming (provider answers are small and read whole). Error mapping, as httpcore does it:

- connecting: timeout → ``httpx.ConnectTimeout``; refused/unreachable → ``httpx.ConnectError``;
- no free connection within the pool timeout → ``httpx.PoolTimeout``;
- writing: timeout → ``httpx.WriteTimeout``; reading: timeout → ``httpx.ReadTimeout``;
- the peer closing or resetting before a complete answer → ``httpx.RemoteProtocolError``
  (the request may have been received: the adapters read this as an ambiguous failure).

An idle connection the server has closed is noticed at checkout (EOF already seen) and
dropped; one idle for longer than ``keepalive_expiry`` is dropped too.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx

Origin = tuple[str, str, int]
_READ_SIZE = 65_536


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.idle_since < expiry
            and self.h11.our_state is h11.IDLE
        )

    def close(self) -> None:
        self.writer.close()


class PooledTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, at most ``max_connections`` at once."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._closed = False
        self.connections_opened = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free in time", request=request) from None
        try:
            connection = self._checkout(origin) or await self._connect(
                origin, timeouts.get("connect"), request
            )
            try:
                status, headers, body, reusable = await self._exchange(
                    connection, request, timeouts
                )
            except BaseException:
                connection.close()
                raise
            if reusable and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(origin, []).append(connection)
            else:
                connection.close()
        finally:
            self._slots.release()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(body),  # the client decodes any Content-Encoding
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self._expiry):
                return connection
            connection.close()
        return None

    async def _connect(
        self, origin: Origin, timeout: float | None, request: httpx.Request
    ) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=_READ_SIZE
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port}", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"connecting to {host}:{port}: {exc}", request=request
            ) from exc
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def _exchange(
        self,
        connection: _Connection,
        request: httpx.Request,
        timeouts: dict[str, float | None],
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        conn = connection.h11
        body = await request.aread()
        target = request.url.raw_path
        data = (
            conn.send(
                h11.Request(method=request.method, target=target, headers=request.headers.raw)
            )
            or b""
        )
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            async with asyncio.timeout(timeouts.get("write")):
                connection.writer.write(data)
                await connection.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("sending the request", request=request) from None
        except OSError as exc:
            raise httpx.WriteError(f"sending the request: {exc}", request=request) from exc
        try:
            async with asyncio.timeout(timeouts.get("read")):
                return await self._read_response(connection, request)
        except TimeoutError:
            raise httpx.ReadTimeout("waiting for the answer", request=request) from None

    async def _read_response(
        self, connection: _Connection, request: httpx.Request
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        conn = connection.h11
        status = 0
        headers: Sequence[tuple[bytes, bytes]] = ()
        chunks: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is h11.NEED_DATA:
                try:
                    data = await connection.reader.read(_READ_SIZE)
                except OSError as exc:
                    raise httpx.ReadError(f"reading the answer: {exc}", request=request) from exc
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise httpx.RemoteProtocolError(
                        "server disconnected without sending a response", request=request
                    )
                conn.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "server closed the connection mid-answer", request=request
                )
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return status, list(headers), b"".join(chunks), reusable

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())


class PooledClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` over a ``PooledTransport``, with a lean path for provider calls.

    ``post_bytes`` hands one ready request straight to the transport: it skips the client
    machinery provider calls never use (cookie jar, auth flows, redirect handling, event
    hooks, base-URL merging), which cost about 40% of a request's CPU in ``bench/`` (≈170 of
    ≈400 µs). Everything else — ``post``, ``send``, ``stream`` — is plain httpx.
    """

    def __init__(self, *, transport: PooledTransport, timeout: httpx.Timeout, **kwargs: Any):
        super().__init__(transport=transport, timeout=timeout, **kwargs)
        self.pooled = transport
        self._timeouts = self.timeout.as_dict()
        self._defaults = list(self.headers.items())
        self._urls: dict[str, httpx.URL] = {}

    async def post_bytes(
        self, url: str, content: bytes, headers: Mapping[str, str]
    ) -> httpx.Response:
        """POST ``content`` with the client's default headers overridden by ``headers``;
        returns the answer read whole. Raises httpx's exceptions, like ``post``."""
        parsed = self._urls.get(url)
        if parsed is None:  # a provider posts to one or two URLs: parse each once
            if len(self._urls) >= 64:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        given = {name.lower() for name in headers}
        merged = [(k, v) for k, v in self._defaults if k not in given]
        merged.extend(headers.items())
        request = httpx.Request(
            "POST", parsed, content=content, headers=merged, extensions={"timeout": self._timeouts}
        )
        response = await self.pooled.handle_async_request(request)
        await response.aread()
        return response


def client(
    *,
    max_connections: int,
    timeout: httpx.Timeout,
    ssl_context: ssl.SSLContext | None = None,
    keepalive_expiry: float = 30.0,
    **kwargs: Any,
) -> PooledClient:
    """A ``PooledClient``: an ``httpx.AsyncClient`` over a ``PooledTransport``."""
    transport = PooledTransport(
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
        ssl_context=ssl_context,
    )
    return PooledClient(transport=transport, timeout=timeout, **kwargs)
