"""A small HTTP/1.1 keep-alive client transport for httpx, over asyncio streams.

Why: httpx's default transport (httpcore over anyio) scans its whole connection pool, and
probes every idle socket, for each request; at a few hundred requests in flight that costs
more CPU than everything else the dispatcher does per message (0.5 to 2.5 ms per request in our
profile). Here checkout is a ``list.pop`` from the origin's idle stack, waiting for a free
connection is O(1) (a counter and a FIFO of waiters: ``asyncio.Semaphore.acquire`` scans its
waiters, quadratic under a backlog), and a request is one write and one read of an answer.
Provider adapters keep using ``httpx.AsyncClient`` and see httpx's own exceptions, so nothing
above this layer changes.

The HTTP/1.1 framing is done here, for the one shape of exchange provider calls need: the
request written whole (``Content-Length``, no ``Expect``), the answer read whole. It was h11,
whose event objects and header validation per request cost about a fifth of the dispatcher's
CPU per send (``bench/dispatcher_bench.py``). Answers are read strictly (RFC 9112): a status
line, header fields of tokens and field values, the head at most 64 KiB; a body framed by
``Transfer-Encoding: chunked`` (chunk extensions and trailers skipped), by ``Content-Length``
(repeated values must agree), or by the connection closing (then at most 16 MiB, and the
connection is not reused); none after 1xx/204/304 or a HEAD. Interim 1xx answers are skipped
(101 is an error: we never ask to switch protocols). Anything else is a
``httpx.RemoteProtocolError``. A connection is reused when the answer is HTTP/1.1 without
``Connection: close``. Request header names and values are checked like h11 checks them (no
CR, LF or NUL can reach the wire).

Scope: HTTP/1.1 with keep-alive, TLS via an ``ssl.SSLContext``, no proxies, no HTTP/2, no
streaming (provider answers are small and read whole). Proxies: when the environment names one
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, as ``urllib.request.getproxies`` reads them),
``client`` returns httpx's own client instead, which honours them per URL (``NO_PROXY``
included); which one is used is logged once. Error mapping, as httpcore does it:

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
import logging
import re
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

Origin = tuple[str, str, int]
Header = tuple[bytes, bytes]
RequestFactory = Callable[[], httpx.Request]
"""Builds the ``httpx.Request`` an exception names: only needed when one is raised."""

_READ_SIZE: Final = 65_536
"""Stream buffer, and the largest answer head (status line and header fields) accepted."""
_MAX_UNFRAMED: Final = 16 * 1024 * 1024
"""The most read from an answer whose end is the connection closing."""
_HTTP_11: Final = {"http_version": b"HTTP/1.1"}
_CACHE_LIMIT: Final = 64

# RFC 9110/9112 grammar, as h11 spells it.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VALUE: Final = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_NAME: Final = re.compile(_TOKEN)
_VALUE: Final = re.compile(_FIELD_VALUE)
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
_FIELD_LINE: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00\r\n]*)?")
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
_FRAMING: Final = (b"content-length", b"transfer-encoding")


class _ProtocolError(Exception):
    """An answer we cannot read; becomes ``httpx.RemoteProtocolError``."""


def request_head(method: bytes, target: bytes, headers: Iterable[Header]) -> bytes:
    """The request line and header fields (no blank line after them), checked: a name must
    be a token, a value must hold no CR, LF or NUL, so nothing can split the request."""
    if not _NAME.fullmatch(method):
        raise httpx.LocalProtocolError(f"illegal method {method!r}")
    if not _TARGET.fullmatch(target):
        raise httpx.LocalProtocolError(f"illegal request target {target!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not _NAME.fullmatch(name):
            raise httpx.LocalProtocolError(f"illegal header name {name!r}")
        if not _VALUE.fullmatch(value):
            raise httpx.LocalProtocolError(f"illegal value for header {name!r}")
        lines += (name, b": ", value, b"\r\n")
    return b"".join(lines)


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.idle_since < expiry
        )

    def close(self) -> None:
        self.writer.close()


class _Slots:
    """At most ``limit`` holders at once; waiters are served first come, first served.

    ``acquire``/``release`` are O(1) whatever the backlog (``asyncio.Semaphore`` in Python
    3.11 scans its waiters on each acquire and release)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, timeout: float | None) -> None:
        """Take a slot, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()  # skipped by release
            raise

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


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
        self._slots = _Slots(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._closed = False
        self.connections_opened = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        raw = request.headers.raw
        framed = any(name.lower() in _FRAMING for name, _ in raw)
        headers = [(name, value) for name, value in raw if name.lower() not in _FRAMING]
        if body or framed:  # the body is read whole: always sent with its length
            headers.append((b"Content-Length", b"%d" % len(body)))
        method = request.method.encode("ascii")
        status, answer, content = await self.exchange(
            origin,
            request_head(method, url.raw_path, headers),
            body,
            request.extensions.get("timeout", {}),
            lambda: request,
            no_body=method == b"HEAD",
        )
        return httpx.Response(
            status,
            headers=answer,
            stream=httpx.ByteStream(content),  # the client decodes any Content-Encoding
            request=request,
            extensions=_HTTP_11,
        )

    async def exchange(
        self,
        origin: Origin,
        head: bytes,
        body: bytes,
        timeouts: Mapping[str, float | None],
        request: RequestFactory,
        *,
        no_body: bool = False,
    ) -> tuple[int, list[Header], bytes]:
        """One request on a pooled connection to ``origin``: ``head`` from ``request_head``
        (``Host`` and ``Content-Length`` among its fields), then ``body``; returns the
        answer's status, header fields and body, read whole. ``no_body``: the answer has
        none whatever its fields say (a HEAD request)."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        try:
            await self._slots.acquire(timeouts.get("pool"))
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free in time", request=request()) from None
        try:
            connection = self._checkout(origin) or await self._connect(
                origin, timeouts.get("connect"), request
            )
            try:
                status, answer, content, reusable = await self._exchange(
                    connection, head, body, timeouts, request, no_body
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
        return status, answer, content

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
        self, origin: Origin, timeout: float | None, request: RequestFactory
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
            raise httpx.ConnectTimeout(f"connecting to {host}:{port}", request=request()) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"connecting to {host}:{port}: {exc}", request=request()
            ) from exc
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def _exchange(
        self,
        connection: _Connection,
        head: bytes,
        body: bytes,
        timeouts: Mapping[str, float | None],
        request: RequestFactory,
        no_body: bool,
    ) -> tuple[int, list[Header], bytes, bool]:
        writer = connection.writer
        try:
            writer.write(head + b"\r\n" + body)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeouts.get("write")):
                    await writer.drain()
            else:  # all of it went out at once: nothing to wait for (raises if lost)
                await writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("sending the request", request=request()) from None
        except OSError as exc:
            raise httpx.WriteError(f"sending the request: {exc}", request=request()) from exc
        try:
            async with asyncio.timeout(timeouts.get("read")):
                return await _read_answer(connection.reader, no_body)
        except TimeoutError:
            raise httpx.ReadTimeout("waiting for the answer", request=request()) from None
        except _ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request()) from None
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer: {exc}", request=request()) from exc

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())


# --- reading an answer -------------------------------------------------------------------------


async def _read_answer(
    reader: asyncio.StreamReader, no_body: bool
) -> tuple[int, list[Header], bytes, bool]:
    """(status, header fields, body, whether the connection can be reused)."""
    first = True
    while True:
        version, status, headers = _parse_head(await _read_head(reader, first))
        first = False
        if status >= 200:
            break
        if status == 101:
            raise _ProtocolError("the server switched protocols, which we never ask for")
    reusable = version == 1 and not _has_token(headers, b"connection", b"close")
    if no_body or status in (204, 304):
        return status, headers, b"", reusable
    codings = _values(headers, b"transfer-encoding")
    if codings:
        if [c.strip().lower() for c in b",".join(codings).split(b",")] != [b"chunked"]:
            raise _ProtocolError("an answer coded other than chunked")
        return status, headers, await _read_chunked(reader), reusable
    lengths = _values(headers, b"content-length")
    if lengths:
        sizes = {value.strip() for value in b",".join(lengths).split(b",")}
        if len(sizes) != 1 or not (size := sizes.pop()).isdigit() or len(size) > 15:
            raise _ProtocolError("a bad Content-Length in the answer")
        return status, headers, await _read_exactly(reader, int(size)), reusable
    body = await reader.read(_MAX_UNFRAMED + 1)  # framed by the connection closing
    while len(body) <= _MAX_UNFRAMED and (more := await reader.read(_MAX_UNFRAMED + 1)):
        body += more
    if len(body) > _MAX_UNFRAMED:
        raise _ProtocolError("an unframed answer over 16 MiB")
    return status, headers, body, False


async def _read_head(reader: asyncio.StreamReader, first: bool) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if first and not exc.partial:
            raise _ProtocolError("server disconnected without sending a response") from None
        raise _ProtocolError("server closed the connection mid-answer") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("an answer head over 64 KiB") from None


def _parse_head(head: bytes) -> tuple[int, int, list[Header]]:
    """(minor version, status, header fields) of an answer head ending in a blank line."""
    lines = head[:-4].split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: list[Header] = []
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            raise _ProtocolError(f"a malformed header field: {line[:80]!r}")
        headers.append((field.group(1), field.group(2)))
    return int(status_line.group(1)), int(status_line.group(2)), headers


def _values(headers: list[Header], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _has_token(headers: list[Header], name: bytes, token: bytes) -> bool:
    return any(
        part.strip().lower() == token
        for value in _values(headers, name)
        for part in value.split(b",")
    )


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise _ProtocolError("server closed the connection mid-answer") from None


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\r\n"))[:-2]
    except asyncio.IncompleteReadError:
        raise _ProtocolError("server closed the connection mid-answer") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("a chunk line over 64 KiB") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = await _read_line(reader)
        size = _CHUNK_SIZE.fullmatch(line)
        if size is None:
            raise _ProtocolError(f"a malformed chunk size: {line[:80]!r}")
        length = int(size.group(1), 16)
        if length == 0:
            break
        total += length
        if total > _MAX_UNFRAMED:
            raise _ProtocolError("a chunked answer over 16 MiB")
        chunks.append(await _read_exactly(reader, length))
        if await _read_exactly(reader, 2) != b"\r\n":
            raise _ProtocolError("a chunk without its CRLF")
    while await _read_line(reader):  # trailer fields, up to the blank line
        pass
    return b"".join(chunks)


# --- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    origin: Origin
    path: bytes
    host: bytes
    url: httpx.URL


class PooledClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` over a ``PooledTransport``, with a lean path for provider calls.

    ``post_bytes`` hands one ready request straight to the transport: no ``httpx.Request`` is
    built (one is made only for an exception to name), the request head is encoded and
    checked once per URL and header set, and the answer is read synchronously into an
    ``httpx.Response`` (no async generators per answer: each one is registered with the event
    loop and is garbage for the cycle collector). It skips the client machinery provider
    calls never use (cookie jar, auth flows, redirect handling, event hooks, base-URL
    merging). Everything else — ``post``, ``send``, ``stream`` — is plain httpx.
    """

    def __init__(self, *, transport: PooledTransport, timeout: httpx.Timeout, **kwargs: Any):
        super().__init__(transport=transport, timeout=timeout, **kwargs)
        self.pooled = transport
        self._timeouts = self.timeout.as_dict()
        self._defaults = list(self.headers.raw)
        self._targets: dict[str, _Target] = {}
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}

    async def post_bytes(
        self, url: str, content: bytes, headers: Mapping[str, str]
    ) -> httpx.Response:
        """POST ``content`` with the client's default headers overridden by ``headers``;
        returns the answer read whole. Raises httpx's exceptions, like ``post``."""
        target = self._targets.get(url)
        if target is None:  # a provider posts to one or two URLs: parse each once
            target = self._target(url)
        given = tuple(headers.items())
        head = self._heads.get((url, given))
        if head is None:  # per-request headers (a signature) miss; fixed ones hit
            head = self._head(url, target, given)
        status, answer, body = await self.pooled.exchange(
            target.origin,
            b"%sContent-Length: %d\r\n" % (head, len(content)),
            content,
            self._timeouts,
            lambda: self._request(target, content, headers),
        )
        response = httpx.Response(
            status, headers=answer, stream=httpx.ByteStream(body), extensions=_HTTP_11
        )
        response.read()  # decodes any Content-Encoding, as ``aread`` would
        return response

    def _target(self, url: str) -> _Target:
        if len(self._targets) >= _CACHE_LIMIT:
            self._targets.clear()
        parsed = httpx.URL(url)
        scheme = parsed.scheme
        if scheme not in ("http", "https") or not parsed.host:
            raise httpx.UnsupportedProtocol(f"cannot POST to {url!r}")
        port = parsed.port or (443 if scheme == "https" else 80)
        target = _Target((scheme, parsed.host, port), parsed.raw_path, parsed.netloc, parsed)
        self._targets[url] = target
        return target

    def _head(self, url: str, target: _Target, given: tuple[tuple[str, str], ...]) -> bytes:
        """The request head without Content-Length: Host, the client's defaults not
        overridden, then ``given`` (as httpx orders them)."""
        if len(self._heads) >= _CACHE_LIMIT:
            self._heads.clear()
        names = {name.lower() for name, _ in given}
        if names & {"host", "content-length", "transfer-encoding"}:
            raise httpx.LocalProtocolError("post_bytes sets Host and Content-Length itself")
        fields = [(b"Host", target.host)]
        fields += [(k, v) for k, v in self._defaults if k.decode("latin-1").lower() not in names]
        fields += [(k.encode("ascii"), v.encode("ascii")) for k, v in given]  # as httpx does
        head = self._heads[(url, given)] = request_head(b"POST", target.path, fields)
        return head

    def _request(
        self, target: _Target, content: bytes, headers: Mapping[str, str]
    ) -> httpx.Request:
        names = {name.lower() for name in headers}
        merged = [(k, v) for k, v in self.headers.items() if k.lower() not in names]
        merged.extend(headers.items())
        return httpx.Request("POST", target.url, content=content, headers=merged)


log = logging.getLogger(__name__)
_logged: set[str] = set()
PROXY_SCHEMES: Final = ("https", "http", "all")


def environment_proxies() -> dict[str, str]:
    """The proxies the environment names for HTTP(S) (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, either case), by scheme."""
    found = urllib.request.getproxies()
    return {scheme: found[scheme] for scheme in PROXY_SCHEMES if found.get(scheme)}


def _log_once(kind: str, message: str, **extra: Any) -> None:
    if kind not in _logged:
        _logged.add(kind)
        log.info(message, extra={"transport": kind, **extra})


def provider_client(
    *,
    max_connections: int,
    timeout: httpx.Timeout,
    ssl_context: ssl.SSLContext | None = None,
    keepalive_expiry: float = 30.0,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """A client for provider calls: a ``PooledClient`` (``client``), or, when the environment
    names a proxy, httpx's own client, which goes through it (minding ``NO_PROXY``): the
    pooled transport speaks to origins directly only. Which one is logged once."""
    proxies = environment_proxies()
    if proxies:
        _log_once(
            "httpx",
            "provider HTTP calls use httpx's transport: the environment names a proxy",
            proxy_schemes=sorted(proxies),
        )
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        return httpx.AsyncClient(
            limits=limits,
            timeout=timeout,
            verify=ssl_context if ssl_context is not None else True,
            trust_env=True,
            **kwargs,
        )
    _log_once("pooled", "provider HTTP calls use the pooled HTTP/1.1 transport (no proxy set)")
    return client(
        max_connections=max_connections,
        timeout=timeout,
        ssl_context=ssl_context,
        keepalive_expiry=keepalive_expiry,
        **kwargs,
    )


def client(
    *,
    max_connections: int,
    timeout: httpx.Timeout,
    ssl_context: ssl.SSLContext | None = None,
    keepalive_expiry: float = 30.0,
    **kwargs: Any,
) -> PooledClient:
    """A ``PooledClient``: an ``httpx.AsyncClient`` over a ``PooledTransport`` (no proxy:
    ``provider_client`` chooses)."""
    transport = PooledTransport(
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
        ssl_context=ssl_context,
    )
    return PooledClient(transport=transport, timeout=timeout, **kwargs)
