"""The message log of one customer: every delivery with its send attempts (provider, provider
message id, outcome, response class) and the provider webhook events matched to it, newest
delivery first, paged by an opaque cursor (``GET /v1/customers/{id}/messages``).

Three statements per page, each on an index: the customer's deliveries
(``ix_deliveries_customer_id``, id descending: insertion order, which is newest first), their
attempts and their events (``delivery_id``). The rows come from ``deliveries``,
``delivery_attempts`` (written with each send result, ``store.finish``) and
``delivery_events`` (written with each matched webhook event, ``message_log.LoggedWebhooks``).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db.tables import deliveries, delivery_attempts, delivery_events

MAX_LIMIT = 200


class MessageAttempt(BaseModel):
    """One send attempt's result."""

    attempt: int = Field(description="1 for the first send, 2 for the first retry round, …")
    provider: str | None = Field(description="the provider that answered last (its label)")
    provider_message_id: str | None
    outcome: Literal["sent", "requeued", "failed", "unknown"] = Field(
        description="what the attempt left the delivery as: sent, queued again for a retry "
        "round, failed for good, or unknown (the dispatcher crashed mid-send)"
    )
    response_class: Literal[
        "2xx", "1xx", "3xx", "4xx", "5xx", "no_response", "unknown", "reconciled"
    ] = Field(
        description="the provider's answer: 2xx accepted (the file provider too; a resend with "
        "the same key too); 4xx/5xx the last HTTP status the error names; no_response "
        "(timeout, dropped connection, open circuit); unknown (the dispatcher crashed "
        "mid-send); reconciled (an unknown send the provider's webhook or search confirmed)"
    )
    error: str | None = Field(description="the provider's error, when it failed")
    finished_at: datetime


class ProviderEvent(BaseModel):
    """A provider webhook event about the message, as received (deduplicated by its id)."""

    provider: str
    event_id: str
    kind: Literal[
        "delivered", "opened", "clicked", "bounced", "complained", "failed", "unsubscribed"
    ]
    reason: str | None
    occurred_at: datetime | None = Field(description="when the provider says it happened")
    received_at: datetime


class Message(BaseModel):
    """One delivery: a (case, step) message on one channel."""

    id: int = Field(description="the delivery's id")
    idempotency_key: str = Field(description="case id and step key; what providers dedupe on")
    case_id: str
    step_key: str
    channel: str
    template: str
    variant: str | None
    state: Literal["queued", "sending", "sent", "failed", "suppressed", "unknown"] = Field(
        description="unknown: a crash between the provider call and its record; reconciled to "
        "sent, or failed (error unconfirmed) when nothing confirmed it in time"
    )
    provider: str | None
    provider_message_id: str | None
    subject: str | None = Field(description="the rendered subject (emails; gone after erasure)")
    error: str | None = Field(description="why it failed or was suppressed")
    attempt_count: int
    created_at: datetime
    sent_at: datetime | None
    updated_at: datetime
    unknown_since: datetime | None = Field(
        default=None,
        description="when a crash left its outcome unknown; with state sent it was reconciled",
    )
    attempts: list[MessageAttempt] = Field(description="oldest first")
    events: list[ProviderEvent] = Field(description="in the order they happened")


class MessageLog(BaseModel):
    customer_id: str
    messages: list[Message] = Field(description="newest first")
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next (older) page; null on the last page"
    )


class BadCursor(ValueError):
    """The cursor is not one this API gave out."""


def encode_cursor(before_id: int) -> str:
    return base64.urlsafe_b64encode(f"d{before_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor this API gave out") from None
    if not text.startswith("d") or not text[1:].isdigit() or len(text) > 20:
        raise BadCursor("not a cursor this API gave out")
    return int(text[1:])


async def message_log(
    conn: AsyncConnection, customer_id: str, limit: int, before_id: int | None = None
) -> MessageLog:
    """One page of the customer's messages, newest first; ``before_id`` from a cursor."""
    query = select(
        deliveries.c.id,
        deliveries.c.idempotency_key,
        deliveries.c.case_id,
        deliveries.c.step_key,
        deliveries.c.channel,
        deliveries.c.template,
        deliveries.c.variant,
        deliveries.c.state,
        deliveries.c.provider,
        deliveries.c.provider_message_id,
        deliveries.c.subject,
        deliveries.c.error,
        deliveries.c.attempts.label("attempt_count"),
        deliveries.c.created_at,
        deliveries.c.sent_at,
        deliveries.c.updated_at,
        deliveries.c.unknown_since,
    ).where(deliveries.c.customer_id == customer_id)
    if before_id is not None:
        query = query.where(deliveries.c.id < before_id)
    rows = (
        (await conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit + 1)))
        .mappings()
        .all()
    )
    page, more = rows[:limit], len(rows) > limit
    ids = [r["id"] for r in page]
    attempts: dict[int, list[MessageAttempt]] = {i: [] for i in ids}
    events: dict[int, list[ProviderEvent]] = {i: [] for i in ids}
    if ids:
        a = delivery_attempts.c
        for row in (
            await conn.execute(
                select(delivery_attempts)
                .where(a.delivery_id.in_(ids))
                .order_by(a.delivery_id, a.attempt, a.id)
            )
        ).mappings():
            attempts[row["delivery_id"]].append(MessageAttempt.model_validate(dict(row)))
        e = delivery_events.c
        for row in (
            await conn.execute(
                select(delivery_events)
                .where(e.delivery_id.in_(ids))
                .order_by(e.delivery_id, e.occurred_at.asc().nulls_last(), e.received_at, e.id)
            )
        ).mappings():
            events[row["delivery_id"]].append(ProviderEvent.model_validate(dict(row)))
    messages = [
        Message.model_validate({**r, "attempts": attempts[r["id"]], "events": events[r["id"]]})
        for r in page
    ]
    return MessageLog(
        customer_id=customer_id,
        messages=messages,
        next_cursor=encode_cursor(page[-1]["id"]) if more and page else None,
    )


class Reconciliation(BaseModel):
    """Deliveries a crash left between the provider call and its record, and how they ended
    (``services/dispatcher/reconcile.py``)."""

    unknown: int = Field(description="still unknown: not confirmed yet, window not passed")
    reconciled: int = Field(
        description="confirmed sent after all: by the provider's webhook, a resend with the "
        "same key the provider deduplicated, or the provider's search"
    )
    unconfirmed: int = Field(
        description="failed (reason unconfirmed): nothing confirmed them within "
        "dispatcher.unknown_reconcile_seconds; never re-sent without a key"
    )
    oldest_unknown_since: datetime | None = Field(
        description="when the longest-waiting unknown delivery became unknown"
    )


async def reconciliation(conn: AsyncConnection) -> Reconciliation:
    """One query over the rows ever unknown (the partial index of migration 0008)."""
    d = deliveries.c
    row = (
        await conn.execute(
            select(
                func.count().filter(d.state == "unknown"),
                func.count().filter(d.state == "sent"),
                func.count().filter(d.state == "failed"),
                func.min(d.unknown_since).filter(d.state == "unknown"),
            ).where(d.unknown_since.is_not(None))
        )
    ).one()
    return Reconciliation(
        unknown=row[0], reconciled=row[1], unconfirmed=row[2], oldest_unknown_since=row[3]
    )
