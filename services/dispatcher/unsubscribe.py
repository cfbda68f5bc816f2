"""RFC 8058 one-click unsubscribe and the visible link's confirmation page.

``POST /u/{token}`` (what mail clients send for ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click``: no cookies, no auth; we answer 200, never a redirect) and
``GET /u/{token}`` (the link in the message footer: a small HTML page) both verify the HMAC
token without a database lookup, then suppress at once — the customer on that channel and
every address we know for them go on the suppression list, which the sender checks right
before every send — and emit ``customer.unsubscribed`` (customer id, channel) so the
scheduler records the opt-out and ends the case. A forged or altered token is a 404 problem
and suppresses nothing. A second click of the same link has no second effect (inbox).
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse, JSONResponse

from services.dispatcher import metrics, store
from services.dispatcher.model import CUSTOMER_UNSUBSCRIBED, address_hash, customer_key_hash
from services.dispatcher.signatures import SignatureError, UnsubscribeClaim, UnsubscribeTokens
from shared import domain_events as de
from shared.clock import Clock
from shared.cloudevents import CloudEvent
from shared.errors import InvalidEvent
from shared.http.problems import Problem
from shared.messaging.pipeline import Incoming, Pipeline, Tx

SOURCE = "/winback/dispatcher/unsubscribe"
REQUESTED = f"{de.PREFIX}.unsubscribe.requested"
Token = Annotated[str, Path(min_length=8, max_length=1024)]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    customer_id: str
    channel: str
    method: str


class UnsubscribeHandler:
    def __init__(self, outcomes_topic: str) -> None:
        self.outcomes_topic = outcomes_topic

    def decode(self, event: CloudEvent) -> Unsubscribe:
        data = event.data
        if not isinstance(data, dict) or not data.get("customer_id") or not data.get("channel"):
            raise InvalidEvent("invalid_payload", "customer_id and channel are required", "data")
        return Unsubscribe(str(data["customer_id"]), str(data["channel"]), str(data["method"]))

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        rows: list[store.Suppression] = []
        for item in items:
            request: Unsubscribe = item.payload
            cid, channel = request.customer_id, request.channel
            rows.append(
                store.Suppression(channel, customer_key_hash(channel, cid), "unsubscribed", cid)
            )
            for address in await store.contact_points(tx.conn, cid, channel):
                rows.append(
                    store.Suppression(channel, address_hash(channel, address), "unsubscribed", cid)
                )
            tx.emit(
                self.outcomes_topic,
                cid,
                CUSTOMER_UNSUBSCRIBED,
                {
                    "customer_id": cid,
                    "channel": channel,
                    "method": request.method,
                    "unsubscribed_at": tx.now.isoformat(),
                },
                cause=item.event,
                subject=cid,
            )
        await store.add_suppressions(tx.conn, rows, tx.now)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Unsubscribed</title></head>
<body style="font-family:Arial,Helvetica,sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
<h1>You are unsubscribed</h1>
<p>You will get no more {channel} messages from {product} about coming back.
It took effect at once; you do not need to do anything else.</p>
<p style="color:#666666;font-size:small">{company}, {address}</p>
</body></html>
"""


def router(
    pipeline: Pipeline,
    tokens: UnsubscribeTokens,
    clock: Clock,
    *,
    product: str,
    company: str,
    postal_address: str,
) -> APIRouter:
    api = APIRouter(tags=["unsubscribe"])
    responses: dict[int | str, dict[str, Any]] = {
        404: {"description": "the token is not valid (problem+json)"}
    }

    async def unsubscribe(token: str, method: str) -> UnsubscribeClaim:
        try:
            claim = tokens.verify(token)
        except SignatureError as exc:
            metrics.UNSUBSCRIBES.labels(method, "rejected").inc()
            raise Problem(
                404, "Not found", f"not a valid unsubscribe link ({exc.reason})"
            ) from None
        event = CloudEvent(
            id=hashlib.sha256(token.strip().encode()).hexdigest()[:40],
            source=SOURCE,
            type=REQUESTED,
            time=clock.now(),
            data={"customer_id": claim.customer_id, "channel": claim.channel, "method": method},
        )
        await pipeline.transact_reliably([pipeline.decode_payload(event, None, None)])
        metrics.UNSUBSCRIBES.labels(method, "accepted").inc()
        return claim

    @api.post(
        "/u/{token}",
        responses=responses,
        summary="RFC 8058 one-click unsubscribe (no auth, 200, never a redirect)",
    )
    async def one_click(token: Token) -> JSONResponse:
        claim = await unsubscribe(token, "one_click")
        return JSONResponse({"unsubscribed": True, "channel": claim.channel})

    @api.get(
        "/u/{token}",
        responses=responses,
        response_class=HTMLResponse,
        summary="The unsubscribe link in every message: unsubscribes and confirms",
    )
    async def page(token: Token) -> HTMLResponse:
        claim = await unsubscribe(token, "page")
        channel = {"email": "email", "sms": "text", "webhook": "notification"}.get(
            claim.channel, claim.channel
        )
        return HTMLResponse(
            _PAGE.format(
                channel=html.escape(channel),
                product=html.escape(product),
                company=html.escape(company),
                address=html.escape(postal_address),
            )
        )

    return api
