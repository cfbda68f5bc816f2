"""SendGrid v3 Mail Send (``POST /v3/mail/send``) for email.

Success is ``202 Accepted`` with the message id in the ``X-Message-Id`` header; event webhooks
later report ``sg_message_id`` values that start with it.

Idempotency: the Mail Send API has no idempotency key. The key is sent as the custom arg
``idempotency_key`` (with the other non-PII tags), so every event webhook carries it back and a
duplicate could be detected after the fact; preventing one is the delivery row's job.

Errors: 400/413 carry ``{"errors": [{"message", "field"}]}`` and are permanent (validation);
401/403 are configuration errors; 429 is transient, with ``Retry-After`` or, failing that, the
``X-RateLimit-Reset`` epoch turned into seconds; 5xx is transient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import httpx

from services.dispatcher.errors import PermanentSendError
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

DEFAULT_BASE_URL: Final = "https://api.sendgrid.com"


class SendGridProvider:
    """Sends email through SendGrid with an API key (``Authorization: Bearer``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        api_key: str,
        from_email: str,
        from_name: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        categories: Sequence[str] = ("winback",),
        name: str = "sendgrid",
        clock: Clock | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("SendGridProvider needs an API key")
        self._client = client
        self._api_key = api_key
        self._from = {"email": from_email} | ({"name": from_name} if from_name else {})
        self._url = base_url.rstrip("/") + "/v3/mail/send"
        self._categories = list(categories)
        self._name = name
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.EMAIL

    def build_request(self, message: OutboundMessage) -> dict[str, object]:
        """The Mail Send JSON body for ``message``."""
        content = message.content
        if content.subject is None:
            raise PermanentSendError(
                "email needs a subject", provider=self._name, error_code="no_subject"
            )
        parts = [{"type": "text/plain", "value": content.text}]
        if content.html is not None:
            parts.append({"type": "text/html", "value": content.html})
        custom_args = {**message.tags, "idempotency_key": message.idempotency_key}
        categories = [*self._categories]
        if content.template not in categories:
            categories.append(content.template)
        body: dict[str, object] = {
            "personalizations": [{"to": [{"email": message.to}]}],
            "from": self._from,
            "subject": content.subject,
            "content": parts,
            "custom_args": custom_args,
            "categories": categories[:10],
        }
        headers = message.list_unsubscribe_headers()
        if headers:
            body["headers"] = headers
        return body

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; 202 → ``SendResult`` with ``X-Message-Id``."""
        check_email_address(self._name, message.to)
        response = await post(
            self._client,
            self._name,
            self._url,
            json=self.build_request(message),
            headers={"Authorization": f"Bearer {self._api_key}"},
        )
        if response.status_code in (200, 202):
            return SendResult(self._name, response.headers.get("X-Message-Id"))
        raise self._error(response)

    def _error(self, response: httpx.Response) -> Exception:
        payload = json_body(response)
        detail = None
        if isinstance(payload, dict) and isinstance(payload.get("errors"), list):
            messages = [str(e.get("message")) for e in payload["errors"] if isinstance(e, dict)]
            detail = truncate("; ".join(m for m in messages if m)) or None
        retry_after = None
        if response.status_code == 429:
            now = self._clock.now()
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
            reset = response.headers.get("X-RateLimit-Reset")
            if retry_after is None and reset is not None and reset.strip().isdigit():
                retry_after = max(0.0, float(reset) - now.timestamp())
        return generic_error(
            self._name, response, self._clock, detail=detail, retry_after=retry_after
        )
