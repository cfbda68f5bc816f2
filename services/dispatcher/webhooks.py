"""Provider webhooks → outcome events.

``POST /v1/webhooks/sendgrid`` (ECDSA-signed event webhook), ``/v1/webhooks/postmark`` (HTTP
Basic credentials) and ``/v1/webhooks/twilio`` (``X-Twilio-Signature`` over our public URL and
the form). A bad, missing or stale signature is a 401 problem and counts in
``winback_dispatcher_webhook_signature_failures_total``; an endpoint without its setting is a
404. The routes only verify and translate: each provider event becomes a CloudEvent whose id
is the provider's event id, and the shared pipeline's inbox makes a redelivered event
harmless. The handler finds the delivery (our idempotency key echoed in custom args or
metadata, else the provider message id), emits ``message.delivered/opened/clicked/bounced/
complained``, ``message.failed`` (dropped) or ``customer.unsubscribed``, and puts the address
on the suppression list after a hard bounce, a spam complaint or an unsubscribe.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from services.dispatcher import metrics, store
from services.dispatcher.model import (
    CUSTOMER_UNSUBSCRIBED,
    MESSAGE_BOUNCED,
    MESSAGE_CLICKED,
    MESSAGE_COMPLAINED,
    MESSAGE_DELIVERED,
    MESSAGE_FAILED,
    MESSAGE_OPENED,
    Delivery,
    address_hash,
    customer_key_hash,
    outcome,
)
from services.dispatcher.reconcile import EventMatch, confirm_from_events
from services.dispatcher.signatures import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    TWILIO_SIGNATURE_HEADER,
    SendGridWebhookVerifier,
    SignatureError,
    StaleSignatureError,
    TwilioRequestValidator,
    verify_basic_auth,
)
from shared import domain_events as de
from shared.clock import Clock
from shared.cloudevents import CloudEvent
from shared.errors import InvalidEvent
from shared.http.problems import Problem
from shared.messaging.pipeline import Incoming, Pipeline, Tx

KIND_TYPES: Final = {
    "delivered": MESSAGE_DELIVERED,
    "opened": MESSAGE_OPENED,
    "clicked": MESSAGE_CLICKED,
    "bounced": MESSAGE_BOUNCED,
    "complained": MESSAGE_COMPLAINED,
    "failed": MESSAGE_FAILED,
    "unsubscribed": CUSTOMER_UNSUBSCRIBED,
}
IGNORED: Final = "ignored"
TWILIO_IDEMPOTENCY_HEADER: Final = "I-Twilio-Idempotency-Token"
MAX_WEBHOOK_BYTES: Final = 5 * 1024 * 1024


class Received(BaseModel):
    received: int
    duplicates: int
    ignored: int


# -- what each provider sends, for the OpenAPI document (the routes read the raw body: the
# signature is over its bytes). Fields we read are named; providers send more, all allowed.
_TEXT: Final = {"type": "string"}
_SENDGRID_BODY: Final = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["event"],
        "properties": {
            "event": {**_TEXT, "examples": ["delivered", "open", "bounce", "spamreport"]},
            "email": _TEXT,
            "timestamp": {"type": "integer", "description": "Unix seconds"},
            "sg_event_id": _TEXT,
            "sg_message_id": _TEXT,
            "type": {**_TEXT, "description": "bounce type: bounce or blocked"},
            "status": _TEXT,
            "reason": _TEXT,
            "idempotency_key": {**_TEXT, "description": "our custom arg"},
        },
    },
}
_POSTMARK_BODY: Final = {
    "type": "object",
    "required": ["RecordType"],
    "properties": {
        "RecordType": {
            **_TEXT,
            "examples": ["Delivery", "Bounce", "SpamComplaint", "Open", "Click"],
        },
        "ID": {"type": ["integer", "string"]},
        "MessageID": _TEXT,
        "Recipient": _TEXT,
        "Email": _TEXT,
        "Type": _TEXT,
        "Inactive": {"type": "boolean"},
        "DeliveredAt": _TEXT,
        "BouncedAt": _TEXT,
        "ReceivedAt": _TEXT,
        "ChangedAt": _TEXT,
        "OriginalLink": _TEXT,
        "SuppressSending": {"type": "boolean"},
        "SuppressionReason": _TEXT,
        "Metadata": {"type": "object", "description": "ours: idempotency_key"},
    },
}
_TWILIO_BODY: Final = {
    "type": "object",
    "required": ["MessageSid", "MessageStatus"],
    "properties": {
        "MessageSid": {**_TEXT, "minLength": 1},
        "MessageStatus": {**_TEXT, "minLength": 1},
        **{name: _TEXT for name in ("ErrorCode", "To", "From", "AccountSid")},
    },
    "additionalProperties": _TEXT,
}


class _DocumentedBasic(HTTPBasic):
    """Declares HTTP Basic in the OpenAPI document and checks nothing: the route checks the
    credentials itself (a 401 counted as a signature failure, a 404 when unconfigured)."""

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        return None


def _header(name: str, description: str, required: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": _TEXT,
        "description": description,
    }


def _body(media_type: str, schema: dict[str, Any], *headers: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {media_type: {"schema": schema}}}
    }
    if headers:
        extra["parameters"] = list(headers)
    return extra


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One provider event, read from a webhook. ``kind`` is a key of ``KIND_TYPES`` or
    ``ignored``; ``suppress`` says the address must get nothing more."""

    provider: str
    event_id: str
    kind: str
    channel: str
    idempotency_key: str | None = None
    message_ids: tuple[str, ...] = ()
    address: str | None = None
    reason: str | None = None
    suppress: bool = False
    occurred_at: str | None = None

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        data["message_ids"] = list(self.message_ids)
        return data

    @classmethod
    def from_data(cls, data: Any) -> ProviderEvent:
        if not isinstance(data, dict):
            raise InvalidEvent("invalid_payload", "data must be a JSON object", "data")
        try:
            return cls(**{**data, "message_ids": tuple(data.get("message_ids") or ())})
        except TypeError as exc:
            raise InvalidEvent("invalid_payload", str(exc), "data") from None


def _unix(value: Any) -> str | None:
    """A provider's Unix-seconds time as ISO 8601; ``None`` when it is not a number or out of
    the range a datetime holds (a signed event may still carry any number: never a 500)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).isoformat()
        except (OverflowError, ValueError, OSError):
            return None
    return None


def _digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --- SendGrid -------------------------------------------------------------------------------

_SENDGRID_KINDS: Final = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "bounce": "bounced",
    "dropped": "failed",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
_SENDGRID_DEAD_DROPS: Final = (
    "bounced address",
    "unsubscribed address",
    "spam reporting address",
    "invalid",
)


def parse_sendgrid(payload: Any) -> list[ProviderEvent]:
    """SendGrid's event webhook body: a JSON array of events (custom args at top level)."""
    if not isinstance(payload, list):
        raise ValueError("the SendGrid event webhook body must be a JSON array")
    events = []
    for raw in payload:
        if not isinstance(raw, dict) or not isinstance(raw.get("event"), str):
            raise ValueError("every SendGrid event needs an 'event' name")
        name = raw["event"]
        kind = _SENDGRID_KINDS.get(name, IGNORED)
        suppress = kind in ("complained", "unsubscribed")
        reason = None
        if name == "bounce":
            soft = raw.get("type") == "blocked"
            suppress = not soft
            reason = ("soft" if soft else "hard") + " bounce" + _status(raw.get("status"))
        elif name == "dropped":
            text = str(raw.get("reason") or "dropped")
            suppress = text.strip().lower().startswith(_SENDGRID_DEAD_DROPS)
            reason = f"dropped by SendGrid: {text[:100]}"
        elif kind == "unsubscribed":
            reason = f"SendGrid {name.replace('_', ' ')}"
        message_id = _str(raw.get("sg_message_id"))
        ids: tuple[str, ...] = ()
        if message_id:
            ids = tuple(dict.fromkeys([message_id.split(".filter")[0], message_id.split(".")[0]]))
        event_id = _str(raw.get("sg_event_id")) or _digest(
            "sendgrid", json.dumps(raw, sort_keys=True)
        )
        events.append(
            ProviderEvent(
                provider="sendgrid",
                event_id=event_id,
                kind=kind,
                channel="email",
                idempotency_key=_str(raw.get("idempotency_key")),
                message_ids=ids,
                address=_str(raw.get("email")),
                reason=reason,
                suppress=suppress,
                occurred_at=_unix(raw.get("timestamp")),
            )
        )
    return events


def _status(value: Any) -> str:
    return f" ({value})" if isinstance(value, str) and len(value) <= 12 else ""


# --- Postmark -------------------------------------------------------------------------------

_POSTMARK_HARD: Final = frozenset(
    {"HardBounce", "BadEmailAddress", "ManuallyDeactivated", "SpamComplaint", "Unsubscribe"}
)


def parse_postmark(payload: Any) -> list[ProviderEvent]:
    """One Postmark webhook: a JSON object with ``RecordType``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("RecordType"), str):
        raise ValueError("a Postmark webhook must be a JSON object with RecordType")
    record = payload["RecordType"]
    message_id = _str(payload.get("MessageID"))
    metadata = payload.get("Metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    base = ProviderEvent(
        provider="postmark",
        event_id="",
        kind=IGNORED,
        channel="email",
        idempotency_key=_str(metadata.get("idempotency_key")),
        message_ids=(message_id,) if message_id else (),
    )
    if record == "Delivery":
        return [
            replace(
                base,
                event_id=f"Delivery:{message_id}:{payload.get('Recipient')}",
                kind="delivered",
                address=_str(payload.get("Recipient")),
                occurred_at=_str(payload.get("DeliveredAt")),
            )
        ]
    if record == "Bounce":
        bounce = str(payload.get("Type") or "Bounce")
        hard = bool(payload.get("Inactive")) or bounce in _POSTMARK_HARD
        return [
            replace(
                base,
                event_id=f"Bounce:{payload.get('ID') or message_id}",
                kind="bounced",
                address=_str(payload.get("Email")),
                reason=("hard" if hard else "soft") + f" bounce ({bounce[:40]})",
                suppress=hard,
                occurred_at=_str(payload.get("BouncedAt")),
            )
        ]
    if record == "SpamComplaint":
        return [
            replace(
                base,
                event_id=f"SpamComplaint:{payload.get('ID') or message_id}",
                kind="complained",
                address=_str(payload.get("Email")),
                reason="spam complaint",
                suppress=True,
                occurred_at=_str(payload.get("BouncedAt")),
            )
        ]
    if record in ("Open", "Click"):
        at = _str(payload.get("ReceivedAt"))
        return [
            replace(
                base,
                event_id=f"{record}:{message_id}:{at}:{_digest(payload.get('OriginalLink'))}",
                kind="opened" if record == "Open" else "clicked",
                address=_str(payload.get("Recipient")),
                occurred_at=at,
            )
        ]
    if record == "SubscriptionChange":
        at = _str(payload.get("ChangedAt"))
        stop = bool(payload.get("SuppressSending"))
        why = str(payload.get("SuppressionReason") or "")
        kind = {"HardBounce": "bounced", "SpamComplaint": "complained"}.get(why, "unsubscribed")
        return [
            replace(
                base,
                event_id=f"SubscriptionChange:{message_id}:{at}:{stop}",
                kind=kind if stop else IGNORED,
                address=_str(payload.get("Recipient")),
                reason=f"Postmark suppression ({why[:40]})" if stop else None,
                suppress=stop,
                occurred_at=at,
            )
        ]
    return [replace(base, event_id=_digest("postmark", record, message_id))]


# --- Twilio ---------------------------------------------------------------------------------

_TWILIO_DEAD_NUMBER: Final = frozenset({"21211", "21614", "30005", "30006"})
_TWILIO_STOPPED: Final = "21610"


def parse_twilio(form: Mapping[str, str], idempotency_token: str | None) -> list[ProviderEvent]:
    """A Twilio status callback (form fields)."""
    sid = form.get("MessageSid") or form.get("SmsSid")
    status = form.get("MessageStatus") or form.get("SmsStatus")
    if not sid or not status:
        raise ValueError("a Twilio status callback needs MessageSid and MessageStatus")
    code = (form.get("ErrorCode") or "").strip()
    kind = {"delivered": "delivered", "read": "opened"}.get(status, IGNORED)
    suppress = False
    reason = None
    if status in ("undelivered", "failed"):
        kind = "bounced"
        reason = f"{status} (Twilio error {code})" if code else status
        suppress = code in _TWILIO_DEAD_NUMBER
        if code == _TWILIO_STOPPED:
            kind, suppress, reason = "unsubscribed", True, "recipient replied STOP (21610)"
    return [
        ProviderEvent(
            provider="twilio",
            event_id=idempotency_token or f"{sid}:{status}:{code}",
            kind=kind,
            channel="sms",
            message_ids=(sid,),
            address=form.get("To") or None,
            reason=reason,
            suppress=suppress,
        )
    ]


# --- the handler (inside the shared pipeline's transaction) --------------------------------------


class WebhookHandler:
    """Maps deduplicated provider events to outcome events and suppressions."""

    def __init__(self, outcomes_topic: str, provider_names: Mapping[str, Sequence[str]]) -> None:
        self.outcomes_topic = outcomes_topic
        self.provider_names = {kind: list(names) for kind, names in provider_names.items()}

    def decode(self, event: CloudEvent) -> ProviderEvent:
        return ProviderEvent.from_data(event.data)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        events: list[ProviderEvent] = [i.payload for i in items]
        names = sorted({n for e in events for n in self.provider_names.get(e.provider, [])})
        rows = await store.find_for_events(
            tx.conn,
            [e.idempotency_key for e in events if e.idempotency_key],
            [m for e in events for m in e.message_ids],
            names,
        )
        by_key = {r["idempotency_key"]: Delivery.from_row(r) for r in rows}
        by_message = {
            r["provider_message_id"]: by_key[r["idempotency_key"]]
            for r in rows
            if r["provider_message_id"]
        }
        # a delivery a crash left unknown: any event about it confirms it sent (reconcile.py)
        row_of = {r["idempotency_key"]: r for r in rows}
        matches = [
            EventMatch(
                row_of[d.idempotency_key],
                e.kind,
                (self.provider_names.get(e.provider) or [e.provider])[0],
                e.message_ids[0] if e.message_ids else None,
            )
            for e in events
            if (d := self._match(e, by_key, by_message)) is not None
        ]
        await confirm_from_events(tx, self.outcomes_topic, matches)
        suppress: list[store.Suppression] = []
        for item, event in zip(items, events, strict=True):
            delivery = self._match(event, by_key, by_message)
            customer = delivery.customer_id if delivery is not None else None
            suppress += _suppressions(event, customer)
            if delivery is None or event.kind not in KIND_TYPES:
                metrics.WEBHOOK_EVENTS.labels(event.provider, "unmatched").inc()
                continue
            metrics.WEBHOOK_EVENTS.labels(event.provider, "handled").inc()
            type = KIND_TYPES[event.kind]
            data = outcome(
                type,
                delivery,
                provider=delivery.provider or event.provider,
                provider_message_id=delivery.provider_message_id
                or (event.message_ids[0] if event.message_ids else None),
                reason=event.reason,
                reported=(event.occurred_at, event.event_id),
            )
            tx.emit(
                self.outcomes_topic,
                delivery.customer_id,
                type,
                data.to_data(),
                cause=item.event,
                subject=delivery.customer_id,
            )
        await store.add_suppressions(tx.conn, suppress, tx.now)

    @staticmethod
    def _match(
        event: ProviderEvent, by_key: Mapping[str, Delivery], by_message: Mapping[str, Delivery]
    ) -> Delivery | None:
        return by_key.get(event.idempotency_key or "") or next(
            (by_message[m] for m in event.message_ids if m in by_message), None
        )


def _suppressions(event: ProviderEvent, customer_id: str | None) -> list[store.Suppression]:
    if not event.suppress:
        return []
    reason = {"complained": "spam complaint", "unsubscribed": "unsubscribed"}.get(
        event.kind, f"{event.provider} {event.kind}"
    )
    rows = []
    if event.address:
        rows.append(
            store.Suppression(
                event.channel, address_hash(event.channel, event.address), reason, customer_id
            )
        )
    if event.kind == "unsubscribed" and customer_id is not None:
        rows.append(
            store.Suppression(
                event.channel, customer_key_hash(event.channel, customer_id), reason, customer_id
            )
        )
    return rows


# --- the routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookAuth:
    """What each endpoint checks; ``None`` = the endpoint is not configured (404)."""

    sendgrid: SendGridWebhookVerifier | None = None
    twilio: TwilioRequestValidator | None = None
    postmark: tuple[str, str] | None = None
    public_base_url: str = ""


def router(pipeline: Pipeline, auth: WebhookAuth, clock: Clock) -> APIRouter:
    api = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
    responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "not the provider's payload shape (problem+json)"},
        401: {"description": "bad, missing or stale signature (problem+json)"},
        404: {"description": "this webhook is not configured (problem+json)"},
    }

    async def accept(provider: str, events: Iterable[ProviderEvent]) -> JSONResponse:
        items: list[Incoming[Any]] = []
        ignored = 0
        for event in events:
            if event.kind == IGNORED:
                ignored += 1
                continue
            cloud = CloudEvent(
                id=event.event_id,
                source=f"/webhooks/{provider}",
                type=f"{de.PREFIX}.provider.{provider}.{event.kind}",
                time=clock.now(),
                data=event.to_data(),
            )
            items.append(pipeline.decode_payload(cloud, None, None))
        if ignored:
            metrics.WEBHOOK_EVENTS.labels(provider, "ignored").inc(ignored)
        duplicates = 0
        if items:
            result = await pipeline.transact_reliably(items)
            duplicates = result.duplicates
            if duplicates:
                metrics.WEBHOOK_EVENTS.labels(provider, "duplicate").inc(duplicates)
        return JSONResponse(
            {"received": len(items) + ignored, "duplicates": duplicates, "ignored": ignored}
        )

    def refuse(provider: str, exc: SignatureError) -> Problem:
        kind = "stale" if isinstance(exc, StaleSignatureError) else "invalid"
        if exc.reason.startswith("missing"):
            kind = "missing"
        metrics.WEBHOOK_SIGNATURE_FAILURES.labels(provider, kind).inc()
        return Problem(401, "Unauthorized", f"webhook signature refused: {exc.reason}")

    def not_configured(provider: str) -> Problem:
        metrics.WEBHOOK_SIGNATURE_FAILURES.labels(provider, "not_configured").inc()
        return Problem(404, "Not found", f"the {provider} webhook is not configured")

    async def body_of(request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            raise Problem(413, "Request too large", f"{len(body)} bytes")
        return body

    @api.post(
        "/sendgrid",
        response_model=Received,
        responses={**responses, 413: {"description": "request too large (problem+json)"}},
        summary="SendGrid signed event webhook",
        operation_id="receiveSendgridEvents",
        openapi_extra=_body(
            "application/json",
            _SENDGRID_BODY,
            _header(SENDGRID_SIGNATURE_HEADER, "base64 ECDSA signature of timestamp + body"),
            _header(SENDGRID_TIMESTAMP_HEADER, "Unix seconds; a few minutes old at most"),
        ),
    )
    async def sendgrid(request: Request) -> JSONResponse:
        if auth.sendgrid is None:
            raise not_configured("sendgrid")
        body = await body_of(request)
        try:
            auth.sendgrid.verify(
                body,
                request.headers.get(SENDGRID_SIGNATURE_HEADER),
                request.headers.get(SENDGRID_TIMESTAMP_HEADER),
            )
        except SignatureError as exc:
            raise refuse("sendgrid", exc) from None
        try:
            events = parse_sendgrid(json.loads(body))
        except ValueError as exc:
            raise Problem(400, "Not a SendGrid event batch", str(exc)) from None
        return await accept("sendgrid", events)

    @api.post(
        "/postmark",
        response_model=Received,
        responses={**responses, 413: {"description": "request too large (problem+json)"}},
        summary="Postmark webhook (HTTP Basic)",
        operation_id="receivePostmarkEvents",
        # documents the credentials; the route checks them itself (401, or 404 unconfigured)
        dependencies=[Depends(_DocumentedBasic(scheme_name="PostmarkBasic"))],
        openapi_extra=_body("application/json", _POSTMARK_BODY),
    )
    async def postmark(request: Request) -> JSONResponse:
        if auth.postmark is None:
            raise not_configured("postmark")
        try:
            verify_basic_auth(request.headers.get("authorization"), *auth.postmark)
        except SignatureError as exc:
            problem = refuse("postmark", exc)
            problem.headers = {"WWW-Authenticate": 'Basic realm="postmark"'}
            raise problem from None
        body = await body_of(request)
        try:
            events = parse_postmark(json.loads(body))
        except ValueError as exc:
            raise Problem(400, "Not a Postmark webhook", str(exc)) from None
        return await accept("postmark", events)

    @api.post(
        "/twilio",
        response_model=Received,
        responses={**responses, 413: {"description": "request too large (problem+json)"}},
        summary="Twilio status callback",
        operation_id="receiveTwilioStatus",
        openapi_extra=_body(
            "application/x-www-form-urlencoded",
            _TWILIO_BODY,
            _header(TWILIO_SIGNATURE_HEADER, "HMAC-SHA1 of our public URL and the form"),
            _header(TWILIO_IDEMPOTENCY_HEADER, "Twilio's retry token", required=False),
        ),
    )
    async def twilio(request: Request) -> JSONResponse:
        if auth.twilio is None:
            raise not_configured("twilio")
        body = await body_of(request)
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "Not a form", "the body is not form-encoded") from None
        url = auth.public_base_url.rstrip("/") + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        try:
            auth.twilio.verify(url, pairs, request.headers.get(TWILIO_SIGNATURE_HEADER))
        except SignatureError as exc:
            raise refuse("twilio", exc) from None
        try:
            events = parse_twilio(dict(pairs), request.headers.get(TWILIO_IDEMPOTENCY_HEADER))
        except ValueError as exc:
            raise Problem(400, "Not a Twilio status callback", str(exc)) from None
        return await accept("twilio", events)

    return api
