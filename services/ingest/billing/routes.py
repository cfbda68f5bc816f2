"""``POST /v1/billing/stripe|paddle|chargebee``: billing webhooks in, no code to write.

Authenticated by each provider's own scheme (``auth.py``), not our API key. A connector is off
— 404 — until its secret is configured (``WINBACK_BILLING__<PROVIDER>__…``); a request without
the provider's signature header is a 400 either way. A missing, bad or stale signature is a
400 problem (Chargebee's missing or wrong credentials: 401 with ``WWW-Authenticate: Basic``),
counted, and nothing is recorded. A verified event is mapped
by the provider's pure mapping and goes through the same pipeline as ``POST /v1/events``, in
one transaction: the CloudEvent's id is the provider's event id (source
``/billing/<provider>``), so a retried delivery is a duplicate; its time is the provider's
event time. A type we do not act on is answered 200 and counted as ignored (a 4xx would make
the provider retry and in the end disable the endpoint). A verified event our contract still
refuses (a customer id over 200 characters, a time in the future) goes to the dead-letter topic
with the reason and is answered 200: it is kept, and the provider stops retrying it.
No call to the provider is made on the request path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import Counter
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from services.ingest.billing import chargebee, paddle, stripe
from services.ingest.billing.auth import (
    PADDLE_HEADER,
    STRIPE_HEADER,
    SignatureError,
    verify_basic,
    verify_paddle,
    verify_stripe,
)
from services.ingest.billing.common import BillingPayloadError, Mapped
from shared.cloudevents import CloudEvent
from shared.errors import InvalidEvent
from shared.http.problems import Problem
from shared.messaging.pipeline import DeadLetter, Pipeline
from shared.messaging.transport import Record
from shared.settings import BillingSettings

log = logging.getLogger(__name__)

WEBHOOKS: Final = Counter(
    "winback_billing_webhooks_total",
    "Billing webhook deliveries, by provider and outcome: accepted, duplicate, ignored, "
    "dead_lettered, bad_payload, signature_missing, signature_invalid, signature_stale, "
    "not_configured",
    ["provider", "outcome"],
)
MAX_BODY_BYTES: Final = 1024 * 1024


class Received(BaseModel):
    received: int
    duplicates: int
    ignored: int
    dead_lettered: int


@dataclass(frozen=True)
class Connector:
    provider: str
    header: str
    """The header that carries the signature or credentials."""
    check: Callable[[Request, bytes], None] | None
    """Raises ``SignatureError``; ``None`` = not configured."""
    read: Callable[[Any], Mapped]


def connectors(settings: BillingSettings) -> dict[str, Connector]:
    s, p, c = settings.stripe, settings.paddle, settings.chargebee
    stripe_secrets = [k.get_secret_value() for k in s.webhook_secrets]
    paddle_secrets = [k.get_secret_value() for k in p.webhook_secrets]

    def check_stripe(request: Request, body: bytes) -> None:
        verify_stripe(body, request.headers.get(STRIPE_HEADER), stripe_secrets, s.tolerance_seconds)

    def check_paddle(request: Request, body: bytes) -> None:
        verify_paddle(body, request.headers.get(PADDLE_HEADER), paddle_secrets, p.tolerance_seconds)

    credentials = (
        (c.username, c.password.get_secret_value())
        if c.username is not None and c.password is not None
        else None
    )

    def check_chargebee(request: Request, body: bytes) -> None:
        assert credentials is not None
        verify_basic(request.headers.get("authorization"), *credentials)

    return {
        "stripe": Connector(
            "stripe",
            STRIPE_HEADER,
            check_stripe if stripe_secrets else None,
            partial(stripe.map_event, id_key=s.customer_id_key),
        ),
        "paddle": Connector(
            "paddle",
            PADDLE_HEADER,
            check_paddle if paddle_secrets else None,
            partial(paddle.map_event, id_key=p.customer_id_key),
        ),
        "chargebee": Connector(
            "chargebee",
            "Authorization",
            check_chargebee if credentials else None,
            partial(chargebee.map_event, id_key=c.customer_id_key),
        ),
    }


_SIGNATURE_HEADERS: Final = {
    "stripe": (STRIPE_HEADER, "t=<unix>,v1=<hex HMAC-SHA256 of t.body>"),
    "paddle": (PADDLE_HEADER, "ts=<unix>;h1=<hex HMAC-SHA256 of ts:body>"),
}
_SUMMARIES: Final = {
    "stripe": "Stripe webhook (Stripe-Signature)",
    "paddle": "Paddle Billing notification (Paddle-Signature)",
    "chargebee": "Chargebee webhook (HTTP Basic)",
}


def _openapi(provider: str) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "description": f"a {provider} event"}
                }
            },
        }
    }
    if provider in _SIGNATURE_HEADERS:
        name, description = _SIGNATURE_HEADERS[provider]
        extra["parameters"] = [
            {
                "name": name,
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
                "description": description,
            }
        ]
    return extra


class _DocumentedBasic(HTTPBasic):
    """Declares HTTP Basic in the OpenAPI document and checks nothing: the route checks the
    credentials itself (401, or 404 while the connector is not configured)."""

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        return None


def router(pipeline: Pipeline, settings: BillingSettings, type_prefix: str) -> APIRouter:
    api = APIRouter(prefix="/v1/billing", tags=["billing"])
    table = connectors(settings)
    prefix = type_prefix.rstrip(".")
    responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "missing, bad or stale signature, or not an event (problem+json)"},
        404: {"description": "this connector is not configured (problem+json)"},
        413: {"description": "request too large (problem+json)"},
    }

    def refusal(provider: str, exc: SignatureError) -> Problem:
        if provider == "chargebee":  # credentials, not a signature: HTTP's own answer
            return Problem(
                401,
                "Unauthorized",
                f"{provider} webhook: {exc.reason}",
                type=f"/problems/credentials-{exc.kind}",
                headers={"WWW-Authenticate": 'Basic realm="winback-chargebee"'},
            )
        return Problem(
            400,
            "Signature refused",
            f"{provider} webhook: {exc.reason}",
            type=f"/problems/signature-{exc.kind}",
        )

    async def receive(provider: str, request: Request) -> JSONResponse:
        connector = table[provider]
        if not request.headers.get(connector.header):
            # unsigned: refused the same whether the connector is on or not
            WEBHOOKS.labels(provider, "signature_missing").inc()
            raise refusal(provider, SignatureError("missing", f"no {connector.header} header"))
        if connector.check is None:
            WEBHOOKS.labels(provider, "not_configured").inc()
            raise Problem(404, "Not found", f"the {provider} connector is not configured")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            WEBHOOKS.labels(provider, "bad_payload").inc()
            raise Problem(413, "Request too large", f"{len(body)} bytes")
        try:
            connector.check(request, body)
        except SignatureError as exc:
            WEBHOOKS.labels(provider, f"signature_{exc.kind}").inc()
            raise refusal(provider, exc) from None
        try:
            mapped = connector.read(json.loads(body))
        except (ValueError, RecursionError) as exc:
            WEBHOOKS.labels(provider, "bad_payload").inc()
            reason = str(exc) if isinstance(exc, BillingPayloadError) else "not JSON"
            raise Problem(
                400, f"Not a {provider} event", reason, type="/problems/bad-billing-event"
            ) from None
        return await accept(mapped, body, request.url.path)

    async def accept(mapped: Mapped, body: bytes, path: str) -> JSONResponse:
        provider = mapped.provider
        counts = {"received": 1, "duplicates": 0, "ignored": 0, "dead_lettered": 0}
        if mapped.name is None:
            WEBHOOKS.labels(provider, "ignored").inc()
            return JSONResponse({**counts, "ignored": 1})
        customer = mapped.data.get("customer_id")
        event = CloudEvent(
            id=mapped.event_id,
            source=f"/billing/{provider}",
            type=f"{prefix}.{mapped.name}",
            time=mapped.occurred_at,
            data=mapped.data,
            subject=customer if isinstance(customer, str) else None,
        )
        try:
            item = pipeline.decode_payload(event, None, None)
        except Exception as exc:
            # a bug meeting input it did not expect is still the event at fault: kept, not a 500
            error = (
                exc
                if isinstance(exc, InvalidEvent)
                else InvalidEvent("decode_error", f"{type(exc).__name__}: {exc}"[:500])
            )
            log.warning(
                "a verified billing event was refused; dead-lettered",
                extra={"provider": provider, "code": error.code, "field": error.field},
            )
            record = Record(
                topic=f"http:{path}",
                partition=0,
                offset=0,
                key=mapped.event_id.encode(),
                value=body,
                headers=(("billing-event-type", mapped.provider_type.encode()),),
            )
            await pipeline.transact_reliably([], [DeadLetter(record, error, pipeline.consumer)])
            WEBHOOKS.labels(provider, "dead_lettered").inc()
            return JSONResponse({**counts, "dead_lettered": 1})
        result = await pipeline.transact_reliably([item])
        outcome = "duplicate" if result.duplicates else "accepted"
        WEBHOOKS.labels(provider, outcome).inc()
        return JSONResponse({**counts, "duplicates": result.duplicates})

    def endpoint(provider: str) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def post(request: Request) -> JSONResponse:
            return await receive(provider, request)

        return post

    for name in table:
        basic = name == "chargebee"
        api.add_api_route(
            f"/{name}",
            endpoint(name),
            methods=["POST"],
            response_model=Received,
            responses={
                **responses,
                401: {"description": "missing or wrong credentials (problem+json)"},
            }
            if basic
            else responses,
            dependencies=[Depends(_DocumentedBasic(scheme_name="ChargebeeBasic"))]
            if basic
            else None,
            summary=_SUMMARIES[name],
            openapi_extra=_openapi(name),
            name=f"billing_{name}",
            operation_id=f"post{name.capitalize()}Webhook",
        )
    return api
