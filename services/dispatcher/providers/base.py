"""What every provider adapter takes and returns, and the HTTP plumbing they share.

An adapter turns one ``OutboundMessage`` into one HTTP request to one provider API and maps the
answer to a ``SendResult`` or to the error hierarchy in ``services.dispatcher.errors``:

- timeouts and connection errors → ``TransientSendError`` (``ambiguous`` when the request may
  have been received: read/write timeouts, a connection dropped before the answer);
- 408, 425, 429 and 5xx → ``TransientSendError`` with ``retry_after`` from ``Retry-After``
  (seconds or HTTP date) or the provider's rate-limit headers;
- 401/403 → ``ProviderConfigurationError``; other 4xx → ``PermanentSendError`` unless the
  adapter knows better from the provider's error code.

Adapters never retry: retries, circuit breaking, rate limiting and failover are in
``services.dispatcher.resilience``.
"""

from __future__ import annotations

import re
from base64 import b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal, Protocol, runtime_checkable
from urllib.parse import urlencode

import httpx
import orjson

from services.dispatcher.errors import (
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TransientSendError,
)
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.transport import PooledClient
from shared.clock import Clock

TaskPriority = Literal["LOW", "MEDIUM", "HIGH"]
TaskType = Literal["CALL", "EMAIL", "TODO"]

_TAG_KEY: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EMAIL: Final = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+")
_E164: Final = re.compile(r"\+[1-9][0-9]{6,14}")


@dataclass(frozen=True, slots=True)
class CrmTaskDetails:
    """What a CRM task needs beyond its rendered subject and body."""

    owner_id: str
    due_at: datetime
    priority: TaskPriority = "HIGH"
    task_type: TaskType = "CALL"
    # who the task is about: the CRM adapter finds (or creates) the contact from these
    customer_id: str | None = None
    case_id: str | None = None
    email: str | None = None
    name: str | None = None
    phone: str | None = None
    rerender: Callable[[Mapping[str, Any]], RenderedMessage] | None = field(
        default=None, compare=False, repr=False
    )
    """Renders the task again with more fields (``sent_so_far``, known only at send time)."""

    def __post_init__(self) -> None:
        if self.due_at.tzinfo is None:
            raise ValueError("CrmTaskDetails.due_at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one recipient, ready for a provider.

    ``idempotency_key`` is stable for a (case, step): it is sent to providers that deduplicate
    on a key and echoed in provider metadata so webhooks can be matched back.
    ``to`` is an email address (email), an E.164 number (SMS), the CRM contact id (CRM task;
    may be empty for an unassociated task) or a recipient reference (webhook).
    ``tags`` are non-PII identifiers (customer_id, case_id, step_id, template, variant …)
    copied into provider metadata such as SendGrid ``custom_args``: never addresses or names.
    ``unsubscribe_url`` (and optionally ``unsubscribe_mailto``) become the RFC 8058
    ``List-Unsubscribe`` headers on email.
    """

    idempotency_key: str
    channel: Channel
    to: str
    content: RenderedMessage
    tags: Mapping[str, str] = field(default_factory=dict)
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    crm_task: CrmTaskDetails | None = None

    def __post_init__(self) -> None:
        if not self.idempotency_key.strip():
            raise ValueError("OutboundMessage needs an idempotency key")
        for key, value in self.tags.items():
            if not _TAG_KEY.fullmatch(key):
                raise ValueError(f"tag key {key!r} must be 1-64 of [A-Za-z0-9_.-]")
            if "@" in value or _E164.fullmatch(value):
                raise ValueError(f"tag {key!r} looks like an address: tags must hold no PII")
            if not value.isprintable():
                raise ValueError(f"tag {key!r} holds a control or line-break character")

    def list_unsubscribe_headers(self) -> dict[str, str]:
        """RFC 8058 one-click unsubscribe headers, empty when there is no unsubscribe URL."""
        if self.unsubscribe_url is None:
            return {}
        value = f"<{self.unsubscribe_url}>"
        if self.unsubscribe_mailto is not None:
            value += f", <mailto:{self.unsubscribe_mailto}>"
        return {"List-Unsubscribe": value, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


@dataclass(frozen=True, slots=True)
class SendResult:
    """A provider accepted the message. ``provider_message_id`` matches its later webhooks;
    ``None`` only when the provider accepted without returning one."""

    provider: str
    provider_message_id: str | None


@runtime_checkable
class Provider(Protocol):
    """One provider API. ``send`` raises ``TransientSendError`` or ``PermanentSendError``."""

    @property
    def name(self) -> str:
        """Short stable name used in metrics, outcome events and error reasons."""
        ...

    @property
    def channel(self) -> Channel:
        """The channel this provider delivers."""
        ...

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one message; return the provider's message id or raise a ``SendError``."""
        ...


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date.

    Returns ``None`` for a missing or unparseable value, and never a negative number.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        return None
    return max(0.0, seconds)


def check_email_address(provider: str, address: str) -> None:
    """Refuse an address no provider could deliver to (and one that could inject headers)."""
    if not _EMAIL.fullmatch(address):
        raise PermanentSendError(
            "recipient is not a valid email address",
            provider=provider,
            error_code="invalid_address",
            suppress=True,
        )


def check_e164(provider: str, number: str) -> None:
    """Refuse a phone number that is not in E.164 form (``+`` and 7-15 digits)."""
    if not _E164.fullmatch(number):
        raise PermanentSendError(
            "recipient is not an E.164 phone number",
            provider=provider,
            error_code="invalid_number",
            suppress=True,
        )


async def post(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    *,
    headers: Mapping[str, str],
    json: Any = None,
    form: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    """POST a JSON body, a form or raw ``content`` through ``client``, translating transport
    failures into ``TransientSendError``.

    Bodies are encoded here (JSON with orjson: compact UTF-8, as httpx's own ``json=``), and
    over a ``PooledClient`` the request takes its lean path (no cookies, auth flows or
    redirects — provider calls use none of them; credentials are plain headers)."""
    sent = dict(headers)
    if json is not None:
        body = orjson.dumps(json)
        sent.setdefault("Content-Type", "application/json")
    elif form is not None:
        body = urlencode(form).encode()
        sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
    else:
        body = content or b""
    try:
        if isinstance(client, PooledClient):
            return await client.post_bytes(url, body, sent)
        return await client.post(url, content=body, headers=sent)
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise TransientSendError(
            f"could not connect in time ({type(exc).__name__})", provider=provider
        ) from exc
    except httpx.TimeoutException as exc:
        raise TransientSendError(
            f"no answer in time ({type(exc).__name__})", provider=provider, ambiguous=True
        ) from exc
    except httpx.ConnectError as exc:
        raise TransientSendError(f"could not connect ({exc})", provider=provider) from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.ProxyError) as exc:
        raise ProviderConfigurationError(
            f"request could not be made ({type(exc).__name__}: {exc})", provider=provider
        ) from exc
    except httpx.TransportError as exc:
        raise TransientSendError(
            f"connection failed before an answer ({type(exc).__name__})",
            provider=provider,
            ambiguous=True,
        ) from exc


def basic_auth(username: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic credentials (RFC 7617, UTF-8)."""
    return "Basic " + b64encode(f"{username}:{password}".encode()).decode("ascii")


def json_body(response: httpx.Response) -> Any:
    """The response's JSON, or ``None`` when the body is empty or not JSON."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def generic_error(
    provider: str,
    response: httpx.Response,
    clock: Clock,
    *,
    detail: str | None = None,
    error_code: str | None = None,
    retry_after: float | None = None,
) -> SendError:
    """The default reading of a non-success status; adapters refine it with error codes."""
    status = response.status_code
    reason = detail or response.reason_phrase or "error"
    if status in (408, 425, 429) or status >= 500:
        hint = retry_after
        if hint is None:
            hint = parse_retry_after(response.headers.get("Retry-After"), clock.now())
        return TransientSendError(
            reason,
            provider=provider,
            status_code=status,
            error_code=error_code,
            retry_after=hint,
        )
    if status in (401, 403):
        return ProviderConfigurationError(
            reason, provider=provider, status_code=status, error_code=error_code
        )
    return PermanentSendError(reason, provider=provider, status_code=status, error_code=error_code)


def truncate(text: str, limit: int = 200) -> str:
    """Shorten a provider's error text for a reason string."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
