"""HubSpot CRM v3 tasks (``POST /crm/v3/objects/tasks``) for personal outreach.

Bearer private-app token; ``201`` with the task ``id``. Every task is associated with the
customer's contact (association type 204, task → contact): HubSpot's published spec makes
``associations`` required, and a task that names nobody cannot be acted on. The contact is
``OutboundMessage.to`` when the profile carries the CRM's contact id; otherwise it is looked up
by email (``POST /crm/v3/objects/contacts/search``, ``email EQ``) and, when
``create_missing_contacts`` is on, created (``POST /crm/v3/objects/contacts``; a 409 "already
exists" names the existing id, which is used). The id is cached per customer in an in-process
LRU (``ContactCache``, shared by the adapter's pooled clients; lost at restart, which costs one
search). No contact and none to be created: a permanent ``no_crm_contact`` error, never an
unassociated task.

What was sent so far for the case (``sent_so_far``) is known only at send time: with a
``history`` lookup the task is rendered again with it (``CrmTaskDetails.rerender``).

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
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from services.dispatcher.errors import PermanentSendError, SendError, TransientSendError
from services.dispatcher.providers.base import (
    CrmTaskDetails,
    OutboundMessage,
    SendResult,
    generic_error,
    json_body,
    parse_retry_after,
    post,
    truncate,
)
from services.dispatcher.rendering import Channel, RenderedMessage
from shared.clock import Clock, SystemClock

DEFAULT_BASE_URL: Final = "https://api.hubapi.com"
TASK_TO_CONTACT: Final = 204
NO_CONTACT: Final = "no_crm_contact"
_EXISTING_ID: Final = re.compile(r"Existing ID:\s*([0-9]+)")

SentSteps = Callable[[str, str, str], Awaitable[Sequence[str]]]
"""``(customer_id, case_id, idempotency_key)`` → what was already sent for the case (this step
left out); ``services.dispatcher.queries.sent_steps.SentSteps``."""


class ContactCache:
    """Customer id → HubSpot contact id, the ``maxsize`` most recently used (in-process)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._maxsize = maxsize
        self._ids: OrderedDict[str, str] = OrderedDict()

    def get(self, customer_id: str) -> str | None:
        contact = self._ids.get(customer_id)
        if contact is not None:
            self._ids.move_to_end(customer_id)
        return contact

    def put(self, customer_id: str, contact_id: str) -> None:
        self._ids[customer_id] = contact_id
        self._ids.move_to_end(customer_id)
        while len(self._ids) > self._maxsize:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


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
        create_missing_contacts: bool = False,
        contacts: ContactCache | None = None,
        history: SentSteps | None = None,
    ) -> None:
        if not access_token:
            raise ValueError("HubSpotTaskProvider needs an access token")
        self._client = client
        self._token = access_token
        base = base_url.rstrip("/")
        self._url = base + "/crm/v3/objects/tasks"
        self._contacts_url = base + "/crm/v3/objects/contacts"
        self._create_contacts = create_missing_contacts
        self._cache = contacts if contacts is not None else ContactCache()
        self._history = history
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

    def build_request(
        self,
        message: OutboundMessage,
        contact_id: str | None = None,
        content: RenderedMessage | None = None,
    ) -> dict[str, object]:
        """The task JSON for ``message`` associated with ``contact_id`` (default
        ``message.to``); ``crm_task`` details and a contact are required."""
        task = _task(message, self._name)
        contact = contact_id or message.to
        if not contact:
            raise _no_contact(self._name, "the task names no contact")
        content = content or message.content
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
        return {
            "properties": properties,
            "associations": [
                {
                    "to": {"id": contact},
                    "types": [
                        {
                            "associationCategory": "HUBSPOT_DEFINED",
                            "associationTypeId": TASK_TO_CONTACT,
                        }
                    ],
                }
            ],
        }

    async def send(self, message: OutboundMessage) -> SendResult:
        """Find the contact, POST the task; 201 → ``SendResult`` with the task id."""
        task = _task(message, self._name)
        contact = await self.contact_for(message)
        content = message.content
        if self._history is not None and task.rerender and task.case_id and task.customer_id:
            sent = await self._history(task.customer_id, task.case_id, message.idempotency_key)
            if sent:
                content = task.rerender({"sent_so_far": list(sent)})
        response = await self._post(self._url, self.build_request(message, contact, content))
        payload = json_body(response)
        if response.status_code in (200, 201):
            task_id = payload.get("id") if isinstance(payload, dict) else None
            return SendResult(self._name, str(task_id) if task_id else None)
        raise self._error(response, payload)

    async def contact_for(self, message: OutboundMessage) -> str:
        """The contact id the task goes with: the profile's, the cached one, found by email,
        or created; ``no_crm_contact`` when there is none."""
        if message.to:
            return message.to
        task = _task(message, self._name)
        customer = task.customer_id
        if customer:
            cached = self._cache.get(customer)
            if cached is not None:
                return cached
        email = (task.email or "").strip()
        if not email:
            raise _no_contact(self._name, "the customer has no CRM contact id and no email")
        contact = await self._search(email)
        if contact is None:
            if not self._create_contacts:
                raise _no_contact(
                    self._name,
                    "no HubSpot contact has the customer's email and creating contacts is off "
                    "(dispatcher.crm.create_missing_contacts)",
                )
            contact = await self._create(email, task)
        if customer:
            self._cache.put(customer, contact)
        return contact

    async def _search(self, email: str) -> str | None:
        response = await self._post(
            self._contacts_url + "/search",
            {
                "filterGroups": [
                    {"filters": [{"propertyName": "email", "operator": "EQ", "value": email}]}
                ],
                "properties": ["email"],
                "sorts": [],
                "limit": 1,
                "after": "0",
            },
        )
        payload = json_body(response)
        if response.status_code != 200:
            raise self._error(response, payload)
        results = payload.get("results") if isinstance(payload, dict) else None
        if isinstance(results, list) and results and isinstance(results[0], dict):
            found = results[0].get("id")
            return str(found) if found else None
        return None

    async def _create(self, email: str, task: CrmTaskDetails) -> str:
        properties = {"email": email}
        first, _, last = (task.name or "").strip().partition(" ")
        if first:
            properties["firstname"] = first
        if last.strip():
            properties["lastname"] = last.strip()
        if task.phone:
            properties["phone"] = task.phone
        response = await self._post(
            self._contacts_url, {"properties": properties, "associations": []}
        )
        payload = json_body(response)
        created = payload.get("id") if isinstance(payload, dict) else None
        if response.status_code in (200, 201) and created:
            return str(created)
        if response.status_code == 409 and isinstance(payload, dict):
            # created meanwhile (another task for the same customer): HubSpot names it
            existing = _EXISTING_ID.search(str(payload.get("message") or ""))
            if existing is not None:
                return existing.group(1)
        if response.status_code in (200, 201):
            raise _no_contact(self._name, "HubSpot created the contact but returned no id")
        raise self._error(response, payload)

    async def _post(self, url: str, body: dict[str, Any]) -> httpx.Response:
        return await post(
            self._client,
            self._name,
            url,
            json=body,
            headers={"Authorization": f"Bearer {self._token}"},
        )

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


def _task(message: OutboundMessage, provider: str) -> CrmTaskDetails:
    if message.crm_task is None:
        raise PermanentSendError(
            "a CRM task needs owner and due date (crm_task)",
            provider=provider,
            error_code="no_task_details",
        )
    return message.crm_task


def _no_contact(provider: str, why: str) -> PermanentSendError:
    return PermanentSendError(
        f"no CRM contact to associate the task with: {why}",
        provider=provider,
        error_code=NO_CONTACT,
    )


def _hubspot_time(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, as HubSpot shows ``hs_timestamp``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
