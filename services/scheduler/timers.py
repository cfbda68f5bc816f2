"""Durable timers: due steps are rows, claimed in batches with ``FOR UPDATE SKIP LOCKED``.

In one transaction per batch: claim due steps of open cases, run the guardrails (pure
``decide``) over each with the customer's contact history, then mark each step dispatched
(and write its dispatch command to the outbox), deferred (new ``due_at``) or skipped. Several
schedulers on one database never fire a step twice (the row lock, and ``state`` moves on in
the same transaction); a scheduler killed mid-batch loses nothing (the transaction rolls
back and the rows are claimable again). ``asyncio.sleep`` only paces the polling.

Each pass makes a second claim the same way: due inactivity timers (one row per customer who
is not churned), which open passive-user cases (``services.scheduler.inactivity``).

A step written already due (a churn's day-0 message) fires at once, not at the next poll: the
transaction that writes it (``store.steps_due``) marks its connection for this process's timers
— woken when the pool takes the connection back after the commit — and sends ``pg_notify`` on
``store.STEPS_DUE_CHANNEL``, which PostgreSQL delivers on commit to every timer that listens
(one connection each, in any process). The poll stays the safety net (a lost connection, a
notification missed while reconnecting).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.scheduler import metrics, store
from services.scheduler.domain import (
    ContactHistory,
    Defer,
    GuardrailPolicy,
    Send,
    decide,
)
from services.scheduler.domain.case import CaseChange
from services.scheduler.inactivity import InactivityTimer
from services.scheduler.views import (
    customer_view,
    planned_from_row,
    returned_at_of,
    segment_from_json,
)
from shared import domain_events as de
from shared.clock import Clock
from shared.contracts.base import invalid_payload
from shared.contracts.dispatch import DispatchCommand, SendWindowSpec
from shared.localtime import SendWindow, resolve_zone
from shared.logging import throttled
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES
from shared.messaging.uow import UnitOfWork
from shared.settings import TopicSettings

log = logging.getLogger(__name__)
# a failing pass repeats every poll: one line per log_repeat_interval_seconds, with the count
retrying = throttled(log)

_CLAIM = text(
    "SELECT s.*, c.playbook, c.playbook_version, c.segment, c.episode "
    "FROM case_steps AS s JOIN cases AS c ON c.id = s.case_id "
    "WHERE s.state = 'pending' AND s.due_at <= :now AND c.status = 'open' "
    "ORDER BY s.due_at LIMIT :n FOR UPDATE OF s SKIP LOCKED"
)
_HISTORY = text(
    "SELECT customer_id, fired_at, is_discount FROM case_steps "
    "WHERE customer_id = ANY(CAST(:ids AS text[])) AND state IN ('dispatched', 'sent') "
    "AND fired_at > :since AND fired_at <= :now"
)
_UPDATE = text(
    "UPDATE case_steps AS s SET state = u.state, state_reason = u.reason, due_at = u.due_at, "
    "fired_at = u.fired_at, template = u.template, offer = u.offer, "
    "is_discount = u.is_discount, defer_count = s.defer_count + u.deferred, updated_at = :now "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:states AS text[]), CAST(:reasons AS text[]), "
    "CAST(:due AS timestamptz[]), CAST(:fired AS timestamptz[]), CAST(:templates AS text[]), "
    "CAST(:offers AS text[]), CAST(:discounts AS boolean[]), CAST(:deferred AS integer[])) "
    "AS u(id, state, reason, due_at, fired_at, template, offer, is_discount, deferred) "
    "WHERE s.id = u.id"
)


@dataclass(frozen=True)
class FireResult:
    claimed: int
    dispatched: int
    deferred: int
    skipped: int


class StepFirer:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        policy: GuardrailPolicy,
        dispatch_topic: str,
        source: str,
        batch_size: int = 500,
        poll_seconds: float = 0.5,
        offer_valid: timedelta = timedelta(days=14),
        outcomes_topic: str = TopicSettings().outcomes,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        listen: bool = True,
        inactivity: InactivityTimer | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.policy = policy
        self.dispatch_topic = dispatch_topic
        self.source = source
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.offer_valid = offer_valid
        self.outcomes_topic = outcomes_topic  # where a case closed at its horizon is announced
        self.max_record_bytes = max_record_bytes  # kafka.max_record_bytes
        # LISTEN for steps written due now by other processes (False: a connection pooler
        # that cannot LISTEN; this process's commits still wake the timer, the poll the rest)
        self.listen = listen
        # the second claim of each pass: due inactivity timers (passive users found by winback)
        self.inactivity = inactivity
        self._lookback = max(
            [policy.discount_period, *(cap.period for cap in policy.caps)], default=timedelta(0)
        )
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # steps written due now (or stop): claim without waiting

    def _unit(self, name: str) -> UnitOfWork:
        return UnitOfWork(
            self.engine, self.clock, self.source, self.max_record_bytes, name=f"scheduler.{name}"
        )

    async def fire_once(self) -> FireResult:
        """Claim and decide one batch of due steps; commit; return what happened."""
        async with self._unit("fire_steps") as tx:
            conn, now = tx.conn, tx.now
            rows = (await conn.execute(_CLAIM, {"now": now, "n": self.batch_size})).mappings().all()
            if not rows:
                return FireResult(0, 0, 0, 0)
            ids = sorted({r["customer_id"] for r in rows})
            people = await store.customers(conn, ids)
            history = await self._history(conn, ids, now)
            updates: list[tuple[Any, ...]] = []
            counts: Counter[str] = Counter()
            for row in rows:
                cid = row["customer_id"]
                person = people.get(cid)
                if person is None or person.erased_at is not None:
                    updates.append(_skip(row, "no_customer"))
                    counts["skipped"] += 1
                    continue
                step = planned_from_row(row, row["playbook"], row["playbook_version"])
                decision = decide(
                    step,
                    customer=customer_view(person._mapping),
                    segment=segment_from_json(row["segment"]),
                    history=history.get(cid, ContactHistory()),
                    now=now,
                    policy=self.policy,
                    watch_from=returned_at_of(row["episode"]),
                )
                if isinstance(decision, Send):
                    sent = decision.step
                    try:
                        command = self._command(row, person, sent, now)
                    except ValidationError as exc:
                        # data the dispatcher would refuse (say a value stored before today's
                        # limits): the step says why, the rest of the batch goes on
                        error = invalid_payload(exc)
                        log.warning(
                            "step not dispatched: its command breaks the contract",
                            extra={"step_id": row["id"], "field": error.field},
                        )
                        why = f"invalid_command: {error.field}: {error.reason}"
                        updates.append(_skip(row, why))
                        counts["skipped"] += 1
                        continue
                    history[cid] = history.get(cid, ContactHistory()).with_send(
                        now, discount=sent.is_discount
                    )
                    updates.append(
                        (
                            row["id"],
                            "dispatched",
                            _withheld(decision),
                            row["due_at"],
                            now,
                            sent.template,
                            sent.offer,
                            sent.is_discount,
                            0,
                        )
                    )
                    tx.emit(
                        self.dispatch_topic,
                        cid,
                        de.DISPATCH_REQUESTED,
                        command,
                        subject=cid,
                    )
                    counts["dispatched"] += 1
                elif isinstance(decision, Defer):
                    updates.append(
                        (
                            row["id"],
                            "pending",
                            decision.reason,
                            decision.until,
                            None,
                            row["template"],
                            row["offer"],
                            row["is_discount"],
                            1,
                        )
                    )
                    counts["deferred"] += 1
                else:
                    reason = decision.reason + (f": {decision.detail}" if decision.detail else "")
                    updates.append(_skip(row, reason))
                    counts["skipped"] += 1
            await conn.execute(_UPDATE, {"now": now, **_columns(updates)})
        for outcome, n in counts.items():
            metrics.STEPS_FIRED.labels(outcome).inc(n)
        return FireResult(len(rows), counts["dispatched"], counts["deferred"], counts["skipped"])

    async def find_passive_users(self) -> int:
        """Claim one batch of due inactivity timers and open their passive-user cases
        (:class:`~services.scheduler.inactivity.InactivityTimer`); commit; return how many
        timers were claimed (0 without an inactivity timer)."""
        if self.inactivity is None:
            return 0
        async with self._unit("find_passive_users") as tx:
            return await self.inactivity.claim(tx)

    async def expire_cases(self) -> int:
        """Close every case whose horizon passed (''removed from the list''), up to
        ``batch_size`` per transaction: each is closed by the case aggregate (pending steps
        cancelled, ``case.closed`` with reason ``horizon`` in the outbox). A case another
        transaction holds is skipped; the next sweep takes it. Returns how many closed."""
        closed = 0
        while True:
            async with self._unit("expire_cases") as tx:
                expired = await store.load_expired_cases(tx.conn, tx.now, self.batch_size)
                results = [case.expire(tx.now) for case in expired]
                changes = [c for c in results if isinstance(c, CaseChange)]
                await store.save_cases(tx, self.outcomes_topic, changes)
            closed += len(changes)
            if len(expired) < self.batch_size or not changes:
                return closed

    async def _history(self, conn: Any, ids: list[str], now: datetime) -> dict[str, ContactHistory]:
        sent: dict[str, list[datetime]] = {}
        discounts: dict[str, list[datetime]] = {}
        rows = await conn.execute(_HISTORY, {"ids": ids, "since": now - self._lookback, "now": now})
        for r in rows:
            sent.setdefault(r.customer_id, []).append(r.fired_at)
            if r.is_discount:
                discounts.setdefault(r.customer_id, []).append(r.fired_at)
        return {
            cid: ContactHistory(sent_at=tuple(times), discounts_at=tuple(discounts.get(cid, ())))
            for cid, times in sent.items()
        }

    def _command(self, row: Any, person: Any, step: Any, now: datetime) -> dict[str, Any]:
        """The dispatch command: everything the dispatcher needs to render and send."""
        context = dict(row["context"] or {})
        return DispatchCommand(
            idempotency_key=f"{row['case_id']}:{row['step_key']}",
            case_id=row["case_id"],
            step_id=row["id"],
            step_key=row["step_key"],
            playbook=row["playbook"],
            playbook_version=row["playbook_version"],
            channel=step.channel,
            template=step.template,
            offer=step.offer,
            is_discount=step.is_discount,
            variant=step.variant,
            valid_until=now + self.offer_valid if step.offer else None,
            customer={  # validated as part of the command: an error names data.customer.*
                "id": person.id,
                "email": person.email,
                "phone": person.phone,
                "name": person.name,
                "locale": person.locale,
                "timezone": person.timezone,
                "plan": person.plan,
                "crm_owner": person.crm_owner,
            },
            reason=(row["episode"] or {}).get("reason"),
            features=[context["feature"]] if context.get("feature") else [],
            feature_description=context.get("feature_description"),
            # a woken step names the competitor that changed; any other step of a customer who
            # left for one names theirs (the comparison email asks how it is going there)
            competitor=context.get("competitor") or (row["episode"] or {}).get("competitor"),
            requested_at=now,
            # the dispatcher holds a late send (a backlog, retry rounds after an outage) to
            # the customer's send window and drops it once the step has expired
            send_window=self._send_window(step.channel, person.timezone),
            expires_at=row["expires_at"],
        ).to_data()

    def _send_window(self, channel: Any, timezone: str | None) -> SendWindowSpec | None:
        window = self.policy.window_for(channel)
        if window is None:
            return None
        return _window_spec(window, resolve_zone(timezone, self.policy.fallback_timezone).key)

    async def run(self) -> None:
        """Fire due steps until stopped: a full batch is followed by the next at once;
        otherwise the timer waits ``poll_seconds``, or until woken by steps written due now
        (in this process, or — ``LISTEN`` — in any)."""
        loop = asyncio.get_running_loop()
        expired_at = 0.0
        listener = _Listener(self.engine, self._wake.set) if self.listen else None
        signal = _commit_signal(self.engine)
        waker = functools.partial(_call_soon, loop, self._wake.set)
        signal.wakers.add(waker)
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # a wake while this pass runs makes the next one start at once
                try:
                    if listener is not None:
                        await listener.ensure()
                except Exception:
                    retrying.exception("listening for due steps failed; polling meanwhile")
                try:
                    if loop.time() - expired_at > 60:
                        expired_at = loop.time()
                        await self.expire_cases()
                    result = await self.fire_once()
                    passive = await self.find_passive_users()
                except Exception:
                    retrying.exception("firing due steps failed; retrying")
                    result, passive = FireResult(0, 0, 0, 0), 0
                if result.claimed < self.batch_size and passive < self.batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
        finally:
            signal.wakers.discard(waker)
            if listener is not None:
                await listener.close()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` (from any thread); nothing if the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


class _CommitSignal:
    """The commits on one engine that wrote steps due now: a connection ``store.steps_due``
    marked is checked back into the pool after its transaction ended, and every timer of this
    process on the engine is woken (after a rollback too: the claim then finds nothing)."""

    def __init__(self, engine: Engine) -> None:
        self.wakers: set[Callable[[], None]] = set()
        event.listen(engine, "checkin", self._checked_in)

    def _checked_in(self, dbapi_connection: Any, record: Any) -> None:
        if record.info.pop(store.STEPS_DUE, None) is not None:
            for wake in tuple(self.wakers):
                wake()


_SIGNALS: weakref.WeakKeyDictionary[Engine, _CommitSignal] = weakref.WeakKeyDictionary()


def _commit_signal(engine: AsyncEngine) -> _CommitSignal:
    signal = _SIGNALS.get(engine.sync_engine)
    if signal is None:
        signal = _SIGNALS[engine.sync_engine] = _CommitSignal(engine.sync_engine)
    return signal


class _Listener:
    """``LISTEN`` on ``store.STEPS_DUE_CHANNEL`` on a connection of its own (taken from the
    engine's pool for as long as the timer runs; asyncpg's ``add_listener``): a commit that
    wrote due steps, in any process, calls ``wake``."""

    def __init__(self, engine: AsyncEngine, wake: Callable[[], None]) -> None:
        self.engine = engine
        self.wake = wake
        self._conn: AsyncConnection | None = None
        self._driver: Any = None

    def _notified(self, *_: Any) -> None:
        self.wake()

    async def ensure(self) -> None:
        """Listen, on a new connection if there is none or it was lost."""
        if self._driver is not None and not self._driver.is_closed():
            return
        await self.close()
        conn = await self.engine.connect()
        try:
            driver: Any = (await conn.get_raw_connection()).driver_connection  # asyncpg's
            await driver.add_listener(store.STEPS_DUE_CHANNEL, self._notified)
            # a lost connection (a database restart) is listened again on the next pass
            driver.add_termination_listener(self._notified)
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        self._conn, self._driver = conn, driver
        self.wake()  # anything committed while nobody listened is claimed now

    async def close(self) -> None:
        conn, driver = self._conn, self._driver
        self._conn = self._driver = None
        if conn is None:
            return
        try:
            driver.remove_termination_listener(self._notified)
            if driver.is_closed():
                await conn.invalidate()
            else:
                await driver.remove_listener(store.STEPS_DUE_CHANNEL, self._notified)
        except Exception:
            log.debug("unlisten failed; the connection is dropped", exc_info=True)
            with contextlib.suppress(Exception):
                await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()


@functools.lru_cache(maxsize=1024)
def _window_spec(window: SendWindow, zone: str) -> SendWindowSpec:
    """A send window in a zone, as commands carry it (a few distinct ones: built once)."""
    return SendWindowSpec(
        start=window.start.isoformat("minutes"),
        end=window.end.isoformat("minutes"),
        timezone=zone,
    )


def _withheld(decision: Send) -> str | None:
    return f"discount withheld: {decision.offer_withheld}" if decision.offer_withheld else None


def _skip(row: Any, reason: str) -> tuple[Any, ...]:
    return (
        row["id"],
        "skipped",
        reason,
        row["due_at"],
        None,
        row["template"],
        row["offer"],
        row["is_discount"],
        0,
    )


def _columns(updates: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    names = (
        "ids",
        "states",
        "reasons",
        "due",
        "fired",
        "templates",
        "offers",
        "discounts",
        "deferred",
    )
    return {name: [u[i] for u in updates] for i, name in enumerate(names)}
