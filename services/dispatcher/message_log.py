"""The message log: what we sent a customer and what the provider said.

- ``LoggedWebhooks`` wraps the webhook handler: in the same transaction, each provider event
  matched to a delivery (by our idempotency key, else the provider's message id, as the
  handler matches it) is recorded in ``delivery_events``. The pipeline's inbox has already
  dropped redelivered events, and a repeat changes nothing (unique per delivery, provider and
  event id). Send attempts are recorded with each send result (``store.finish``).
- ``router``: ``GET /v1/customers/{customer_id}/messages`` and ``GET /v1/messages/
  reconciliation`` (sends a crash left unknown, and how they ended) behind the API key, over
  ``queries/messages.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, params
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import store
from services.dispatcher.queries.messages import (
    MAX_LIMIT,
    BadCursor,
    MessageLog,
    Reconciliation,
    decode_cursor,
    message_log,
    reconciliation,
)
from services.dispatcher.webhooks import KIND_TYPES, ProviderEvent, WebhookHandler
from shared.cloudevents import CloudEvent
from shared.db.tables import delivery_events
from shared.http.problems import invalid_field, problems
from shared.messaging.pipeline import Incoming, Tx


class LoggedWebhooks:
    """The webhook handler, recording each matched provider event in the message log."""

    def __init__(self, inner: WebhookHandler) -> None:
        self.inner = inner

    def decode(self, event: CloudEvent) -> ProviderEvent:
        return self.inner.decode(event)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        await self.inner.handle(tx, items)
        events: list[ProviderEvent] = [i.payload for i in items if i.payload.kind in KIND_TYPES]
        if not events:
            return
        names = sorted({n for e in events for n in self.inner.provider_names.get(e.provider, [])})
        rows = await store.find_for_events(
            tx.conn,
            [e.idempotency_key for e in events if e.idempotency_key],
            [m for e in events for m in e.message_ids],
            names,
        )
        by_key = {r["idempotency_key"]: r["id"] for r in rows}
        by_message = {r["provider_message_id"]: r["id"] for r in rows if r["provider_message_id"]}
        logged: dict[tuple[int, str, str], dict[str, Any]] = {}
        for event in events:
            found = by_key.get(event.idempotency_key or "") or next(
                (by_message[m] for m in event.message_ids if m in by_message), None
            )
            if found is None:
                continue
            logged.setdefault(
                (found, event.provider, event.event_id),
                {
                    "delivery_id": found,
                    "provider": event.provider[:30],
                    "event_id": event.event_id,
                    "kind": event.kind,
                    "reason": event.reason,
                    "occurred_at": _time(event.occurred_at),
                    "received_at": tx.now,
                },
            )
        if logged:
            await tx.conn.execute(
                insert(delivery_events).values(list(logged.values())).on_conflict_do_nothing()
            )


def _time(value: str | None) -> datetime | None:
    """The provider's event time (ISO 8601 as the parsers write it); None if it has none."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def router(engine: AsyncEngine, auth: Any) -> APIRouter:
    # ``auth``: an API-key dependency, ``require_scope("read")`` (a Security) or a callable
    guard = auth if isinstance(auth, params.Depends) else Depends(auth)
    api = APIRouter(prefix="/v1", tags=["messages"], dependencies=[guard])

    @api.get(
        "/customers/{customer_id}/messages",
        operation_id="listCustomerMessages",
        summary="The customer's message log: deliveries, attempts, provider events",
        description="Every delivery to the customer, newest first, each with its send attempts "
        "(provider, provider message id, outcome, response class) and the provider webhook "
        "events matched to it. Paged by cursor: pass `next_cursor` as `cursor` until it is "
        "null. A customer never messaged has an empty log.",
        responses=problems(422),
    )
    async def customer_messages(
        customer_id: Annotated[str, Path(min_length=1, max_length=200)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="messages per page")] = 50,
        cursor: Annotated[
            str | None, Query(max_length=40, description="`next_cursor` of the previous page")
        ] = None,
    ) -> MessageLog:
        before: int | None = None
        if cursor is not None:
            try:
                before = decode_cursor(cursor)
            except BadCursor as exc:
                raise invalid_field("cursor", str(exc)) from None
        async with engine.connect() as conn:
            return await message_log(conn, customer_id, limit, before)

    @api.get(
        "/messages/reconciliation",
        operation_id="getMessageReconciliation",
        summary="Sends a crash left unknown: still unknown, reconciled, unconfirmed",
        description="A dispatcher that dies between a provider call and recording its answer "
        "leaves the delivery `unknown` (never `failed`): it is reconciled to `sent` by the "
        "provider's webhook, a resend with the same key or the provider's search, or ends "
        "`failed` (reason `unconfirmed`) when nothing confirms it within "
        "`dispatcher.unknown_reconcile_seconds`. The same counts as "
        "`winback_deliveries_unknown` and `winback_reconciled_total`.",
    )
    async def message_reconciliation() -> Reconciliation:
        async with engine.connect() as conn:
            return await reconciliation(conn)

    return api
