"""Twilio Programmable Messaging (``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``).

Form-encoded, HTTP Basic ``AccountSid:AuthToken``; ``201 Created`` with the message ``sid``.
Errors are ``{"code", "message", "more_info", "status"}`` and are read by their code:

- 21610 recipient replied STOP, 21211 invalid 'To' number, 21614 'To' is not a mobile
  number → permanent, suppress the number;
- 20003 authentication, 20005 account not active, 21606/21659 'From' not usable →
  ``ProviderConfigurationError`` (fails over);
- HTTP 429 or code 20429 (too many requests) and 5xx → transient with ``Retry-After``;
- anything else 4xx (21408 region not enabled, 21617 body too long, …) → permanent.

Idempotency: the request carries ``I-Twilio-Idempotency-Token`` with the key. Twilio uses that
header on the webhooks it sends; whether its REST API deduplicates on it is not documented, so
treat it as best effort — the delivery row is the guarantee.
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
    basic_auth,
    check_e164,
    generic_error,
    json_body,
    parse_retry_after,
    post,
    truncate,
)
from services.dispatcher.rendering import Channel
from shared.clock import Clock, SystemClock

DEFAULT_BASE_URL: Final = "https://api.twilio.com"
MAX_BODY_CHARS: Final = 1600
UNSUBSCRIBED_RECIPIENT: Final = 21610
TOO_MANY_REQUESTS: Final = 20429
_SUPPRESS_CODES: Final = frozenset({UNSUBSCRIBED_RECIPIENT, 21211, 21614})
_CONFIGURATION_CODES: Final = frozenset({20003, 20005, 21606, 21659})
IDEMPOTENCY_HEADER: Final = "I-Twilio-Idempotency-Token"


class TwilioProvider:
    """Sends SMS through Twilio, from a number or a Messaging Service."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "twilio",
        clock: Clock | None = None,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("TwilioProvider needs an account SID and an auth token")
        if (from_number is None) == (messaging_service_sid is None):
            raise ValueError("give exactly one of from_number and messaging_service_sid")
        self._client = client
        self._auth = basic_auth(account_sid, auth_token)
        self._sender = (
            {"From": from_number}
            if from_number is not None
            else {"MessagingServiceSid": str(messaging_service_sid)}
        )
        self._status_callback = status_callback
        self._url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._name = name
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.SMS

    def build_request(self, message: OutboundMessage) -> dict[str, str]:
        """The form fields for ``message``."""
        body = message.content.text
        if len(body) > MAX_BODY_CHARS:
            raise PermanentSendError(
                f"SMS body is {len(body)} characters, over Twilio's {MAX_BODY_CHARS}",
                provider=self._name,
                error_code="body_too_long",
            )
        form = {"To": message.to, "Body": body, **self._sender}
        if self._status_callback is not None:
            form["StatusCallback"] = self._status_callback
        return form

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; 201 → ``SendResult`` with the message ``sid``."""
        check_e164(self._name, message.to)
        response = await post(
            self._client,
            self._name,
            self._url,
            form=self.build_request(message),
            headers={"Authorization": self._auth, IDEMPOTENCY_HEADER: message.idempotency_key},
        )
        payload = json_body(response)
        if response.status_code in (200, 201):
            sid = payload.get("sid") if isinstance(payload, dict) else None
            return SendResult(self._name, str(sid) if sid else None)
        raise self._error(response, payload)

    def _error(self, response: httpx.Response, payload: object) -> SendError:
        code: int | None = None
        detail: str | None = None
        if isinstance(payload, dict):
            raw = payload.get("code")
            code = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
            if payload.get("message"):
                detail = truncate(str(payload["message"]))
        status = response.status_code
        if code is None:
            return generic_error(self._name, response, self._clock, detail=detail)
        error_code = str(code)
        if code == TOO_MANY_REQUESTS or status == 429 or status >= 500:
            return TransientSendError(
                detail or "too many requests",
                provider=self._name,
                status_code=status,
                error_code=error_code,
                retry_after=parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                ),
            )
        if code in _SUPPRESS_CODES:
            return PermanentSendError(
                detail or "recipient cannot receive messages",
                provider=self._name,
                status_code=status,
                error_code=error_code,
                suppress=True,
                unsubscribed=code == UNSUBSCRIBED_RECIPIENT,
            )
        if code in _CONFIGURATION_CODES or status in (401, 403):
            return ProviderConfigurationError(
                detail or "account cannot send",
                provider=self._name,
                status_code=status,
                error_code=error_code,
            )
        return PermanentSendError(
            detail or "request rejected",
            provider=self._name,
            status_code=status,
            error_code=error_code,
        )
