"""The dispatcher's rows: one delivery per (case, step) keyed by its idempotency key, and the
suppression list of hashed contact points. Batched statements; the caller owns the transaction.

What the dispatcher reads of the scheduler's state (a case's status, a customer's erasure,
opt-out, consent and contact profile) it reads from the scheduler's *published read model*,
the views ``dispatcher_case_status`` and ``dispatcher_customer_status`` (migration 0006),
never from the scheduler's tables: the views are the contract the scheduler keeps.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from sqlalchemy import ColumnElement, RowMapping, and_, bindparam, func, or_, select, text
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.dispatcher.model import DispatchCommand
from shared import channels
from shared.db.tables import deliveries, delivery_attempts, delivery_events, suppressions

QUEUED = "queued"
SENDING = "sending"
SENT = "sent"
FAILED = "failed"
SUPPRESSED = "suppressed"
UNKNOWN = "unknown"
"""A crash between the provider call and recording it: the send's fate is not known until
``reconcile`` confirms it (``sent``) or its window passes (``failed``, ``unconfirmed``)."""


async def insert_deliveries(
    conn: AsyncConnection,
    commands: Sequence[tuple[DispatchCommand, Mapping[str, Any]]],
    now: datetime,
) -> int:
    """One queued delivery per idempotency key; a key seen before has no second effect.

    ``commands`` pairs each command with a reference to its event (stored as ``_event``).
    Returns how many deliveries are new."""
    if not commands:
        return 0
    rows = [
        {
            "idempotency_key": c.idempotency_key,
            "case_id": c.case_id,
            "step_key": c.step_key,
            "customer_id": c.customer_id,
            "channel": c.channel,
            "template": c.template,
            "variant": c.variant,
            "crm_owner": c.crm_owner,
            "command": {**c.data, "_event": dict(ref)},
        }
        for c, ref in commands
    ]
    result = await conn.execute(
        _INSERT_DELIVERIES,
        {
            "keys": [r["idempotency_key"] for r in rows],
            "cases": [r["case_id"] for r in rows],
            "steps": [r["step_key"] for r in rows],
            "customers": [r["customer_id"] for r in rows],
            "channels": [r["channel"] for r in rows],
            "templates": [r["template"] for r in rows],
            "variants": [r["variant"] for r in rows],
            "owners": [r["crm_owner"] for r in rows],
            "commands": [orjson.dumps(r["command"]).decode() for r in rows],
            "now": now,
        },
    )
    return len(result.all())


# One statement for the whole batch, its SQL fixed (compiled once, not per batch size).
_INSERT_DELIVERIES = text(
    "INSERT INTO deliveries (idempotency_key, case_id, step_key, customer_id, channel, "
    "template, variant, crm_owner, state, command, created_at, updated_at) "
    "SELECT k, c, s, u, ch, t, v, o, 'queued', CAST(cmd AS jsonb), :now, :now "
    "FROM unnest(CAST(:keys AS text[]), CAST(:cases AS text[]), CAST(:steps AS text[]), "
    "CAST(:customers AS text[]), CAST(:channels AS text[]), CAST(:templates AS text[]), "
    "CAST(:variants AS text[]), CAST(:owners AS text[]), CAST(:commands AS text[])) "
    "WITH ORDINALITY AS r(k, c, s, u, ch, t, v, o, cmd, n) ORDER BY n "
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)


_CLAIM_SQL = (
    "SELECT d.id, d.idempotency_key, d.case_id, d.step_key, d.customer_id, d.channel, "
    "d.template, d.variant, d.crm_owner, d.attempts, d.command, d.created_at, "
    "c.status AS case_status, c.segment AS case_segment, "
    "sc.customer_id IS NOT NULL AS customer_found, COALESCE(sc.erased, false) AS erased, "
    "COALESCE(sc.opted_out_all, false) AS opted_out_all, sc.consent, sc.suppressed_channels, "
    "sc.name, sc.email, sc.phone, sc.timezone, sc.mrr_minor, sc.currency "
    "FROM deliveries AS d "
    "LEFT JOIN dispatcher_case_status AS c ON c.case_id = d.case_id "
    "LEFT JOIN dispatcher_customer_status AS sc ON sc.customer_id = d.customer_id "
    "WHERE d.state = 'queued' AND (d.not_before IS NULL OR d.not_before <= :now) "
    "ORDER BY d.id LIMIT :n FOR UPDATE OF d SKIP LOCKED"
)
_CLAIM = text(_CLAIM_SQL).columns(
    command=JSONB, case_segment=JSONB, consent=JSONB, suppressed_channels=JSONB
)


async def claim_queued(conn: AsyncConnection, now: datetime, n: int) -> Sequence[RowMapping]:
    """Lock up to ``n`` due queued deliveries (others' locked rows are skipped), with the
    case and customer state the re-check needs."""
    return (await conn.execute(_CLAIM, {"now": now, "n": n})).mappings().all()


_SUPPRESSED = text(
    "SELECT address_hash, reason FROM suppressions "
    "WHERE address_hash = ANY(CAST(:hashes AS text[]))"
)


async def suppressed(conn: AsyncConnection, hashes: Sequence[str]) -> dict[str, str]:
    """Which of these suppression keys are on the list, with the reason."""
    if not hashes:
        return {}
    rows = await conn.execute(_SUPPRESSED, {"hashes": sorted(set(hashes))})
    return {r.address_hash: r.reason for r in rows}


@dataclass(frozen=True, slots=True)
class Suppression:
    channel: str
    address_hash: str
    reason: str
    customer_id: str | None


async def add_suppressions(
    conn: AsyncConnection, rows: Sequence[Suppression], now: datetime
) -> None:
    """Put keys on the suppression list (the first reason recorded stays)."""
    unique = {(r.channel, r.address_hash): r for r in rows}
    if not unique:
        return
    await conn.execute(
        insert(suppressions)
        .values(
            [
                {
                    "channel": r.channel,
                    "address_hash": r.address_hash,
                    "reason": r.reason[:40],
                    "customer_id": r.customer_id,
                    "created_at": now,
                }
                for r in unique.values()
            ]
        )
        .on_conflict_do_nothing(
            index_elements=[suppressions.c.channel, suppressions.c.address_hash]
        )
    )


@dataclass(frozen=True, slots=True)
class ClaimUpdate:
    """A claimed row's new state: ``sending`` (attempt counted) or final without a send."""

    id: int
    state: str
    error: str | None = None
    subject: str | None = None
    body: str | None = None
    not_before: datetime | None = None
    """For a row left ``queued``: held until then (quiet hours)."""


_MARK_CLAIMED = text(
    "UPDATE deliveries AS d SET state = u.state, error = u.error, subject = u.subject, "
    "body = u.body, attempts = d.attempts + u.inc, not_before = u.not_before, "
    "updated_at = :now "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:states AS text[]), CAST(:errors AS text[]), "
    "CAST(:subjects AS text[]), CAST(:bodies AS text[]), CAST(:incs AS integer[]), "
    "CAST(:not_before AS timestamptz[])) "
    "AS u(id, state, error, subject, body, inc, not_before) WHERE d.id = u.id"
)


async def mark_claimed(
    conn: AsyncConnection, updates: Sequence[ClaimUpdate], now: datetime
) -> None:
    if not updates:
        return
    await conn.execute(
        _MARK_CLAIMED,
        {
            "now": now,
            "ids": [u.id for u in updates],
            "states": [u.state for u in updates],
            "errors": [u.error for u in updates],
            "subjects": [u.subject for u in updates],
            "bodies": [u.body for u in updates],
            "incs": [1 if u.state == SENDING else 0 for u in updates],
            "not_before": [u.not_before for u in updates],
        },
    )


@dataclass(frozen=True, slots=True)
class Finish:
    """What happened to a send: the row moves on only if it is still ours (``attempts``)."""

    id: int
    attempts: int
    state: str
    provider: str | None = None
    provider_message_id: str | None = None
    error: str | None = None
    sent_at: datetime | None = None
    not_before: datetime | None = None


_FINISH = text(
    "WITH u AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]), "
    "CAST(:states AS text[]), CAST(:providers AS text[]), CAST(:pmids AS text[]), "
    "CAST(:errors AS text[]), CAST(:sent AS timestamptz[]), CAST(:not_before AS timestamptz[]), "
    "CAST(:classes AS text[])) "
    "AS u(id, attempts, state, provider, pmid, error, sent_at, not_before, class)), "
    "done AS (UPDATE deliveries AS d SET state = u.state, provider = u.provider, "
    "provider_message_id = u.pmid, error = u.error, sent_at = u.sent_at, "
    "not_before = u.not_before, updated_at = :now FROM u "
    "WHERE d.id = u.id AND d.state = 'sending' AND d.attempts = u.attempts "
    "RETURNING d.id, u.attempts, u.state, u.provider, u.pmid, u.error, u.class), "
    "logged AS (INSERT INTO delivery_attempts (delivery_id, attempt, provider, "
    "provider_message_id, outcome, response_class, error, finished_at) "
    "SELECT id, attempts, provider, pmid, "
    "CASE state WHEN 'queued' THEN 'requeued' ELSE state END, class, error, :now FROM done) "
    "SELECT id FROM done"
)
"""Records each result and, in the same statement, the attempt in the message log
(``delivery_attempts``): only for rows still ``sending`` by this attempt."""

_HTTP_STATUS = re.compile(r"\(HTTP ([1-5])\d\d\)")


def response_class(state: str, error: str | None) -> str:
    """The provider's answer to an attempt, as the message log shows it: ``2xx`` (accepted;
    the file provider too), ``4xx``/``5xx`` (the last HTTP status the error names, any class),
    ``no_response`` (a timeout, a dropped connection, an open circuit: no status)."""
    if state == SENT:
        return "2xx"
    found = _HTTP_STATUS.findall(error or "")
    return f"{found[-1]}xx" if found else "no_response"


async def finish(conn: AsyncConnection, rows: Sequence[Finish], now: datetime) -> set[int]:
    """Record send results; returns the ids that were still ``sending`` by this attempt (a
    row another dispatcher recovered in the meantime is left alone)."""
    if not rows:
        return set()
    result = await conn.execute(
        _FINISH,
        {
            "now": now,
            "ids": [r.id for r in rows],
            "attempts": [r.attempts for r in rows],
            "states": [r.state for r in rows],
            "providers": [r.provider for r in rows],
            "pmids": [r.provider_message_id for r in rows],
            "errors": [r.error[:2000] if r.error else None for r in rows],
            "sent": [r.sent_at for r in rows],
            "not_before": [r.not_before for r in rows],
            "classes": [response_class(r.state, r.error) for r in rows],
        },
    )
    return {r.id for r in result}


_STALE = text(
    "SELECT id, idempotency_key, case_id, step_key, customer_id, channel, template, variant, "
    "crm_owner, attempts, command, provider, provider_message_id FROM deliveries "
    "WHERE state = 'sending' AND updated_at < :cutoff "
    "ORDER BY updated_at LIMIT :n FOR UPDATE SKIP LOCKED"
)


async def stale_sending(conn: AsyncConnection, cutoff: datetime, n: int) -> Sequence[RowMapping]:
    """Deliveries left ``sending`` since before ``cutoff``: their dispatcher died mid-send."""
    return (await conn.execute(_STALE, {"cutoff": cutoff, "n": n})).mappings().all()


_LOG_UNKNOWN = text(
    "INSERT INTO delivery_attempts (delivery_id, attempt, provider, provider_message_id, "
    "outcome, response_class, error, finished_at) "
    "SELECT id, attempts, provider, provider_message_id, :outcome, 'unknown', :error, :now "
    "FROM deliveries WHERE id = ANY(CAST(:ids AS bigint[])) AND state = 'sending'"
)
"""A send whose dispatcher died mid-request: its attempt's answer is not known."""


async def mark_unknown(conn: AsyncConnection, ids: Sequence[int], now: datetime) -> None:
    """Deliveries left ``sending`` by a dead dispatcher: their attempt is logged with an
    unknown answer and the row waits, ``unknown``, for reconciliation."""
    if ids:
        await conn.execute(
            _LOG_UNKNOWN,
            {"ids": list(ids), "outcome": UNKNOWN, "error": "dispatcher crashed", "now": now},
        )
        await conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(list(ids)), deliveries.c.state == SENDING)
            .values(state=UNKNOWN, unknown_since=now, not_before=None, updated_at=now)
        )


_UNKNOWN_DUE = text(
    _CLAIM_SQL.replace("d.attempts, d.command,", "d.attempts, d.command, d.unknown_since,")
    .replace(
        "WHERE d.state = 'queued' AND",
        "WHERE d.unknown_since IS NOT NULL AND d.state = 'unknown' AND",
    )
    .replace("ORDER BY d.id", "ORDER BY d.unknown_since")
).columns(command=JSONB, case_segment=JSONB, consent=JSONB, suppressed_channels=JSONB)


async def unknown_due(conn: AsyncConnection, now: datetime, n: int) -> Sequence[RowMapping]:
    """Lock up to ``n`` unknown deliveries due for a reconciliation step (``not_before``
    passed), oldest first, with what a resend needs (the claim's columns)."""
    return (await conn.execute(_UNKNOWN_DUE, {"now": now, "n": n})).mappings().all()


async def hold_unknown(
    conn: AsyncConnection, ids: Sequence[int], until: datetime, now: datetime, *, resend: bool
) -> None:
    """Not looked at again before ``until``; a resend counts an attempt (its claim token)."""
    if ids:
        await conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(list(ids)), deliveries.c.state == UNKNOWN)
            .values(
                not_before=until,
                attempts=deliveries.c.attempts + (1 if resend else 0),
                updated_at=now,
            )
        )


@dataclass(frozen=True, slots=True)
class Confirmed:
    """An unknown delivery the provider confirmed having: how (``webhook``, ``resend``,
    ``search``); ``attempts`` is the resend's claim token (None: any)."""

    id: int
    how: str
    provider: str | None
    provider_message_id: str | None
    attempts: int | None = None


_CONFIRM = text(
    "WITH u AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]), "
    "CAST(:providers AS text[]), CAST(:pmids AS text[]), CAST(:classes AS text[])) "
    "AS u(id, attempts, provider, pmid, class)), "
    "done AS (UPDATE deliveries AS d SET state = 'sent', "
    "provider = COALESCE(u.provider, d.provider), "
    "provider_message_id = COALESCE(u.pmid, d.provider_message_id), error = NULL, "
    "sent_at = :now, not_before = NULL, updated_at = :now FROM u "
    "WHERE d.id = u.id AND d.state = 'unknown' "
    "AND (u.attempts IS NULL OR d.attempts = u.attempts) "
    "RETURNING d.id, d.attempts, d.provider, d.provider_message_id, u.class), "
    "logged AS (INSERT INTO delivery_attempts (delivery_id, attempt, provider, "
    "provider_message_id, outcome, response_class, error, finished_at) "
    "SELECT id, attempts, provider, provider_message_id, 'sent', class, NULL, :now FROM done) "
    "SELECT id FROM done"
)


async def confirm_unknown(
    conn: AsyncConnection, rows: Sequence[Confirmed], now: datetime
) -> set[int]:
    """Unknown → ``sent`` (logged in the message log); returns the ids that were still
    unknown (and, for a resend, still by its attempt): only those publish ``message.sent``."""
    unique = {r.id: r for r in rows}
    if not unique:
        return set()
    items = list(unique.values())
    result = await conn.execute(
        _CONFIRM,
        {
            "now": now,
            "ids": [r.id for r in items],
            "attempts": [r.attempts for r in items],
            "providers": [r.provider for r in items],
            "pmids": [r.provider_message_id for r in items],
            "classes": ["2xx" if r.how == "resend" else "reconciled" for r in items],
        },
    )
    return {r.id for r in result}


async def reported_by_provider(
    conn: AsyncConnection, ids: Sequence[int], kinds: Collection[str]
) -> dict[int, str]:
    """Which of these deliveries a provider webhook already reported on (``delivery_events``:
    an event may arrive while the row is still ``sending``), with the provider's name."""
    if not ids:
        return {}
    e = delivery_events.c
    rows = await conn.execute(
        select(e.delivery_id, e.provider)
        .where(e.delivery_id.in_(list(ids)), e.kind.in_(sorted(kinds)))
        .order_by(e.delivery_id, e.id)
    )
    found: dict[int, str] = {}
    for delivery_id, provider in rows:
        found.setdefault(delivery_id, provider)
    return found


async def expire_unknown(
    conn: AsyncConnection, ids: Sequence[int], reason: str, now: datetime
) -> None:
    """Unknown deliveries nothing confirmed in time: ``failed`` with ``reason``."""
    if ids:
        await conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(list(ids)), deliveries.c.state == UNKNOWN)
            .values(state=FAILED, error=reason, not_before=None, updated_at=now)
        )


async def count_unknown(conn: AsyncConnection) -> int:
    """Deliveries waiting for reconciliation (on the partial index of migration 0008)."""
    found = await conn.scalar(
        select(func.count())
        .select_from(deliveries)
        .where(deliveries.c.unknown_since.is_not(None), deliveries.c.state == UNKNOWN)
    )
    return int(found or 0)


_ERASED_CUSTOMER = bindparam(
    "erased", value={"email": None, "phone": None, "name": None}, type_=JSONB
)


async def erase(
    conn: AsyncConnection, customer_ids: Sequence[str], now: datetime
) -> Sequence[RowMapping]:
    """GDPR erasure: queued deliveries end suppressed (returned, for their outcome events);
    rendered messages and contact points go from every delivery of these customers."""
    if not customer_ids:
        return []
    ids = sorted(set(customer_ids))
    cancelled = (
        (
            await conn.execute(
                deliveries.update()
                .where(deliveries.c.customer_id.in_(ids), deliveries.c.state == QUEUED)
                .values(state=SUPPRESSED, error="customer erased", updated_at=now)
                .returning(*deliveries.c)
            )
        )
        .mappings()
        .all()
    )
    customer = func.coalesce(deliveries.c.command["customer"], text("'{}'::jsonb"))
    await conn.execute(
        deliveries.update()
        .where(deliveries.c.customer_id.in_(ids))
        .values(
            subject=None,
            body=None,
            command=func.jsonb_set(
                deliveries.c.command,
                text("'{customer}'"),
                customer.op("||")(_ERASED_CUSTOMER),
            ),
            updated_at=now,
        )
    )
    # the message log keeps what happened, not the provider's words (they may quote an address)
    of_them = select(deliveries.c.id).where(deliveries.c.customer_id.in_(ids))
    await conn.execute(
        delivery_attempts.update()
        .where(delivery_attempts.c.delivery_id.in_(of_them))
        .values(error=None)
    )
    await conn.execute(
        delivery_events.update()
        .where(delivery_events.c.delivery_id.in_(of_them))
        .values(reason=None)
    )
    return cancelled


async def find_for_events(
    conn: AsyncConnection,
    keys: Sequence[str],
    message_ids: Sequence[str],
    providers: Sequence[str],
) -> list[RowMapping]:
    """Deliveries matching provider events: by our idempotency key (echoed in provider
    metadata), or by the provider's message id."""
    conditions: list[ColumnElement[bool]] = []
    if keys:
        conditions.append(deliveries.c.idempotency_key.in_(sorted(set(keys))))
    if message_ids and providers:
        conditions.append(
            and_(
                deliveries.c.provider.in_(sorted(set(providers))),
                deliveries.c.provider_message_id.in_(sorted(set(message_ids))),
            )
        )
    if not conditions:
        return []
    rows = await conn.execute(deliveries.select().where(or_(*conditions)))
    return list(rows.mappings())


_PROFILE_ADDRESSES: Final = {
    column: text(f"SELECT {column} FROM dispatcher_customer_status WHERE customer_id = :id")
    for column in ("email", "phone")
}
"""A customer's address on file, from the scheduler's published read model (migration 0006)."""


async def contact_points(conn: AsyncConnection, customer_id: str, channel: str) -> set[str]:
    """Every address we know for the customer on the channel (profile and past deliveries)."""
    field = channels.address_fields().get(channel)
    if field is None or field not in _PROFILE_ADDRESSES:
        return set()
    found: set[str] = set()
    profile = await conn.scalar(_PROFILE_ADDRESSES[field], {"id": customer_id})
    if profile:
        found.add(profile)
    rows = await conn.execute(
        select(deliveries.c.command["customer"][field].astext)
        .where(deliveries.c.customer_id == customer_id, deliveries.c.channel == channel)
        .distinct()
    )
    found.update(value for (value,) in rows if value)
    return found


async def count_by_state(conn: AsyncConnection) -> dict[str, int]:
    """Queued, sending and unknown deliveries (each has a partial index)."""
    queued = await conn.scalar(
        select(func.count()).select_from(deliveries).where(deliveries.c.state == QUEUED)
    )
    sending = await conn.scalar(
        select(func.count()).select_from(deliveries).where(deliveries.c.state == SENDING)
    )
    unknown = await count_unknown(conn)
    return {QUEUED: int(queued or 0), SENDING: int(sending or 0), UNKNOWN: unknown}
