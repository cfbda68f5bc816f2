"""HubSpot CRM v3 tasks (``POST /crm/v3/objects/tasks``) for personal outreach.

Bearer private-app token; ``201`` with the task ``id``. The task is associated with the contact
in ``OutboundMessage.to`` (association type 204, task → contact) when one is given.

Rate limits: a 429 carries ``{"errorType": "RATE_LIMIT", "policyName": ...}`` and the
``X-HubSpot-RateLimit-*`` headers. The retry hint is ``Retry-After`` when present, else the
rolling window ``X-HubSpot-RateLimit-Interval-Milliseconds`` (the burst window resets within
it); for the ``DAILY`` policy it is ``daily_limit_retry_after`` (default one hour), which a
retry policy will normally treat as "give up and reschedule".

Idempotency: CRM object creation has no idempotency key. If the portal defines a task property
with unique values, name it in ``idempotency_property`` and the key is written to it, so a
duplicate create fails with 409 (reported as a permanent ``duplicate`` error); otherwise the
delivery row is the only guard.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Final

import httpx

from services.dispatcher.errors import PermanentSendError, SendError, TransientSendError
from services.dispatcher.providers.base import (
    OutboundMessage,
    SendResult,
    generic_error,
    json_body,
    parse_retry_after,
    post,
    truncate,
)
from services.dispatcher.rendering import Channel
from shared.clock import Clock, SystemClock

DEFAULT_BASE_URL: Final = "https://api.hubapi.com"
TASK_TO_CONTACT: Final = 204


class HubSpotTaskProvider:
    """Creates a CRM task for a salesperson to call or write to the customer."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        access_token: str,
        base_url: str = DEFAULT_BASE_URL,
        idempotency_property: str | None = None,
        daily_limit_retry_after: float = 3600.0,
        name: str = "hubspot",
        clock: Clock | None = None,
    ) -> None:
        if not access_token:
            raise ValueError("HubSpotTaskProvider needs an access token")
        self._client = client
        self._token = access_token
        self._url = base_url.rstrip("/") + "/crm/v3/objects/tasks"
        self._idempotency_property = idempotency_property
        self._daily_retry_after = daily_limit_retry_after
        self._name = name
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.CRM

    def build_request(self, message: OutboundMessage) -> dict[str, object]:
        """The task JSON for ``message`` (``crm_task`` details are required)."""
        task = message.crm_task
        if task is None:
            raise PermanentSendError(
                "a CRM task needs owner and due date (crm_task)",
                provider=self._name,
                error_code="no_task_details",
            )
        content = message.content
        body_html = "<br>".join(html.escape(line) for line in content.text.splitlines())
        properties: dict[str, str] = {
            "hs_timestamp": _hubspot_time(task.due_at),
            "hs_task_subject": content.subject or content.template,
            "hs_task_body": body_html,
            "hubspot_owner_id": task.owner_id,
            "hs_task_status": "NOT_STARTED",
            "hs_task_priority": task.priority,
            "hs_task_type": task.task_type,
        }
        if self._idempotency_property is not None:
            properties[self._idempotency_property] = message.idempotency_key
        body: dict[str, object] = {"properties": properties}
        if message.to:
            body["associations"] = [
                {
                    "to": {"id": message.to},
                    "types": [
                        {
                            "associationCategory": "HUBSPOT_DEFINED",
                            "associationTypeId": TASK_TO_CONTACT,
                        }
                    ],
                }
            ]
        return body

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the task; 201 → ``SendResult`` with the task id."""
        response = await post(
            self._client,
            self._name,
            self._url,
            json=self.build_request(message),
            headers={"Authorization": f"Bearer {self._token}"},
        )
        payload = json_body(response)
        if response.status_code in (200, 201):
            task_id = payload.get("id") if isinstance(payload, dict) else None
            return SendResult(self._name, str(task_id) if task_id else None)
        raise self._error(response, payload)

    def _error(self, response: httpx.Response, payload: object) -> SendError:
        detail = None
        category = None
        policy = None
        if isinstance(payload, dict):
            if payload.get("message"):
                detail = truncate(str(payload["message"]))
            category = payload.get("errorType") or payload.get("category")
            policy = payload.get("policyName")
        status = response.status_code
        if status == 429 or category == "RATE_LIMIT":
            return TransientSendError(
                detail or "rate limited",
                provider=self._name,
                status_code=status,
                error_code=str(policy or "RATE_LIMIT"),
                retry_after=self._rate_limit_wait(response, policy),
            )
        if status == 409:
            return PermanentSendError(
                detail or "task already exists",
                provider=self._name,
                status_code=status,
                error_code="duplicate",
            )
        return generic_error(
            self._name,
            response,
            self._clock,
            detail=detail,
            error_code=str(category) if category else None,
        )

    def _rate_limit_wait(self, response: httpx.Response, policy: object) -> float | None:
        hint = parse_retry_after(response.headers.get("Retry-After"), self._clock.now())
        if hint is not None:
            return hint
        if policy == "DAILY":
            return self._daily_retry_after
        interval = response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        if interval is not None and interval.strip().isdigit():
            return int(interval) / 1000.0
        return None


def _hubspot_time(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, as HubSpot shows ``hs_timestamp``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
