"""Postmark single email (``POST /email``, header ``X-Postmark-Server-Token``).

Success is ``200`` with ``{"MessageID", "ErrorCode": 0}``. Errors come as
``{"ErrorCode", "Message"}`` — usually with ``422`` — and are read by their code:

- 406 inactive recipient (hard bounce, spam complaint or manual suppression) → permanent,
  suppress the address;
- 300 invalid email request → permanent (validation), no suppression;
- 10 bad or missing token, 400/401 sender signature missing/unconfirmed, 405 not allowed to
  send, 412/413 account pending or may not send → ``ProviderConfigurationError`` (fails over);
- 429 rate limited, 100 maintenance, HTTP 5xx → transient.

Idempotency: Postmark has no idempotency key. The key is put in ``Metadata`` (echoed in its
webhooks) so a duplicate could be detected; preventing one is the delivery row's job.
Win-back email is marketing, so the default message stream is ``broadcast``.
"""

from __future__ import annotations

from typing import Final

import httpx

from services.dispatcher.errors import (
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TransientSendError,
)
from services.dispatcher.providers.base import (
    OutboundMessage,
    SendResult,
    check_email_address,
    generic_error,
    json_body,
    parse_retry_after,
    post,
    truncate,
)
from services.dispatcher.rendering import Channel
from shared.clock import Clock, SystemClock

DEFAULT_BASE_URL: Final = "https://api.postmarkapp.com"
INACTIVE_RECIPIENT: Final = 406
INVALID_EMAIL_REQUEST: Final = 300
_CONFIGURATION_CODES: Final = frozenset({10, 400, 401, 405, 412, 413})
_TRANSIENT_CODES: Final = frozenset({100, 429})


class PostmarkProvider:
    """Sends email through Postmark with a server token."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        server_token: str,
        from_address: str,
        base_url: str = DEFAULT_BASE_URL,
        message_stream: str = "broadcast",
        name: str = "postmark",
        clock: Clock | None = None,
    ) -> None:
        if not server_token:
            raise ValueError("PostmarkProvider needs a server token")
        self._client = client
        self._token = server_token
        self._from = from_address
        self._url = base_url.rstrip("/") + "/email"
        self._stream = message_stream
        self._name = name
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.EMAIL

    def build_request(self, message: OutboundMessage) -> dict[str, object]:
        """The ``/email`` JSON body for ``message``."""
        content = message.content
        if content.subject is None:
            raise PermanentSendError(
                "email needs a subject", provider=self._name, error_code="no_subject"
            )
        body: dict[str, object] = {
            "From": self._from,
            "To": message.to,
            "Subject": content.subject,
            "TextBody": content.text,
            "Tag": content.template,
            "Metadata": {**message.tags, "idempotency_key": message.idempotency_key},
            "MessageStream": self._stream,
        }
        if content.html is not None:
            body["HtmlBody"] = content.html
        headers = message.list_unsubscribe_headers()
        if headers:
            body["Headers"] = [{"Name": k, "Value": v} for k, v in headers.items()]
        return body

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; 200 with ``ErrorCode`` 0 → ``SendResult`` with ``MessageID``."""
        check_email_address(self._name, message.to)
        response = await post(
            self._client,
            self._name,
            self._url,
            json=self.build_request(message),
            headers={"Accept": "application/json", "X-Postmark-Server-Token": self._token},
        )
        payload = json_body(response)
        code = _error_code(payload)
        if response.status_code == 200 and code in (None, 0):
            message_id = payload.get("MessageID") if isinstance(payload, dict) else None
            return SendResult(self._name, str(message_id) if message_id else None)
        raise self._error(response, payload, code)

    def _error(self, response: httpx.Response, payload: object, code: int | None) -> SendError:
        text = payload.get("Message") if isinstance(payload, dict) else None
        detail = truncate(str(text)) if text else None
        status = response.status_code
        if code is None or code == 0:
            return generic_error(self._name, response, self._clock, detail=detail)
        provider, error_code = self._name, str(code)
        if code == INACTIVE_RECIPIENT:
            return PermanentSendError(
                detail or "recipient is inactive (bounced, complained or suppressed)",
                provider=provider,
                status_code=status,
                error_code=error_code,
                suppress=True,
            )
        if code in _CONFIGURATION_CODES or status in (401, 403):
            return ProviderConfigurationError(
                detail or "account cannot send",
                provider=provider,
                status_code=status,
                error_code=error_code,
            )
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientSendError(
                detail or "temporarily unavailable",
                provider=provider,
                status_code=status,
                error_code=error_code,
                retry_after=parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                ),
            )
        return PermanentSendError(
            detail or "request rejected",
            provider=provider,
            status_code=status,
            error_code=error_code,
        )


def _error_code(payload: object) -> int | None:
    if not isinstance(payload, dict):
        return None
    code = payload.get("ErrorCode")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().isdigit():
        return int(code)
    return None


class PostmarkOutboundSearch:
    """Postmark's outbound message search by our idempotency key (``GET /messages/outbound``
    with ``metadata_idempotency_key``; the key rides in every message's ``Metadata``): does
    Postmark have the message a crash left unknown? (``reconcile.Search``)"""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        server_token: str,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "postmark",
    ) -> None:
        self._client = client
        self._token = server_token
        self._url = base_url.rstrip("/") + "/messages/outbound"
        self.name = name

    async def find(self, idempotency_key: str) -> str | None:
        """The ``MessageID`` of a message sent with this key, ``None`` if there is none;
        raises ``httpx.HTTPError`` (or ``ValueError`` for a body not of the documented shape)
        when Postmark cannot answer."""
        response = await self._client.get(
            self._url,
            params={"count": 1, "offset": 0, "metadata_idempotency_key": idempotency_key},
            headers={"Accept": "application/json", "X-Postmark-Server-Token": self._token},
        )
        response.raise_for_status()
        payload = json_body(response)
        messages = payload.get("Messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list):
            raise ValueError("Postmark's outbound search answered without a Messages list")
        for message in messages:
            if not isinstance(message, dict) or not message.get("MessageID"):
                continue
            metadata = message.get("Metadata")
            if isinstance(metadata, dict) and metadata.get("idempotency_key") not in (
                None,
                idempotency_key,
            ):
                continue  # not ours after all
            return str(message["MessageID"])
        return None
