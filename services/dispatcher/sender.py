"""The sender loop: queued deliveries are claimed, re-checked, rendered, sent and recorded.

1. **Claim** (one transaction): lock a batch of due ``queued`` rows with ``FOR UPDATE SKIP
   LOCKED`` (several dispatchers never take the same row), re-check each right before the
   send — case still open, consent not withdrawn, customer and address not suppressed —
   (``message.suppressed`` with the reason; so is a step that expired meanwhile), put one
   that a backlog carried into the customer's quiet hours back in the queue until their send
   window opens (``model.send_timing``), render it (a missing template or field is a
   permanent ``message.failed`` naming it), and mark the rest ``sending`` with the attempt
   counted. This commits *before* any provider is called.
2. **Send** concurrently, at most ``max_in_flight`` at a time, through the channel's provider
   chain (retries, circuit breakers, rate limits, failover: ``channels.ChannelSender``).
3. **Record** (one transaction per batch of results): ``sent``/``failed`` and the outcome
   events into the outbox together; a transient failure everywhere goes back to ``queued``
   for a later round (``not_before``), until the rounds are used up. A result only lands if
   the row is still ``sending`` by the same attempt.

After a crash between 2 and 3 the row stays ``sending``. Once it is older than
``stale_after`` (longer than any send may take) it is recovered as ``unknown``, never
``failed`` and never sent twice blindly: ``reconcile.Reconciler`` settles it (a provider
webhook, a resend with the same key where every provider of the channel deduplicates on it,
Postmark's search), or, when nothing confirms it within ``unknown_window``, ends it
``failed`` (``unconfirmed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.dispatcher import metrics, reconcile, store
from services.dispatcher.channels import ChannelSender
from services.dispatcher.compose import Composer, Profile
from services.dispatcher.errors import DeliveryFailedError, PermanentSendError, SendError
from services.dispatcher.model import (
    CUSTOMER_UNSUBSCRIBED,
    MESSAGE_FAILED,
    MESSAGE_SENT,
    MESSAGE_SUPPRESSED,
    Delivery,
    SendState,
    address_hash,
    cause_of,
    customer_key_hash,
    outcome,
    recheck,
    send_timing,
    suppression_keys,
)
from services.dispatcher.providers import OutboundMessage, SendResult
from shared import channels
from shared.clock import Clock
from shared.logging import throttled
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES
from shared.messaging.uow import Tx, UnitOfWork
from shared.retry import TRANSIENT

log = logging.getLogger(__name__)
# retry loops: one line per log_repeat_interval_seconds, with the count
retrying = throttled(log)

RECORD_RETRY = replace(TRANSIENT, max_attempts=12)
"""Recording a batch of results that failed for now: 0.1 s, then windows doubling to 5 s,
twelve attempts (at most about half a minute); then the rows stay ``sending`` and crash
recovery settles them (never a blind second send)."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this process marked ``sending``; ``attempts`` is its claim token."""

    delivery: Delivery
    attempts: int
    message: OutboundMessage


@dataclass(frozen=True, slots=True)
class Outcome:
    claimed: Claimed
    result: SendResult | None = None
    error: SendError | None = None


@dataclass(frozen=True, slots=True)
class SenderConfig:
    outcomes_topic: str
    source: str
    consent_by_default: Collection[str] = ("email", "crm")
    batch_size: int = 500
    max_in_flight: int = 512
    poll_seconds: float = 0.05
    stale_after: timedelta = timedelta(minutes=30)
    rounds: int = 3
    round_delay: timedelta = timedelta(minutes=5)
    record_batch: int = 1000
    record_linger: float = 0.02
    """Seconds the recorder waits to gather more results into one transaction."""
    late_grace: timedelta = timedelta(minutes=15)
    """How long after the customer's send window closes a late delivery may still go."""
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    """``kafka.max_record_bytes``: an outcome event over it is parked when written."""
    unknown_window: timedelta = timedelta(days=1)
    """``dispatcher.unknown_reconcile_seconds``: how long an unknown delivery may take to be
    confirmed before it ends ``failed`` (``unconfirmed``)."""


class DeliverySender:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        channels: Mapping[str, ChannelSender],
        composer: Composer,
        config: SenderConfig,
        searches: Mapping[str, Sequence[reconcile.Search]] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.channels = dict(channels)
        self.composer = composer
        self.config = config
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._in_flight: set[int] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.claimed_total = 0
        self._min_claim = max(1, min(config.batch_size, config.max_in_flight // 4))
        self.reconciler = reconcile.Reconciler(
            self._unit,
            self.channels,
            self.resend_messages,
            reconcile.ReconcileConfig(
                outcomes_topic=config.outcomes_topic,
                window=config.unknown_window,
                lease=config.stale_after,
                batch_size=config.batch_size,
            ),
            searches,
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _unit(self, name: str) -> UnitOfWork:
        cfg = self.config
        return UnitOfWork(
            self.engine, self.clock, cfg.source, cfg.max_record_bytes, name=f"dispatcher.{name}"
        )

    # -- 1. claim ------------------------------------------------------------------------------
    async def claim(self, limit: int | None = None) -> list[Claimed]:
        """Claim, re-check and render up to ``limit`` due deliveries; commit them ``sending``."""
        cfg = self.config
        async with self._unit("claim") as tx:
            conn, now = tx.conn, tx.now
            rows = await store.claim_queued(conn, now, limit or cfg.batch_size)
            if not rows:
                return []
            keys = {row["id"]: suppression_keys(*_target(row)) for row in rows}
            listed = await store.suppressed(conn, [k for ks in keys.values() for k in ks])
            updates: list[store.ClaimUpdate] = []
            claimed: list[Claimed] = []
            for row in rows:
                delivery = Delivery.from_row(row)
                reasons = [listed[k] for k in keys[row["id"]] if k in listed]
                why = recheck(
                    delivery.channel,
                    _send_state(row, reasons[0] if reasons else None),
                    cfg.consent_by_default,
                )
                timing = send_timing(delivery.command, now, cfg.late_grace) if why is None else None
                if isinstance(timing, datetime):  # quiet hours: back in the queue until then
                    updates.append(store.ClaimUpdate(row["id"], store.QUEUED, not_before=timing))
                    counted(delivery.channel, "-", "held").inc()
                    continue
                why = why or timing
                if why is not None:
                    updates.append(store.ClaimUpdate(row["id"], store.SUPPRESSED, error=why))
                    self._emit(tx, delivery, MESSAGE_SUPPRESSED, None, None, reason=why)
                    counted(delivery.channel, "-", "suppressed").inc()
                    continue
                try:
                    message = self.composer.compose(delivery.command, _profile(row), now)
                except Exception as exc:  # one bad row must not block the queue behind it
                    reason = (
                        exc.reason
                        if isinstance(exc, PermanentSendError)
                        else f"cannot compose the message: {type(exc).__name__}: {exc}"[:300]
                    )
                    if not isinstance(exc, PermanentSendError):
                        log.exception("composing failed", extra={"delivery": row["id"]})
                    updates.append(store.ClaimUpdate(row["id"], store.FAILED, error=reason))
                    self._emit(tx, delivery, MESSAGE_FAILED, None, None, reason=reason)
                    counted(delivery.channel, "-", "failed").inc()
                    continue
                content = message.content
                updates.append(
                    store.ClaimUpdate(
                        row["id"], store.SENDING, subject=content.subject, body=content.text
                    )
                )
                claimed.append(Claimed(delivery, row["attempts"] + 1, message))
            await store.mark_claimed(conn, updates, now)
        self.claimed_total += len(claimed)
        return claimed

    # -- 2. send -------------------------------------------------------------------------------
    async def send(self, claimed: Claimed) -> Outcome:
        """Send one claimed delivery through its channel's providers; never raises."""
        channel = self.channels[claimed.delivery.channel]
        try:
            return Outcome(claimed, result=await channel.send(claimed.message))
        except SendError as exc:
            return Outcome(claimed, error=exc)
        except Exception as exc:  # a bug, not a provider answer: the outcome is unknown
            log.exception("send failed unexpectedly", extra={"delivery": claimed.delivery.id})
            return Outcome(
                claimed,
                error=PermanentSendError(f"outcome unknown: {type(exc).__name__}: {exc}"[:300]),
            )

    # -- 3. record -----------------------------------------------------------------------------
    async def record(self, outcomes: Sequence[Outcome]) -> int:
        """Store the results and their outcome events in one transaction; returns how many
        rows were still ours to update."""
        async with self._unit("record") as tx:
            conn, now = tx.conn, tx.now
            finishes = [self._finish(o, now) for o in outcomes]
            mine = await store.finish(conn, finishes, now)
            suppress: list[store.Suppression] = []
            for outcome, finish in zip(outcomes, finishes, strict=True):
                if finish.id not in mine:
                    continue  # recovered by another dispatcher meanwhile
                delivery = outcome.claimed.delivery
                if finish.state == store.SENT:
                    self._emit(
                        tx, delivery, MESSAGE_SENT, finish.provider, finish.provider_message_id
                    )
                elif finish.state == store.FAILED:
                    self._emit(tx, delivery, MESSAGE_FAILED, finish.provider, None, finish.error)
                    suppress += _suppressions(outcome)
                    error = outcome.error
                    if isinstance(error, DeliveryFailedError) and error.unsubscribed:
                        # the recipient opted out at the provider (replied STOP): the same
                        # event an unsubscribe webhook yields, so the scheduler closes the case
                        self._emit(
                            tx,
                            delivery,
                            CUSTOMER_UNSUBSCRIBED,
                            finish.provider,
                            None,
                            _unsubscribe_reason(error),
                        )
                counted(
                    delivery.channel,
                    finish.provider or "-",
                    "requeued" if finish.state == store.QUEUED else finish.state,
                ).inc()
            await store.add_suppressions(conn, suppress, now)
        return len(mine)

    def _finish(self, outcome: Outcome, now: datetime) -> store.Finish:
        claimed = outcome.claimed
        row_id, attempts = claimed.delivery.id, claimed.attempts
        if outcome.result is not None:
            return store.Finish(
                id=row_id,
                attempts=attempts,
                state=store.SENT,
                provider=outcome.result.provider,
                provider_message_id=outcome.result.provider_message_id,
                sent_at=now,
            )
        error = outcome.error
        assert error is not None
        provider = _last_provider(error)
        permanent = not isinstance(error, DeliveryFailedError) or error.permanent
        if not permanent and claimed.attempts < self.config.rounds:
            assert isinstance(error, DeliveryFailedError)
            wait = self.config.round_delay * 2 ** (claimed.attempts - 1)
            if error.retry_after is not None:
                wait = max(wait, timedelta(seconds=error.retry_after))
            return store.Finish(
                id=row_id,
                attempts=attempts,
                state=store.QUEUED,
                provider=provider,
                error=error.reason,
                not_before=now + min(wait, timedelta(days=1)),
            )
        return store.Finish(
            id=row_id, attempts=attempts, state=store.FAILED, provider=provider, error=error.reason
        )

    # -- crash recovery ------------------------------------------------------------------------
    async def recover_stale(self) -> int:
        """Deliveries left ``sending`` by a dispatcher that died mid-send become ``unknown``:
        the provider may have them; ``reconcile`` finds out."""
        cfg = self.config
        async with self._unit("recover_stale") as tx:
            conn, now = tx.conn, tx.now
            rows = [
                r
                for r in await store.stale_sending(conn, now - cfg.stale_after, cfg.batch_size)
                if r["id"] not in self._in_flight
            ]
            if not rows:
                return 0
            await store.mark_unknown(conn, [r["id"] for r in rows], now)
            for row in rows:
                counted(row["channel"], "-", "unknown").inc()
        log.warning(
            "deliveries left sending by a crashed dispatcher are unknown until reconciled",
            extra={"unknown": len(rows)},
        )
        return len(rows)

    async def reconcile(self) -> int:
        """Settle the due unknown deliveries (``reconcile.Reconciler.run_once``)."""
        return await self.reconciler.run_once()

    async def resend_messages(
        self, conn: AsyncConnection, rows: Sequence[RowMapping], now: datetime
    ) -> dict[int, OutboundMessage]:
        """For a resend with the same key: each unknown row re-checked as a claim is (no resend
        to a customer who opted out or was suppressed meanwhile) and rendered again."""
        if not rows:
            return {}
        keys = {row["id"]: suppression_keys(*_target(row)) for row in rows}
        listed = await store.suppressed(conn, [k for ks in keys.values() for k in ks])
        messages: dict[int, OutboundMessage] = {}
        for row in rows:
            delivery = Delivery.from_row(row)
            reasons = [listed[k] for k in keys[row["id"]] if k in listed]
            state = _send_state(row, reasons[0] if reasons else None)
            if recheck(delivery.channel, state, self.config.consent_by_default) is not None:
                continue
            try:
                messages[row["id"]] = self.composer.compose(delivery.command, _profile(row), now)
            except Exception:
                log.exception("composing a resend failed", extra={"delivery": row["id"]})
        return messages

    # -- one pass, for tests and tools ---------------------------------------------------------
    async def process_once(self) -> int:
        """Recover stale rows, reconcile unknown ones, then claim one batch, send it all and
        record it."""
        await self.recover_stale()
        await self.reconcile()
        claimed = await self.claim()
        if not claimed:
            return 0
        outcomes = await asyncio.gather(*(self.send(c) for c in claimed))
        await self.record(outcomes)
        return len(claimed)

    async def drain(self) -> int:
        """``process_once`` until nothing is due; returns how many were claimed."""
        total = 0
        while n := await self.process_once():
            total += n
        return total

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Claim while there is room for more sends in flight; record results in batches."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[Outcome] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        recorder = asyncio.create_task(self._recorder(results), name="delivery-recorder")
        recover_every = max(1.0, min(60.0, cfg.stale_after.total_seconds() / 10))
        next_recovery = 0.0
        self.idle.clear()
        try:
            while not self._stopping.is_set():
                if loop.time() >= next_recovery:
                    next_recovery = loop.time() + recover_every
                    await self._guard(self.recover_stale())
                    await self._guard(self.reconcile())
                room = cfg.max_in_flight - len(self._in_flight)
                # claim in batches, not one row per freed slot (unless little is in flight)
                if room <= 0 or (room < self._min_claim and self._in_flight):
                    self._room.clear()
                    await _wait_any(self._room, self._stopping, cfg.poll_seconds)
                    continue
                want = min(room, cfg.batch_size)
                claimed = await self._guard(self.claim(want)) or []
                for item in claimed:
                    self._in_flight.add(item.delivery.id)
                    task = asyncio.create_task(self._send_to(item, results))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if len(claimed) < want:
                    await _wait_any(self._stopping, None, cfg.poll_seconds)
        finally:
            # Finish what is in flight and record it: a clean stop leaves nothing "sending".
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await results.join()
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
            self.idle.set()

    async def _send_to(self, claimed: Claimed, results: asyncio.Queue[Outcome]) -> None:
        outcome = await self.send(claimed)
        results.put_nowait(outcome)

    async def _recorder(self, results: asyncio.Queue[Outcome]) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        while True:
            batch = [await results.get()]
            # Results come one by one; gather a few milliseconds' worth (fewer, larger
            # transactions), but never wait once nothing more is in flight.
            until = loop.time() + cfg.record_linger
            while len(batch) < cfg.record_batch:
                if not results.empty():
                    batch.append(results.get_nowait())
                    continue
                left = until - loop.time()
                if left <= 0 or len(batch) >= len(self._in_flight):
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        batch.append(await results.get())
            try:
                await self._record_reliably(batch)
            finally:
                for outcome in batch:
                    self._in_flight.discard(outcome.claimed.delivery.id)
                    results.task_done()
                self._room.set()

    async def _record_reliably(self, batch: list[Outcome]) -> None:
        try:
            await RECORD_RETRY.call(lambda: self.record(batch), "recording send results", log)
        except Exception as exc:
            # The rows stay "sending": crash recovery settles them (never a blind second send).
            if RECORD_RETRY.retry_on(exc):
                log.error("could not record send results", extra={"count": len(batch)})
            else:
                log.exception("recording send results failed", extra={"count": len(batch)})

    async def _guard(self, work: Any) -> Any:
        try:
            return await work
        except Exception:
            retrying.exception("dispatcher sender step failed; retrying")
            await _wait_any(self._stopping, None, 1.0)
            return None

    def stop(self) -> None:
        self._stopping.set()
        self._room.set()

    def _emit(
        self,
        tx: Tx,
        delivery: Delivery,
        type: str,
        provider: str | None,
        provider_message_id: str | None,
        reason: str | None = None,
    ) -> None:
        tx.emit(
            self.config.outcomes_topic,
            delivery.customer_id,
            type,
            outcome(
                type,
                delivery,
                provider=provider,
                provider_message_id=provider_message_id,
                reason=reason,
            ).to_data(),
            cause=cause_of(delivery.command),
            subject=delivery.customer_id,
        )


async def _wait_any(first: asyncio.Event, second: asyncio.Event | None, timeout: float) -> None:
    waiters = [asyncio.ensure_future(first.wait())]
    if second is not None:
        waiters.append(asyncio.ensure_future(second.wait()))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


@functools.lru_cache(maxsize=1024)
def counted(channel: str, provider: str, outcome: str) -> Any:
    """``winback_dispatcher_messages_total`` for these labels: the labelled child, looked up
    once (``labels()`` per message is a lock and a dict)."""
    return metrics.MESSAGES.labels(channel, provider, outcome)


def _target(row: RowMapping) -> tuple[str, str, str | None]:
    """(channel, customer id, address) for the suppression keys."""
    channel = row["channel"]
    customer = (row["command"] or {}).get("customer") or {}
    field = channels.address_fields().get(channel)
    address = (customer.get(field) or row.get(field)) if field else None
    return channel, row["customer_id"], address


def _send_state(row: RowMapping, suppressed_reason: str | None) -> SendState:
    return SendState(
        case_status=row["case_status"],
        customer_found=bool(row["customer_found"]),
        erased=bool(row["erased"]),
        opted_out_all=bool(row["opted_out_all"]),
        consent=row["consent"] or {},
        suppressed_channels=row["suppressed_channels"] or (),
        suppressed_reason=suppressed_reason,
    )


def _profile(row: RowMapping) -> Profile:
    return Profile(
        name=row["name"],
        email=row["email"],
        phone=row["phone"],
        timezone=row["timezone"],
        mrr_minor=row["mrr_minor"],
        currency=row["currency"],
        segment=row["case_segment"],
    )


def _last_provider(error: SendError) -> str | None:
    if isinstance(error, DeliveryFailedError):
        return error.attempts[-1].provider
    return error.provider


def _suppressions(outcome: Outcome) -> list[store.Suppression]:
    """A permanent refusal that says the address is dead (Twilio 21610, Postmark 406, an
    invalid address) puts the address on the suppression list; an opt-out at the provider
    (21610) suppresses the customer on that channel too, as an unsubscribe click does."""
    error = outcome.error
    if not isinstance(error, DeliveryFailedError) or not error.suppress:
        return []
    message = outcome.claimed.message
    channel = message.channel.value
    if channel not in channels.address_fields() or not message.to:
        return []
    last = _suppressing_error(error)
    reason = f"{last.provider or 'provider'}: {last.error_code or 'refused'}"
    customer = outcome.claimed.delivery.customer_id
    rows = [store.Suppression(channel, address_hash(channel, message.to), reason, customer)]
    if error.unsubscribed:
        rows.append(
            store.Suppression(channel, customer_key_hash(channel, customer), reason, customer)
        )
    return rows


def _suppressing_error(error: DeliveryFailedError) -> PermanentSendError:
    return next(
        a.error
        for a in reversed(error.attempts)
        if isinstance(a.error, PermanentSendError) and a.error.suppress
    )


def _unsubscribe_reason(error: DeliveryFailedError) -> str:
    last = _suppressing_error(error)
    code = f" ({last.error_code})" if last.error_code else ""
    return f"recipient opted out at {last.provider or 'the provider'}{code}"
