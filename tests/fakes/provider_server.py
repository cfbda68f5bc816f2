"""A fake provider server: real HTTP/1.1 on 127.0.0.1 speaking each provider's API shape.

It answers SendGrid, Postmark, Twilio, HubSpot and the generic signed webhook the way the real
services do on success and on their documented errors, records every request, and injects
faults per provider — for the next N requests or until healed:

- ``Fault.http(503)`` / ``Fault.http(422, json=...)``: answer with that status and body;
- ``Fault.rate_limited(retry_after="2")``: 429 with ``Retry-After``;
- ``Fault.latency(0.05)``: answer normally after a delay;
- ``Fault.hang(30)``: never answer (sleep past any client timeout), then close;
- ``Fault.drop()``: read the request, then close the socket without a byte of answer;
- ``Fault.swallow(60)``: take the message (a real, accepted send), then never answer (close
  after the time): the sender cannot know the provider has it.

Postmark's outbound message search (``GET /messages/outbound?count=&offset=&metadata_<key>=``)
answers over the messages it accepted, filtered on their ``Metadata``.

It is built on h11 and asyncio streams rather than a web framework so that a dropped connection
really is a dropped connection::

    async with FakeProviderServer() as server:
        server.fail_next("sendgrid", Fault.http(503), times=2)
        ...  # point adapters at server.base_url
        assert len(server.accepted("sendgrid")) == 1
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl

import h11

__all__ = [
    "PROVIDERS",
    "FakeProviderServer",
    "Fault",
    "ProviderName",
    "RecordedRequest",
    "hubspot_rate_limit",
    "postmark_error",
    "twilio_error",
]

ProviderName = Literal["sendgrid", "postmark", "twilio", "hubspot", "webhook"]
PROVIDERS: tuple[ProviderName, ...] = ("sendgrid", "postmark", "twilio", "hubspot", "webhook")
_TWILIO_PATH = re.compile(r"/2010-04-01/Accounts/(?P<sid>[^/]+)/Messages\.json")


@dataclass(frozen=True, slots=True)
class Fault:
    """Something to do instead of (or before) a normal answer."""

    kind: Literal["respond", "latency", "hang", "drop", "swallow"]
    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0

    @classmethod
    def http(
        cls, status: int, json_body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Fault:
        body = b"" if json_body is None else json.dumps(json_body).encode()
        return cls("respond", status=status, body=body, headers=tuple((headers or {}).items()))

    @classmethod
    def rate_limited(
        cls,
        retry_after: str | None = "1",
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = retry_after
        return cls.http(429, json_body, all_headers)

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        return cls("latency", seconds=seconds)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def swallow(cls, seconds: float = 30.0) -> Fault:
        return cls("swallow", seconds=seconds)


def twilio_error(code: int, status: int = 400, message: str = "error") -> Fault:
    """A Twilio REST error body, e.g. ``twilio_error(21610)`` for an unsubscribed recipient."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return Fault.http(status, body)


def postmark_error(code: int, status: int = 422, message: str = "error") -> Fault:
    """A Postmark API error body, e.g. ``postmark_error(406)`` for an inactive recipient."""
    return Fault.http(status, {"ErrorCode": code, "Message": message})


def hubspot_rate_limit(
    policy: str = "TEN_SECONDLY_ROLLING", interval_ms: int = 10000, retry_after: str | None = None
) -> Fault:
    """HubSpot's 429: ``errorType: RATE_LIMIT`` with its rate-limit headers."""
    headers = {
        "X-HubSpot-RateLimit-Interval-Milliseconds": str(interval_ms),
        "X-HubSpot-RateLimit-Remaining": "0",
        "X-HubSpot-RateLimit-Max": "100",
    }
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {
        "status": "error",
        "message": "You have reached your ten_secondly_rolling limit.",
        "errorType": "RATE_LIMIT",
        "policyName": policy,
    }
    return Fault.http(429, body, headers)


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake received it, and what it did with it.

    ``received_at`` is ``time.monotonic()`` when the whole request had arrived (before any
    injected latency or fault), for assertions on request rates."""

    provider: ProviderName | None
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    idempotency_key: str | None = None
    fault: str | None = None
    status: int | None = None
    accepted: bool = False
    replayed: bool = False
    received_at: float = 0.0

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass(slots=True)
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    accepted: bool = False
    replayed: bool = False


@dataclass(slots=True)
class _Injection:
    fault: Fault
    remaining: int | None  # None: until healed


class FakeProviderServer:
    """An in-process HTTP server on a free loopback port; use as an async context manager.

    ``credentials`` optionally pins what each provider accepts (``sendgrid``/``hubspot``: the
    bearer token, ``postmark``: the server token, ``twilio``: the auth token); by default any
    non-empty credential passes. ``webhook_secret`` makes the webhook endpoint verify
    ``X-Winback-Signature``. ``keep_bodies=False`` drops request bodies once answered (for
    benchmarks: the records stay, their memory does not grow with message size).
    """

    def __init__(
        self,
        *,
        credentials: Mapping[str, str] | None = None,
        webhook_path: str = "/hooks/winback",
        webhook_secret: bytes | None = None,
        hubspot_idempotency_property: str = "winback_idempotency_key",
        keep_bodies: bool = True,
    ) -> None:
        self._keep_bodies = keep_bodies
        self.requests: list[RecordedRequest] = []
        self._credentials = dict(credentials or {})
        self._webhook_path = webhook_path
        self._webhook_secret = webhook_secret
        self._hubspot_property = hubspot_idempotency_property
        self.hubspot_contacts: dict[str, str] = {}  # email → contact id (contact search)
        self._faults: dict[str, deque[_Injection]] = {p: deque() for p in PROVIDERS}
        self._latency: dict[str, float] = dict.fromkeys(PROVIDERS, 0.0)
        self._seen: dict[tuple[str, str], _Answer] = {}
        self._postmark_sent: list[dict[str, Any]] = []  # for GET /messages/outbound
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return self.base_url + self._webhook_path

    # --- control -----------------------------------------------------------------------

    def fail_next(self, provider: ProviderName, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests for ``provider`` (after earlier ones)."""
        if times < 1:
            raise ValueError("times must be at least 1")
        self._faults[provider].append(_Injection(fault, times))

    def fail_always(self, provider: ProviderName, fault: Fault) -> None:
        """Apply ``fault`` to every request for ``provider`` until ``heal``."""
        self._faults[provider].append(_Injection(fault, None))

    def heal(self, provider: ProviderName | None = None) -> None:
        """Remove pending faults for ``provider`` (all providers when ``None``)."""
        for name in [provider] if provider else list(PROVIDERS):
            self._faults[name].clear()

    def set_latency(self, provider: ProviderName, seconds: float) -> None:
        """Delay every answer from ``provider`` by ``seconds``."""
        self._latency[provider] = seconds

    def reset(self) -> None:
        """Forget recorded requests, faults, latency and idempotency memory."""
        self.requests.clear()
        self.heal()
        self._latency = dict.fromkeys(PROVIDERS, 0.0)
        self._seen.clear()
        self._postmark_sent.clear()

    # --- queries -----------------------------------------------------------------------

    def requests_for(self, provider: ProviderName) -> list[RecordedRequest]:
        return [r for r in self.requests if r.provider == provider]

    def accepted(self, provider: ProviderName | None = None) -> list[RecordedRequest]:
        """Requests that resulted in a real (first-time) send."""
        return [
            r
            for r in self.requests
            if r.accepted and not r.replayed and (provider is None or r.provider == provider)
        ]

    # --- HTTP plumbing -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                received = await self._read(conn, reader)
                if received is None:
                    break
                request, body = received
                if not await self._serve(conn, writer, request, body):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop() cancels handlers; ending quietly keeps asyncio from logging it
        finally:
            self._writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    async def _read(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _serve(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, body: bytes
    ) -> bool:
        """Answer one request; ``False`` when the connection was dropped or must close."""
        path = request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        provider = self._route(request.method.decode(), path)
        record = RecordedRequest(
            provider, request.method.decode(), path, headers, body, received_at=time.monotonic()
        )
        self.requests.append(record)
        if provider is None:
            await self._write(conn, writer, _Answer(404, b'{"error":"not found"}'))
            record.status = 404
            return True
        record.idempotency_key = self._idempotency_key(provider, record)
        fault = self._take_fault(provider)
        delay = self._latency[provider] + (
            fault.seconds if fault and fault.kind == "latency" else 0
        )
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.kind == "swallow":
            answer = self._answer(provider, record)
            record.fault, record.status = fault.kind, answer.status
            record.accepted, record.replayed = answer.accepted, answer.replayed
            await asyncio.sleep(fault.seconds)
            writer.transport.abort()
            return False
        if fault is not None and fault.kind != "latency":
            record.fault = fault.kind if fault.kind != "respond" else f"http {fault.status}"
            if fault.kind == "drop":
                writer.transport.abort()
                return False
            if fault.kind == "hang":
                await asyncio.sleep(fault.seconds)
                writer.transport.abort()
                return False
            answer = _Answer(fault.status, fault.body, dict(fault.headers))
        else:
            answer = self._answer(provider, record)
        record.status = answer.status
        record.accepted = answer.accepted
        record.replayed = answer.replayed
        if not self._keep_bodies:
            record.body = b""
        await self._write(conn, writer, answer)
        return True

    async def _write(self, conn: h11.Connection, writer: asyncio.StreamWriter, a: _Answer) -> None:
        extra = {k: v for k, v in a.headers.items() if k.lower() != "content-type"}
        headers = [
            ("Content-Type", a.headers.get("Content-Type", "application/json")),
            ("Content-Length", str(len(a.body))),
            *extra.items(),
        ]
        data = conn.send(h11.Response(status_code=a.status, headers=headers)) or b""
        if a.body:
            data += conn.send(h11.Data(data=a.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()

    def _route(self, method: str, path: str) -> ProviderName | None:
        route = path.split("?", 1)[0]
        if method == "GET" and route == "/messages/outbound":
            return "postmark"  # the outbound message search
        if method != "POST":
            return None
        if route == "/v3/mail/send":
            return "sendgrid"
        if route == "/email":
            return "postmark"
        if _TWILIO_PATH.fullmatch(route):
            return "twilio"
        if route in ("/crm/v3/objects/tasks", "/crm/v3/objects/contacts/search"):
            return "hubspot"
        if route == self._webhook_path:
            return "webhook"
        return None

    def _take_fault(self, provider: str) -> Fault | None:
        queue = self._faults[provider]
        if not queue:
            return None
        head = queue[0]
        if head.remaining is not None:
            head.remaining -= 1
            if head.remaining == 0:
                queue.popleft()
        return head.fault

    def _idempotency_key(self, provider: ProviderName, record: RecordedRequest) -> str | None:
        try:
            if provider == "sendgrid":
                return _dig(record.json, "custom_args", "idempotency_key")
            if provider == "postmark":
                return _dig(record.json, "Metadata", "idempotency_key")
            if provider == "hubspot":
                return _dig(record.json, "properties", self._hubspot_property)
        except ValueError:
            return None
        if provider == "twilio":
            return record.headers.get("i-twilio-idempotency-token")
        return record.headers.get("idempotency-key")

    # --- provider behaviour ------------------------------------------------------------

    def _answer(self, provider: ProviderName, record: RecordedRequest) -> _Answer:
        handler = {
            "sendgrid": self._sendgrid,
            "postmark": self._postmark,
            "twilio": self._twilio,
            "hubspot": self._hubspot,
            "webhook": self._webhook,
        }[provider]
        return handler(record)

    def _expected(self, provider: str, given: str | None) -> bool:
        if not given:
            return False
        wanted = self._credentials.get(provider)
        return wanted is None or hmac.compare_digest(wanted, given)

    def _sendgrid(self, record: RecordedRequest) -> _Answer:
        auth = record.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not self._expected("sendgrid", auth[7:]):
            return _json(401, {"errors": [{"message": "authorization grant is invalid"}]})
        body = _parse_json(record.body)
        if not isinstance(body, dict) or not body.get("personalizations") or "from" not in body:
            return _json(400, {"errors": [{"message": "personalizations and from are required"}]})
        message_id = uuid.uuid4().hex[:22]
        return _Answer(202, headers={"X-Message-Id": message_id}, accepted=True)

    def _postmark(self, record: RecordedRequest) -> _Answer:
        if not self._expected("postmark", record.headers.get("x-postmark-server-token")):
            return _json(401, {"ErrorCode": 10, "Message": "Bad or missing Server API token."})
        if record.method == "GET":
            return self._postmark_search(record)
        body = _parse_json(record.body)
        if not isinstance(body, dict) or not body.get("To") or not body.get("From"):
            return _json(422, {"ErrorCode": 300, "Message": "Invalid email request"})
        answer = {
            "To": body["To"],
            "SubmittedAt": datetime.now(UTC).isoformat(),
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        }
        metadata = body.get("Metadata")
        self._postmark_sent.append(
            {
                "MessageID": answer["MessageID"],
                "To": [{"Email": body["To"]}],
                "Subject": body.get("Subject"),
                "Status": "Sent",
                "Metadata": metadata if isinstance(metadata, dict) else {},
            }
        )
        return _json(200, answer, accepted=True)

    def _postmark_search(self, record: RecordedRequest) -> _Answer:
        """``GET /messages/outbound``: ``count`` (1-500) and ``offset`` required; each
        ``metadata_<key>=<value>`` filters on the message's Metadata."""
        query = dict(parse_qsl(record.path.partition("?")[2], keep_blank_values=True))
        try:
            count, offset = int(query["count"]), int(query["offset"])
        except (KeyError, ValueError):
            return _json(422, {"ErrorCode": 1302, "Message": "count and offset are required"})
        if not 1 <= count <= 500 or offset < 0:
            return _json(422, {"ErrorCode": 1302, "Message": "count must be 1-500"})
        wanted = {k[9:]: v for k, v in query.items() if k.startswith("metadata_")}
        found = [
            m
            for m in self._postmark_sent
            if all(m["Metadata"].get(k) == v for k, v in wanted.items())
        ]
        page = found[offset : offset + count]
        return _json(200, {"TotalCount": len(found), "Messages": page})

    def _twilio(self, record: RecordedRequest) -> _Answer:
        match = _TWILIO_PATH.fullmatch(record.path.split("?", 1)[0])
        assert match is not None
        sid = match.group("sid")
        user, token = _basic_auth(record.headers.get("authorization"))
        if user != sid or not self._expected("twilio", token):
            return _json(401, {"code": 20003, "message": "Authenticate", "status": 401})
        form = record.form
        if not form.get("To"):
            return _json(400, {"code": 21604, "message": "A 'To' phone number is required."})
        if not form.get("Body"):
            return _json(400, {"code": 21602, "message": "Message body is required."})
        answer = {
            "sid": "SM" + uuid.uuid4().hex,
            "account_sid": sid,
            "to": form["To"],
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": form["Body"],
            "status": "queued",
        }
        return _json(201, answer, accepted=True)

    def _hubspot(self, record: RecordedRequest) -> _Answer:
        auth = record.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not self._expected("hubspot", auth[7:]):
            return _json(401, {"status": "error", "category": "INVALID_AUTHENTICATION"})
        body = _parse_json(record.body)
        if record.path.split("?", 1)[0].endswith("/contacts/search"):
            return self._hubspot_contact(body)
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict) or not props.get("hs_timestamp"):
            return _json(
                400,
                {"status": "error", "category": "VALIDATION_ERROR", "message": "hs_timestamp"},
            )
        key = record.idempotency_key
        if key is not None and ("hubspot", key) in self._seen:
            return _json(409, {"status": "error", "category": "CONFLICT", "message": "exists"})
        answer = _json(201, {"id": str(next(self._ids)), "properties": props}, accepted=True)
        if key is not None:
            self._seen[("hubspot", key)] = answer
        return answer

    def _hubspot_contact(self, body: Any) -> _Answer:
        """Contact search by ``email EQ``: every email has a contact here (ids from 5001, one
        per email), so a task finds whom it is about (the CRM is synced with the product)."""
        try:
            email = body["filterGroups"][0]["filters"][0]["value"]
        except (KeyError, IndexError, TypeError):
            return _json(400, {"status": "error", "category": "VALIDATION_ERROR"})
        contact = self.hubspot_contacts.setdefault(
            str(email), str(5001 + len(self.hubspot_contacts))
        )
        return _json(200, {"total": 1, "results": [{"id": contact, "properties": {}}]})

    def _webhook(self, record: RecordedRequest) -> _Answer:
        if self._webhook_secret is not None and not _winback_signature_ok(
            self._webhook_secret, record.body, record.headers.get("x-winback-signature")
        ):
            return _json(401, {"error": "bad signature"})
        key = record.idempotency_key
        if key is not None and ("webhook", key) in self._seen:
            first = self._seen[("webhook", key)]
            return _Answer(first.status, first.body, dict(first.headers), True, replayed=True)
        answer = _json(200, {"id": f"wh-{next(self._ids)}"}, accepted=True)
        if key is not None:
            self._seen[("webhook", key)] = answer
        return answer


def _json(status: int, body: Any, *, accepted: bool = False) -> _Answer:
    return _Answer(status, json.dumps(body).encode(), accepted=accepted)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _dig(document: Any, *keys: str) -> str | None:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document if isinstance(document, str) else None


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.startswith("Basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return user, password


def _winback_signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """Independent check of ``t=<unix>,v1=<hex>`` over ``"{t}.{body}"`` (no freshness)."""
    if not header:
        return False
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields:
        return False
    expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])
