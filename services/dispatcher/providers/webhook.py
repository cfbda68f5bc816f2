"""Generic signed webhook channel: POST the rendered message as JSON to a configured URL.

The receiver verifies ``X-Winback-Signature: t=<unix>,v1=<hex>``, an HMAC-SHA256 with the
shared secret over ``"{t}.{raw_body}"`` (see ``signatures.verify_winback_webhook``), and
deduplicates on the ``Idempotency-Key`` header (also the body's ``id``): this is our own
protocol, so the idempotency key is part of it. Any 2xx is success; the message id is the
response's JSON ``id`` when it sends one, else the idempotency key. 408/425/429/5xx are
transient; 410 Gone means the receiver will never take messages for this recipient
(permanent, suppress); other 4xx are permanent.
"""

from __future__ import annotations

import json
from typing import Final

import httpx

from services.dispatcher.errors import PermanentSendError, SendError
from services.dispatcher.providers.base import (
    OutboundMessage,
    SendResult,
    generic_error,
    json_body,
    post,
)
from services.dispatcher.rendering import Channel
from services.dispatcher.signatures import WINBACK_SIGNATURE_HEADER, sign_winback_webhook
from shared.clock import Clock, SystemClock

EVENT_TYPE: Final = "com.winback.message.requested"


class WebhookProvider:
    """Delivers messages to a system of the customer's choosing over signed HTTP."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        url: str,
        secret: bytes,
        name: str = "webhook",
        clock: Clock | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the webhook secret must be at least 16 bytes")
        self._client = client
        self._url = url
        self._secret = secret
        self._name = name
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.WEBHOOK

    def build_body(self, message: OutboundMessage) -> bytes:
        """The exact bytes that are signed and sent."""
        content = message.content
        document = {
            "id": message.idempotency_key,
            "type": EVENT_TYPE,
            "to": message.to,
            "template": content.template,
            "locale": content.locale,
            "subject": content.subject,
            "text": content.text,
            "html": content.html,
            "tags": dict(message.tags),
            "unsubscribe_url": message.unsubscribe_url,
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the signed JSON; any 2xx → ``SendResult``."""
        body = self.build_body(message)
        timestamp = int(self._clock.now().timestamp())
        response = await post(
            self._client,
            self._name,
            self._url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": message.idempotency_key,
                WINBACK_SIGNATURE_HEADER: sign_winback_webhook(self._secret, body, timestamp),
            },
        )
        if 200 <= response.status_code < 300:
            payload = json_body(response)
            remote_id = payload.get("id") if isinstance(payload, dict) else None
            return SendResult(self._name, str(remote_id) if remote_id else message.idempotency_key)
        raise self._error(response)

    def _error(self, response: httpx.Response) -> SendError:
        if response.status_code == 410:
            return PermanentSendError(
                "receiver no longer accepts messages for this recipient",
                provider=self._name,
                status_code=410,
                suppress=True,
            )
        return generic_error(self._name, response, self._clock)
