"""RFC 8058 one-click unsubscribe and the visible link's confirmation page.

The same ``/u/{token}`` URL is in ``List-Unsubscribe`` and in the message footer; link
scanners and mail filters fetch links, so a GET must never unsubscribe (the very reason RFC
8058 separates POST from GET):

- ``GET /u/{token}`` shows a small page, in the customer's locale when we know it (else
  English), with a button that POSTs back to the same URL. Nothing changes.
- ``POST /u/{token}`` unsubscribes. A mail client's one-click (``List-Unsubscribe-Post:
  List-Unsubscribe=One-Click``: no cookies, no auth) gets 200 JSON, never a redirect, whatever
  its body; the page's form (``confirm=unsubscribe``) gets the page saying it is done.

Both verify the HMAC token without a database lookup, then the POST suppresses at once — the
customer on that channel and every address we know for them go on the suppression list, which
the sender checks right before every send — and emits ``customer.unsubscribed`` (customer id,
channel, method ``one_click`` or ``page``) so the scheduler records the opt-out and ends the
case. A forged or altered token is a 404 problem and suppresses nothing. A second POST of the
same link has no second effect (inbox). The page shows nothing from the request (no token, no
name) and every value it does show is autoescaped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Annotated, Any, Final, Literal, TypeAlias
from urllib.parse import parse_qs

from babel import Locale, UnknownLocaleError
from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import FileSystemLoader, StrictUndefined, Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import metrics, store
from services.dispatcher.model import CUSTOMER_UNSUBSCRIBED, address_hash, customer_key_hash
from services.dispatcher.rendering import DEFAULT_LOCALE, TEMPLATES_DIR
from services.dispatcher.signatures import SignatureError, UnsubscribeClaim, UnsubscribeTokens
from shared import channels
from shared import domain_events as de
from shared.clock import Clock
from shared.cloudevents import CloudEvent
from shared.contracts.customer import CustomerUnsubscribed
from shared.db.tables import deliveries
from shared.errors import InvalidEvent
from shared.http.problems import Problem
from shared.messaging.pipeline import Incoming, Pipeline, Tx

Method: TypeAlias = Literal["one_click", "page"]
SOURCE = "/winback/dispatcher/unsubscribe"
REQUESTED = f"{de.PREFIX}.unsubscribe.requested"
Token = Annotated[str, Path(min_length=8, max_length=1024)]
PAGE_TEMPLATE: Final = "pages/unsubscribe.html"
CONFIRM_FIELD: Final = "confirm"
CONFIRM_VALUE: Final = "unsubscribe"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
MAX_FORM_BYTES: Final = 4096  # the form and the one-click body are a few dozen bytes
# the page must not be cached, indexed, framed (a click on it unsubscribes) or leak its URL
PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

log = logging.getLogger(__name__)


class UnsubscribeHandler:
    def __init__(self, outcomes_topic: str) -> None:
        self.outcomes_topic = outcomes_topic

    def decode(self, event: CloudEvent) -> CustomerUnsubscribed:
        """The request (customer, channel, method) is the event's own contract, less the time
        it took effect: the handler adds that."""
        return CustomerUnsubscribed.decode(event.data)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        rows: list[store.Suppression] = []
        for item in items:
            request: CustomerUnsubscribed = item.payload
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
                CustomerUnsubscribed(
                    customer_id=cid,
                    channel=channel,
                    method=request.method,
                    unsubscribed_at=tx.now,
                ).to_data(),
                cause=item.event,
                subject=cid,
            )
        await store.add_suppressions(tx.conn, rows, tx.now)


class UnsubscribePages:
    """The confirmation and done pages in every locale that has ``pages/unsubscribe.html``,
    compiled (and trial-rendered) once at start-up; autoescaped, sandboxed, strict."""

    def __init__(
        self,
        *,
        product: str,
        company: str,
        postal_address: str,
        templates_dir: FilePath = TEMPLATES_DIR,
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(templates_dir),
            undefined=StrictUndefined,
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._brand = {
            "product": product,
            "company_name": company,
            "postal_address": postal_address,
        }
        self._pages: dict[str, Template] = {
            p.name: env.get_template(f"{p.name}/{PAGE_TEMPLATE}")
            for p in sorted(templates_dir.iterdir())
            if p.is_dir() and p.name[0] != "_" and (p / PAGE_TEMPLATE).is_file()
        }
        if DEFAULT_LOCALE not in self._pages:
            raise ValueError(f"no {DEFAULT_LOCALE}/{PAGE_TEMPLATE} in {templates_dir}")
        for locale in self._pages:  # a broken page stops the start, not a customer's click
            for done in (False, True):
                self.render(locale, "email", done=done)

    @property
    def locales(self) -> tuple[str, ...]:
        return tuple(self._pages)

    def locale_for(self, requested: str | None) -> str:
        """The page locale for a customer's locale (``fi-FI`` → ``fi``), else English."""
        if requested and requested.strip():
            try:
                language = Locale.parse(requested.strip().replace("-", "_")).language
            except (UnknownLocaleError, ValueError, TypeError):
                language = None
            if language in self._pages:
                return str(language)
        return DEFAULT_LOCALE

    def render(self, locale: str, channel: str, *, done: bool) -> str:
        page = self._pages.get(locale) or self._pages[DEFAULT_LOCALE]
        lang = locale if locale in self._pages else DEFAULT_LOCALE
        spec = channels.REGISTRY.get(channel)  # the words for the channel's messages
        wording = spec.unsubscribe_wording.get(lang) if spec is not None else None
        return page.render(**self._brand, lang=lang, channel=channel, wording=wording, done=done)


_PROFILE_LOCALE: Final = text(
    "SELECT locale FROM dispatcher_customer_status WHERE customer_id = :id"
)
"""From the scheduler's published read model (migration 0006), not its tables."""


async def customer_locale(engine: AsyncEngine, customer_id: str) -> str | None:
    """The customer's locale: the scheduler's profile, else the latest message we sent them.
    ``None`` when unknown or when the database cannot say (the page is then in English)."""
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(_PROFILE_LOCALE, {"id": customer_id})
            if not found:
                found = await conn.scalar(
                    select(deliveries.c.command["customer"]["locale"].astext)
                    .where(deliveries.c.customer_id == customer_id)
                    .order_by(deliveries.c.id.desc())
                    .limit(1)
                )
    except (SQLAlchemyError, OSError) as exc:
        log.warning("unsubscribe page: customer locale lookup failed (%s)", type(exc).__name__)
        return None
    return str(found) if found else None


async def _form_confirms(request: Request) -> bool:
    """Whether the POST is the page's confirming form (``confirm=unsubscribe``, urlencoded)
    rather than a mail client's one-click; reads at most ``MAX_FORM_BYTES`` of the body."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != FORM_TYPE:
        return False
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return False
    fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=20)
    return CONFIRM_VALUE in fields.get(CONFIRM_FIELD, [])


_PAGE_CONTENT: Final = {"text/html": {"schema": {"type": "string"}}}
_REQUEST_BODY: Final[dict[str, Any]] = {
    "required": False,
    "content": {
        FORM_TYPE: {
            "schema": {
                "type": "object",
                "properties": {
                    "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]},
                    CONFIRM_FIELD: {"type": "string", "enum": [CONFIRM_VALUE]},
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}},
            }
        },
    },
}


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
    pages = UnsubscribePages(product=product, company=company, postal_address=postal_address)
    not_valid: dict[str, Any] = {"description": "the token is not valid (problem+json)"}

    def verify(token: str, method: str) -> UnsubscribeClaim:
        try:
            return tokens.verify(token)
        except SignatureError as exc:
            metrics.UNSUBSCRIBES.labels(method, "rejected").inc()
            raise Problem(
                404, "Not found", f"not a valid unsubscribe link ({exc.reason})"
            ) from None

    async def unsubscribe(token: str, method: Method) -> UnsubscribeClaim:
        claim = verify(token, method)
        try:  # a signed token names a channel of ours, unless a plug-in channel was removed
            request = CustomerUnsubscribed.decode(
                {"customer_id": claim.customer_id, "channel": claim.channel, "method": method}
            )
        except InvalidEvent as exc:
            metrics.UNSUBSCRIBES.labels(method, "rejected").inc()
            reason = f"not a valid unsubscribe link ({exc.reason})"
            raise Problem(404, "Not found", reason) from None
        event = CloudEvent(
            id=hashlib.sha256(token.strip().encode()).hexdigest()[:40],
            source=SOURCE,
            type=REQUESTED,
            time=clock.now(),
            data=request.to_data(),
        )
        await pipeline.transact_reliably([pipeline.decode_payload(event, None, None)])
        metrics.UNSUBSCRIBES.labels(method, "accepted").inc()
        return claim

    async def page(claim: UnsubscribeClaim, *, done: bool) -> HTMLResponse:
        locale = pages.locale_for(await customer_locale(pipeline.engine, claim.customer_id))
        return HTMLResponse(
            pages.render(locale, claim.channel, done=done),
            headers={**PAGE_HEADERS, "Content-Language": locale},
        )

    @api.post(
        "/u/{token}",
        responses={
            200: {
                "description": "unsubscribed: JSON for a one-click POST, the done page for "
                "the page's form",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "unsubscribed": {"type": "boolean"},
                                "channel": {"type": "string"},
                            },
                        }
                    },
                    **_PAGE_CONTENT,
                },
            },
            404: not_valid,
        },
        openapi_extra={"requestBody": _REQUEST_BODY},
        operation_id="unsubscribe",
        summary="Unsubscribe: RFC 8058 one-click (no auth, 200, never a redirect) or the "
        "confirmation page's form",
    )
    async def post(token: Token, request: Request) -> Response:
        if await _form_confirms(request):
            claim = await unsubscribe(token, "page")
            return await page(claim, done=True)
        claim = await unsubscribe(token, "one_click")
        return JSONResponse({"unsubscribed": True, "channel": claim.channel})

    @api.get(
        "/u/{token}",
        responses={
            200: {"description": "the confirmation page", "content": _PAGE_CONTENT},
            404: not_valid,
        },
        response_class=HTMLResponse,
        operation_id="getUnsubscribePage",
        summary="The unsubscribe link in every message: a page asking to confirm (a GET "
        "changes nothing)",
    )
    async def confirm(token: Token) -> HTMLResponse:
        return await page(verify(token, "page"), done=False)

    return api
