"""No send stays unknown: reconciling deliveries a crash left between the provider call and
recording its answer.

A delivery left ``sending`` by a dead dispatcher (``sender.recover_stale``) becomes
``unknown`` (``unknown_since`` set; migration 0008), never ``failed``: the provider may well
have the message. It is settled by the first of:

1. **The provider's own webhook** (``webhooks.WebhookHandler``): any event about the message —
   delivered, opened, clicked, bounced, complained, dropped, unsubscribed — proves the
   provider accepted it. Matched by our idempotency key (SendGrid custom arg, Postmark
   metadata) or the provider message id; the row becomes ``sent``. An event that came while
   the row was still ``sending`` (the usual case: a delivery report takes seconds, recovery
   waits ``stale_after``) is in the message log (``delivery_events``) and confirms it on the
   first pass.
2. **A resend with the same key**, where every provider of the channel deduplicates on it
   (``ChannelSender.idempotent``: file, signed webhook, HubSpot with a unique property): the
   provider absorbs a second copy, so its answer confirms without a second message (HubSpot's
   409 ``duplicate`` confirms too). Re-checked first: no resend to a customer who opted out
   meanwhile.
3. **A provider search by our key**, where the channel has one (``Search``: Postmark's
   ``GET /messages/outbound?metadata_idempotency_key=…``), every ``search_every``.

Confirmation publishes ``message.sent`` through the same unit of work (outbox) as a normal
send. When nothing confirms it within ``window`` (``dispatcher.unknown_reconcile_seconds``)
it ends ``failed`` with the reason ``unconfirmed`` and ``message.failed`` — never re-sent
without a key. Counted in ``winback_deliveries_unknown`` and
``winback_reconciled_total{outcome=webhook|resend|search|unconfirmed}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

import httpx
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from services.dispatcher import metrics, store
from services.dispatcher.channels import ChannelSender
from services.dispatcher.errors import DeliveryFailedError, PermanentSendError, SendError
from services.dispatcher.model import (
    MESSAGE_FAILED,
    MESSAGE_SENT,
    Delivery,
    cause_of,
    outcome,
)
from services.dispatcher.providers import OutboundMessage, SendResult, postmark
from services.dispatcher.providers.postmark import PostmarkOutboundSearch
from shared.messaging.uow import Tx, UnitOfWork
from shared.settings import CHANNEL_KINDS, DispatcherSettings

log = logging.getLogger(__name__)

UNCONFIRMED: Final = "unconfirmed"
"""The reason of a delivery whose outcome stayed unknown past the window."""
WEBHOOK: Final = "webhook"
RESEND: Final = "resend"
SEARCH: Final = "search"

CONFIRMING_KINDS: Final = frozenset(
    {"delivered", "opened", "clicked", "bounced", "complained", "failed", "unsubscribed"}
)
"""Provider event kinds (``webhooks.KIND_TYPES``) that prove the provider had the message: a
drop or a bounce too (it was accepted, then not delivered; that event says so itself)."""

Step = Literal["expire", "resend", "search", "wait"]


def next_step(
    unknown_since: datetime,
    now: datetime,
    window: timedelta,
    *,
    resendable: bool,
    searchable: bool,
) -> Step:
    """What to do with an unknown delivery now: past the window it expires (``failed``,
    ``unconfirmed``); else a resend with the same key where the channel deduplicates, a
    search where the provider has one, or waiting for a webhook."""
    if now >= unknown_since + window:
        return "expire"
    if resendable:
        return "resend"
    if searchable:
        return "search"
    return "wait"


def confirms(kind: str) -> bool:
    """Does a provider event of this kind confirm that the provider accepted the message?"""
    return kind in CONFIRMING_KINDS


def resend_confirmation(
    result: SendResult | None, error: SendError | None
) -> tuple[str | None, str | None] | None:
    """A resend's answer as (provider, provider message id) if it confirms the message;
    ``None`` if it does not (the row stays unknown until the next try or the window).

    An acceptance confirms (the provider deduplicated, or it is the first copy: sent either
    way); so does a refusal as a duplicate (HubSpot's 409 on the unique key property)."""
    if result is not None:
        return result.provider, result.provider_message_id
    if isinstance(error, DeliveryFailedError):
        for attempt in error.attempts:
            if isinstance(attempt.error, PermanentSendError) and (
                attempt.error.error_code == "duplicate"
            ):
                return attempt.provider, None
    return None


def searches_for(
    settings: DispatcherSettings, clients: Sequence[httpx.AsyncClient]
) -> dict[str, list[Search]]:
    """The provider searches by key of each channel: Postmark's outbound message search for
    every Postmark provider (the only documented one among ours)."""
    found: dict[str, list[Search]] = {}
    if not clients:
        return found
    for channel in CHANNEL_KINDS:
        for provider in settings.channel(channel).providers:
            if provider.kind != "postmark" or provider.api_key is None:
                continue
            found.setdefault(channel, []).append(
                PostmarkOutboundSearch(
                    clients[0],
                    server_token=provider.api_key.get_secret_value(),
                    base_url=provider.base_url or postmark.DEFAULT_BASE_URL,
                    name=provider.label,
                )
            )
    return found


class Search(Protocol):
    """A provider's search for a message by our idempotency key."""

    name: str

    async def find(self, idempotency_key: str) -> str | None:
        """The provider message id if the provider has the message, else ``None``; raises
        if the provider cannot answer now."""
        ...


def emit(
    tx: Tx,
    topic: str,
    delivery: Delivery,
    type: str,
    provider: str | None,
    provider_message_id: str | None,
    reason: str | None = None,
    confirmed_by: str | None = None,
) -> None:
    """An outcome event about a delivery, into this transaction's outbox (as the sender's);
    ``confirmed_by``: how a send left unknown was confirmed (on its ``message.sent``)."""
    tx.emit(
        topic,
        delivery.customer_id,
        type,
        outcome(
            type,
            delivery,
            provider=provider,
            provider_message_id=provider_message_id,
            reason=reason,
            confirmed_by=confirmed_by,
        ).to_data(),
        cause=cause_of(delivery.command),
        subject=delivery.customer_id,
    )


@dataclass(frozen=True, slots=True)
class EventMatch:
    """A provider event matched to a delivery row: who reported it, with which message id."""

    row: RowMapping
    kind: str
    provider: str | None
    provider_message_id: str | None


async def confirm_from_events(tx: Tx, topic: str, matches: Sequence[EventMatch]) -> set[int]:
    """Unknown deliveries a provider event confirms become ``sent`` with ``message.sent``
    (before the event's own outcome, which the caller emits). Returns their ids."""
    wanted: dict[int, EventMatch] = {}
    for match in matches:
        if match.row["state"] == store.UNKNOWN and confirms(match.kind):
            wanted.setdefault(match.row["id"], match)
    if not wanted:
        return set()
    confirmed = [
        store.Confirmed(i, WEBHOOK, m.provider, m.provider_message_id) for i, m in wanted.items()
    ]
    done = await store.confirm_unknown(tx.conn, confirmed, tx.now)
    for row_id in sorted(done):
        match = wanted[row_id]
        delivery = Delivery.from_row(match.row)
        emit(
            tx,
            topic,
            delivery,
            MESSAGE_SENT,
            match.provider or delivery.provider,
            match.provider_message_id or delivery.provider_message_id,
            confirmed_by=WEBHOOK,
        )
        metrics.RECONCILED.labels(WEBHOOK).inc()
    return done


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    outcomes_topic: str
    window: timedelta = timedelta(days=1)
    """``dispatcher.unknown_reconcile_seconds``: how long a confirmation may take."""
    lease: timedelta = timedelta(minutes=30)
    """A resend in flight is not tried again before this (the stale-sending time: longer
    than any send may take); nor is a failed resend."""
    search_every: timedelta = timedelta(minutes=5)
    batch_size: int = 500


class ResendComposer(Protocol):
    async def __call__(
        self, conn: AsyncConnection, rows: Sequence[RowMapping], now: datetime
    ) -> dict[int, OutboundMessage]:
        """The messages to resend, by delivery id: re-checked (consent, suppression, case)
        and rendered again; a row left out is not resent."""
        ...


@dataclass(frozen=True, slots=True)
class _Resend:
    row: RowMapping
    attempts: int
    message: OutboundMessage


class Reconciler:
    """One pass at a time over the due unknown deliveries (``run_once``)."""

    def __init__(
        self,
        unit: Callable[[str], UnitOfWork],
        channels: Mapping[str, ChannelSender],
        compose: ResendComposer,
        config: ReconcileConfig,
        searches: Mapping[str, Sequence[Search]] | None = None,
    ) -> None:
        self.unit = unit
        self.channels = channels
        self.compose = compose
        self.config = config
        self.searches = {k: list(v) for k, v in (searches or {}).items() if v}

    def _resendable(self, channel: str) -> bool:
        sender = self.channels.get(channel)
        return sender is not None and sender.idempotent

    async def run_once(self) -> int:
        """Expire, resend or search the due unknown deliveries; returns how many it settled."""
        cfg = self.config
        resends: list[_Resend] = []
        searches: list[RowMapping] = []
        settled = 0
        async with self.unit("reconcile") as tx:
            conn, now = tx.conn, tx.now
            rows = await store.unknown_due(conn, now, cfg.batch_size)
            # a webhook that came while the row was still ``sending`` is in the message log
            reported = await store.reported_by_provider(
                conn, [r["id"] for r in rows], CONFIRMING_KINDS
            )
            if reported:
                done = await store.confirm_unknown(
                    conn,
                    [store.Confirmed(i, WEBHOOK, p, None) for i, p in reported.items()],
                    now,
                )
                for row in rows:
                    if row["id"] in done:
                        delivery = Delivery.from_row(row)
                        provider = reported[row["id"]]
                        emit(
                            tx,
                            cfg.outcomes_topic,
                            delivery,
                            MESSAGE_SENT,
                            provider,
                            None,
                            confirmed_by=WEBHOOK,
                        )
                        metrics.RECONCILED.labels(WEBHOOK).inc()
                        metrics.MESSAGES.labels(row["channel"], provider, "sent").inc()
                settled += len(done)
                rows = [r for r in rows if r["id"] not in done]
            steps: dict[Step, list[RowMapping]] = {}
            for row in rows:
                step = next_step(
                    row["unknown_since"] or now,
                    now,
                    cfg.window,
                    resendable=self._resendable(row["channel"]),
                    searchable=row["channel"] in self.searches,
                )
                steps.setdefault(step, []).append(row)
            expired = steps.get("expire", [])
            await store.expire_unknown(conn, [r["id"] for r in expired], UNCONFIRMED, now)
            for row in expired:
                delivery = Delivery.from_row(row)
                emit(tx, cfg.outcomes_topic, delivery, MESSAGE_FAILED, None, None, UNCONFIRMED)
                metrics.RECONCILED.labels(UNCONFIRMED).inc()
                metrics.MESSAGES.labels(row["channel"], "-", "failed").inc()
            settled += len(expired)
            messages = await self.compose(conn, steps.get("resend", []), now)
            resends = [
                _Resend(r, r["attempts"] + 1, messages[r["id"]])
                for r in steps.get("resend", [])
                if r["id"] in messages
            ]
            await store.hold_unknown(
                conn, [r.row["id"] for r in resends], now + cfg.lease, now, resend=True
            )
            searches = steps.get("search", [])
            for row in searches:
                deadline = (row["unknown_since"] or now) + cfg.window
                await store.hold_unknown(
                    conn, [row["id"]], min(now + cfg.search_every, deadline), now, resend=False
                )
            # nothing to try: look again when the window ends (a webhook may settle it first)
            waiting = steps.get("wait", []) + [
                r for r in steps.get("resend", []) if r["id"] not in messages
            ]
            for row in waiting:
                deadline = (row["unknown_since"] or now) + cfg.window
                await store.hold_unknown(conn, [row["id"]], deadline, now, resend=False)
        if resends or searches:
            settled += await self._confirm(resends, searches)
        if rows:
            log.info(
                "reconciled unknown deliveries",
                extra={"due": len(rows), "settled": settled, "expired": len(expired)},
            )
        async with self.unit("reconcile.gauge") as tx:
            metrics.DELIVERIES_UNKNOWN.set(await store.count_unknown(tx.conn))
        return settled

    async def _confirm(self, resends: Sequence[_Resend], searches: Sequence[RowMapping]) -> int:
        answers = await asyncio.gather(
            *(self._resend(r) for r in resends), *(self._search(r) for r in searches)
        )
        found = [a for a in answers if a is not None]
        if not found:
            return 0
        async with self.unit("reconcile.record") as tx:
            done = await store.confirm_unknown(tx.conn, [c for c, _ in found], tx.now)
            for confirmed, row in found:
                if confirmed.id not in done:
                    continue  # settled meanwhile (a webhook, another dispatcher)
                emit(
                    tx,
                    self.config.outcomes_topic,
                    Delivery.from_row(row),
                    MESSAGE_SENT,
                    confirmed.provider,
                    confirmed.provider_message_id,
                    confirmed_by=confirmed.how,
                )
                metrics.RECONCILED.labels(confirmed.how).inc()
                metrics.MESSAGES.labels(row["channel"], confirmed.provider or "-", "sent").inc()
        return len(done)

    async def _resend(self, item: _Resend) -> tuple[store.Confirmed, RowMapping] | None:
        sender = self.channels[item.row["channel"]]
        result: SendResult | None = None
        error: SendError | None = None
        try:
            result = await sender.send(item.message)
        except SendError as exc:
            error = exc
        except Exception:  # a bug, not an answer: stays unknown, tried again after the lease
            log.exception("resending an unknown delivery failed", extra={"id": item.row["id"]})
            return None
        found = resend_confirmation(result, error)
        if found is None:
            return None
        provider, message_id = found
        confirmed = store.Confirmed(item.row["id"], RESEND, provider, message_id, item.attempts)
        return confirmed, item.row

    async def _search(self, row: RowMapping) -> tuple[store.Confirmed, RowMapping] | None:
        for search in self.searches.get(row["channel"], []):
            try:
                message_id = await search.find(row["idempotency_key"])
            except Exception as exc:  # tried again in search_every
                log.warning(
                    "provider search failed",
                    extra={"provider": search.name, "error": f"{type(exc).__name__}: {exc}"},
                )
                continue
            if message_id is not None:
                return store.Confirmed(row["id"], SEARCH, search.name, message_id), row
        return None
