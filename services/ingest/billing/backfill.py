"""``winback billing backfill stripe|paddle --since 2025-11-01``: the churners of the past
months.

A new user's churners of the past year are the most valuable ones, and the webhooks only see
what happens from now on. The backfill pages through the provider's API — every canceled
subscription, and its customer — maps each with the same pure mapping the webhook uses (a
canceled subscription is read as its cancellation notification: Stripe's
``customer.subscription.deleted``, Paddle's ``subscription.canceled``) and publishes the same
inbound CloudEvent to the first inbound topic, with its real time: when the subscription
ended. Ingest takes it like any other event; the scheduler's late-churn rule places each case
in its current window (no burst of old steps).

- Idempotent: the event id is deterministic — the webhook's own ``evt_…`` while the provider
  still keeps the cancellation event (Stripe 30 days, Paddle 90), so a cancellation both the
  webhook and the backfill saw is one event to ingest's inbox; else
  ``backfill:<provider>:<subscription id>:cancelled`` — so a second run is deduplicated by
  ingest's inbox (source ``/billing/<provider>``, the webhook's) and adds nothing.
- Resumable: a checkpoint file (``Checkpoint``, one per account and topic) holds the last
  subscription done, written after the broker acknowledged its page; an interrupted run
  resumes after it. Finished runs are remembered too (``Window``): each covered the end times
  from its ``--since`` to its start, and a later run publishes only what none of them did
  (less a day of overlap, which the inbox deduplicates) — the inbox keeps its rows
  ``retention.keep_inbox_days``, and a cancellation re-sent after it forgot would open a
  second episode. ``--restart`` ignores the checkpoint.
- Rate limits: one request at a time. Stripe: the ``stripe`` library's own retries
  (``max_network_retries``: connection errors, 409, 5xx and whatever Stripe marks
  ``Stripe-Should-Retry``) plus a backoff of our own on 429 (``RATE_LIMITED``: the library does
  not retry a plain 429). Paddle: the SDK's session retries 429 and 5xx itself (three times,
  honouring ``Retry-After``), then ``RATE_LIMITED``.
- Kept out: subscriptions that ended before ``--since`` (neither API filters on the end time;
  Stripe's ``created`` would miss a subscription created before ``--since`` and canceled after
  it), and those whose customer has another live subscription (not a churner now).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

import orjson

from services.ingest.billing import stripe as stripe_mapping
from services.ingest.billing.common import (
    BillingPayloadError,
    Mapped,
    as_int,
    conform,
    iso_time,
    items,
    obj,
    text,
)
from shared.cloudevents import CloudEvent
from shared.errors import TransientError
from shared.messaging.transport import OutgoingRecord, Publisher
from shared.retry import RetryPolicy

if TYPE_CHECKING:
    from stripe.params import EventListParams, SubscriptionListParams

log = logging.getLogger(__name__)

PROVIDERS = ("stripe", "paddle")
"""The providers the backfill reads (Chargebee: not yet)."""
SOURCE = "/billing/{provider}"
"""The CloudEvent source: the webhook's, so the inbox deduplicates the two."""
PAGE_SIZE = 100
OVERLAP = timedelta(days=1)
"""How far before a finished run's start the next run looks again."""
EVENTS_KEPT = timedelta(days=30)
"""How long Stripe keeps events (``GET /v1/events``)."""
MAX_NETWORK_RETRIES = 4
"""The ``stripe`` library's retries of a request (connection errors, 409, 5xx,
``Stripe-Should-Retry: true``), with its own exponential backoff (0.5 s doubling to 5 s,
jittered)."""


class RateLimited(TransientError):
    """The provider answered 429: slow down and ask again."""


def _rate_limited(exc: BaseException) -> bool:
    return isinstance(exc, RateLimited)


RATE_LIMITED = RetryPolicy(first_delay=1.0, max_delay=30.0, max_attempts=8, retry_on=_rate_limited)
"""A 429 (Stripe's rate limit): waits of 1 s doubling to 30 s, jittered; eight attempts, then
``RateLimited`` (exit code 69: run the command again later to go on)."""


class BackfillError(Exception):
    """The provider refused us for good (a bad API key, a permission): exit code 2."""


@dataclass
class Counts:
    """What one run did (a resumed run counts on from the checkpoint)."""

    read: int = 0
    """Canceled subscriptions read from the provider."""
    published: int = 0
    """Events the broker acknowledged."""
    before_since: int = 0
    """Ended before ``--since``: left alone."""
    active_again: int = 0
    """The customer has another live subscription: not a churner now."""
    not_mapped: int = 0
    """Not the provider's shape (logged with the subscription id): left alone."""
    earlier_run: int = 0
    """Ended within what a finished run published already: left alone."""
    total: int | None = None
    """Canceled subscriptions to read, when the provider says (for the ETA)."""

    @property
    def skipped(self) -> int:
        return self.before_since + self.active_again + self.not_mapped + self.earlier_run

    def as_json(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in _KEPT}

    @classmethod
    def of(cls, value: Any) -> Counts:
        found = obj(value)
        counts = cls()
        for name in _KEPT:
            setattr(counts, name, as_int(found.get(name)) or 0)
        return counts


_KEPT = ("read", "published", "before_since", "active_again", "not_mapped", "earlier_run")
"""The counts a checkpoint keeps (a resumed run counts on)."""


Span = tuple[datetime, datetime]


@dataclass
class State:
    """A checkpoint: the run under way — its ``since``, ``after`` the last subscription done
    (the list resumes after it), when it started and (once done) finished — and ``covered``:
    the end times every finished run published, ``[since, started_at)`` each."""

    after: str | None = None
    counts: Counts = field(default_factory=Counts)
    since: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    covered: list[Span] = field(default_factory=list)


@dataclass(frozen=True)
class Window:
    """Which end times this run publishes: from ``since``, except what a finished run
    published already (less ``OVERLAP`` at each one's end: a subscription that ended just
    before a run started may not have been listed yet; the inbox drops the repeat)."""

    since: datetime
    covered: tuple[Span, ...] = ()

    def skip(self, ended: datetime | None) -> Skip | None:
        if ended is None:
            return None  # the mapping refuses it, naming why
        if ended < self.since:
            return "before_since"
        if any(lo <= ended < hi - OVERLAP for lo, hi in self.covered):
            return "earlier_run"
        return None


class Checkpoint:
    """A JSON file, written whole and atomically (a temporary file renamed over it): the
    backfill is an operator's command that talks to the provider and the broker and needs no
    database of its own — and the checkpoint only saves work: the deterministic event ids and
    ingest's inbox keep a repeated page from adding anything, so a lost file costs a re-read,
    never a duplicate."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> State:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return State()
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning(
                "the backfill checkpoint cannot be read; starting over",
                extra={"path": str(self.path), "error": repr(exc)[:200]},
            )
            return State()
        value = obj(raw)
        covered: list[Span] = []
        for span in value.get("covered") or []:
            if isinstance(span, list) and len(span) == 2:
                lo, hi = _time(span[0]), _time(span[1])
                if lo is not None and hi is not None:
                    covered.append((lo, hi))
        return State(
            after=text(value.get("after"), 255),
            counts=Counts.of(value.get("counts")),
            since=_time(value.get("since")),
            started_at=_time(value.get("started_at")),
            finished_at=_time(value.get("finished_at")),
            covered=covered,
        )

    def save(self, state: State) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "after": state.after,
            "counts": state.counts.as_json(),
            "since": state.since.isoformat() if state.since else None,
            "started_at": state.started_at.isoformat() if state.started_at else None,
            "finished_at": state.finished_at.isoformat() if state.finished_at else None,
            "covered": [[lo.isoformat(), hi.isoformat()] for lo, hi in state.covered],
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def cache_dir() -> Path:
    """``$WINBACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/winback`` (``~/.cache/winback``): where the
    local broker keeps its jars, too."""
    base = os.environ.get("WINBACK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "winback"
    )
    return Path(base)


def checkpoint_path(provider: str, api_key: str, topic: str) -> Path:
    """One checkpoint per provider account (a hash of the API key, never the key) and topic: a
    run for another account never resumes this one, and every run of this account — whatever
    its ``--since`` — knows what the finished ones published."""
    account = hashlib.sha256(api_key.encode()).hexdigest()[:12]
    return cache_dir() / "backfill" / f"{provider}-{account}-{topic}.json"


# --- the provider ---------------------------------------------------------------------------


Skip = Literal["before_since", "active_again", "not_mapped", "earlier_run"]
"""Why a canceled subscription is left alone (a ``Counts`` field)."""


class Source(Protocol):
    """A billing provider's canceled subscriptions, page by page (each item has an ``id``;
    the list resumes ``after`` one), and how each reads: our event, or why it is left alone."""

    provider: str

    async def total(self) -> int | None: ...

    async def prepare(self, since: datetime) -> None: ...

    def pages(self, after: str | None) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def read(
        self, page: list[dict[str, Any]], window: Window, id_key: str | None
    ) -> list[Mapped | Skip]: ...

    async def close(self) -> None: ...


class StripeSource:
    """Stripe's API through the official ``stripe`` library: canceled subscriptions, newest
    first (the library's pagination: ``starting_after`` the last one), each with its customer
    and the customer's current subscriptions expanded."""

    provider = "stripe"

    def __init__(
        self,
        api_key: str,
        api_base: str | None = None,
        *,
        page_size: int = PAGE_SIZE,
        max_network_retries: int = MAX_NETWORK_RETRIES,
        rate_limited: RetryPolicy = RATE_LIMITED,
    ) -> None:
        import stripe

        self._key = api_key
        self._http = stripe.HTTPXClient()
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=self._http,
        )
        self.page_size = page_size
        self.rate_limited = rate_limited
        self.deletions: dict[str, tuple[str, int]] = {}

    async def _call(self, fn: Callable[[], Awaitable[Any]], what: str) -> Any:
        import stripe

        async def attempt() -> Any:
            try:
                return await fn()
            except stripe.RateLimitError as exc:
                raise RateLimited(f"Stripe rate limit (429): {exc.user_message or exc}") from exc

        try:
            return await self.rate_limited.call(attempt, f"stripe {what}", log)
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            # never the key itself in the message (a mock server echoes it back)
            said = str(exc.user_message or exc).replace(self._key, "<the API key>")
            raise BackfillError(f"Stripe refused the API key: {said}") from None

    async def total(self) -> int | None:
        """How many canceled subscriptions there are, from the Search API's ``total_count``
        (``None`` where Search does not answer or gives no count: no ETA then)."""
        import stripe

        try:
            found = await self._call(
                lambda: self.client.v1.subscriptions.search_async(
                    {"query": "status:'canceled'", "limit": 1}
                ),
                "search",
            )
        except (stripe.StripeError, BackfillError, TransientError) as exc:
            log.info("no total for the progress bar: %s", exc)
            return None
        return as_int(found.to_dict().get("total_count"))

    async def pages(self, after: str | None) -> AsyncIterator[list[dict[str, Any]]]:
        params: SubscriptionListParams = {
            "status": "canceled",
            "limit": self.page_size,
            "expand": ["data.customer", "data.customer.subscriptions"],
        }
        if after:
            params["starting_after"] = after
        page = await self._call(lambda: self.client.v1.subscriptions.list_async(params), "list")
        while True:
            yield [s.to_dict() for s in page.data]
            if not page.has_more or not page.data:
                return
            page = await self._call(page.next_page_async, "list")

    async def recent_deletions(self, since: datetime) -> dict[str, tuple[str, int]]:
        """The ``customer.subscription.deleted`` events Stripe still keeps (30 days) from
        ``since``: subscription id → (event id, created)."""
        start = max(since, datetime.now(UTC) - EVENTS_KEPT)
        params: EventListParams = {
            "type": "customer.subscription.deleted",
            "created": {"gte": int(start.timestamp())},
            "limit": self.page_size,
        }
        found: dict[str, tuple[str, int]] = {}
        page = await self._call(lambda: self.client.v1.events.list_async(params), "events")
        while True:
            for event in page.data:
                raw = event.to_dict()
                sub = obj(obj(raw.get("data")).get("object"))
                sub_id, created = text(sub.get("id")), as_int(raw.get("created"))
                if raw.get("type") == params["type"] and sub_id and created is not None:
                    found.setdefault(sub_id, (str(raw["id"]), created))
            if not page.has_more or not page.data:
                return found
            page = await self._call(page.next_page_async, "events")

    async def prepare(self, since: datetime) -> None:
        self.deletions = await self.recent_deletions(since)

    async def read(
        self, page: list[dict[str, Any]], window: Window, id_key: str | None
    ) -> list[Mapped | Skip]:
        return [_stripe_verdict(sub, window, self.deletions, id_key) for sub in page]

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]


def _stripe_verdict(
    sub: dict[str, Any], window: Window, deletions: dict[str, tuple[str, int]], id_key: str | None
) -> Mapped | Skip:
    ended = ended_at(sub)
    skip = window.skip(datetime.fromtimestamp(ended, UTC) if ended is not None else None)
    if skip is not None:
        return skip
    if active_again(sub):
        return "active_again"
    event_id, created = deletions.get(str(sub.get("id")), (None, None))
    try:
        return map_canceled_subscription(sub, event_id, created, id_key)
    except BillingPayloadError as exc:
        return _not_mapped("stripe", sub, exc)


def _not_mapped(provider: str, sub: dict[str, Any], exc: Exception) -> Skip:
    log.warning(
        "a canceled subscription is not the provider's shape; left out",
        extra={"provider": provider, "subscription": str(sub.get("id"))[:100], "reason": str(exc)},
    )
    return "not_mapped"


@dataclass(frozen=True)
class _PaddleAddress:
    """Where the Paddle SDK sends its requests: it knows production and sandbox only, and reads
    nothing of its ``Environment`` but ``base_url`` (``--api-base``, e.g. a local server)."""

    base_url: str


class PaddleSource:
    """Paddle Billing's API through the official ``paddle-python-sdk`` (its authenticated
    session and retries; the raw JSON, which is what the webhook mapping reads): canceled
    subscriptions by id (``after`` the last one), 50 a page (each page's customer ids go into
    one query string); for each page the customers
    (``GET /customers?id=…``: the profile rides along on the cancellation) and their live
    subscriptions (``GET /subscriptions?customer_id=…&status=active,trialing,past_due``)."""

    provider = "paddle"
    LIVE = "active,trialing,past_due"

    def __init__(
        self,
        api_key: str,
        api_base: str | None = None,
        *,
        page_size: int = 50,
        retries: int = 3,
        rate_limited: RetryPolicy = RATE_LIMITED,
    ) -> None:
        from paddle_billing import Client, Environment, Options  # type: ignore[import-untyped]

        environment: Any = _PaddleAddress(api_base.rstrip("/")) if api_base else None
        options = Options(environment or Environment.PRODUCTION)
        self.client = Client(api_key, options=options, retry_count=retries)
        self._key = api_key
        self.page_size = page_size
        self.rate_limited = rate_limited
        self.cancellations: dict[str, tuple[str, str]] = {}

    async def _get(self, path: str, params: dict[str, str], what: str) -> dict[str, Any]:
        from paddle_billing.Exceptions.ApiError import ApiError  # type: ignore[import-untyped]

        async def attempt() -> dict[str, Any]:
            try:
                response = await asyncio.to_thread(self.client.get_raw, path, params)
            except ApiError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status == 429:
                    raise RateLimited(f"Paddle rate limit (429): {exc.detail}") from exc
                if status in (401, 403):
                    said = str(exc.detail).replace(self._key, "<the API key>")
                    raise BackfillError(f"Paddle refused the API key: {said}") from None
                raise
            return obj(response.json())

        result: dict[str, Any] = await self.rate_limited.call(attempt, f"paddle {what}", log)
        return result

    async def _all(self, path: str, params: dict[str, str], what: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            body = await self._get(path, {**params, **({"after": after} if after else {})}, what)
            data = items(body.get("data"))
            found.extend(data)
            more = obj(obj(body.get("meta")).get("pagination")).get("has_more") is True
            if not more or not data:
                return found
            after = str(data[-1].get("id"))

    async def total(self) -> int | None:
        """Paddle's ``estimated_total`` of canceled subscriptions (for the ETA)."""
        try:
            body = await self._get(
                "/subscriptions", {"status": "canceled", "per_page": "1"}, "list"
            )
        except (BackfillError, TransientError, OSError) as exc:
            log.info("no total for the progress bar: %s", exc)
            return None
        return as_int(obj(obj(body.get("meta")).get("pagination")).get("estimated_total"))

    async def prepare(self, since: datetime) -> None:
        """The ``subscription.canceled`` events Paddle still keeps (90 days): subscription id →
        (event id, occurred_at), so a cancellation the webhook delivered too is one event."""
        params = {"event_type": "subscription.canceled", "per_page": "200"}
        for event in await self._all("/events", params, "events"):
            sub_id = text(obj(event.get("data")).get("id"))
            event_id, at = text(event.get("event_id")), text(event.get("occurred_at"))
            if sub_id and event_id and at:
                self.cancellations.setdefault(sub_id, (event_id, at))

    async def pages(self, after: str | None) -> AsyncIterator[list[dict[str, Any]]]:
        params = {"status": "canceled", "per_page": str(self.page_size)}
        while True:
            body = await self._get(
                "/subscriptions", {**params, **({"after": after} if after else {})}, "list"
            )
            page = items(body.get("data"))
            yield page
            more = obj(obj(body.get("meta")).get("pagination")).get("has_more") is True
            if not more or not page:
                return
            after = str(page[-1].get("id"))

    async def read(
        self, page: list[dict[str, Any]], window: Window, id_key: str | None
    ) -> list[Mapped | Skip]:
        recent = [s for s in page if window.skip(_paddle_end(s)) is None]
        ids = sorted({c for s in recent if (c := text(s.get("customer_id"), 100))})
        profiles: dict[str, dict[str, Any]] = {}
        live: dict[str, set[str]] = {}
        if ids:
            joined = ",".join(ids)
            per = str(self.page_size)
            customers = await self._all("/customers", {"id": joined, "per_page": per}, "customers")
            for customer in customers:
                profiles[str(customer.get("id"))] = customer
            query = {"customer_id": joined, "status": self.LIVE, "per_page": per}
            for sub in await self._all("/subscriptions", query, "live subscriptions"):
                live.setdefault(str(sub.get("customer_id")), set()).add(str(sub.get("id")))
        return [self._verdict(s, window, profiles, live, id_key) for s in page]

    def _verdict(
        self,
        sub: dict[str, Any],
        window: Window,
        profiles: dict[str, dict[str, Any]],
        live: dict[str, set[str]],
        id_key: str | None,
    ) -> Mapped | Skip:
        from services.ingest.billing import paddle

        skip = window.skip(_paddle_end(sub))
        if skip is not None:
            return skip
        customer = str(sub.get("customer_id"))
        if live.get(customer, set()) - {str(sub.get("id"))}:
            return "active_again"
        sub_id = text(sub.get("id"))
        event_id, at = self.cancellations.get(sub_id or "", (None, None))
        event = {
            "event_id": event_id or f"backfill:paddle:{sub_id}:cancelled",
            "event_type": "subscription.canceled",
            "occurred_at": at or sub.get("canceled_at"),
            "data": sub,
        }
        try:
            mapped = paddle.map_event(event, id_key)
            if mapped.name is None or customer not in profiles:
                return mapped
            profile = paddle.map_event(
                {
                    "event_id": "profile",
                    "event_type": "customer.updated",
                    "occurred_at": event["occurred_at"],
                    "data": profiles[customer],
                }
            )
        except BillingPayloadError as exc:
            return _not_mapped("paddle", sub, exc)
        data = {**mapped.data, "customer": {**obj(profile.data.get("customer"))}}
        return dataclasses.replace(mapped, data=conform(mapped.name, data))

    async def close(self) -> None:
        self.client.client.close()


def _paddle_end(sub: dict[str, Any]) -> datetime | None:
    return iso_time(sub.get("canceled_at"))


# --- mapping --------------------------------------------------------------------------------


def map_canceled_subscription(
    sub: Any, event_id: str | None = None, created: int | None = None, id_key: str | None = None
) -> Mapped:
    """A canceled Stripe subscription read from the API → what its
    ``customer.subscription.deleted`` webhook maps to, by the webhook's own mapping
    (``stripe.map_event``). The event id is ``event_id`` (the webhook's ``evt_…``, while Stripe
    keeps it) or ``backfill:stripe:<subscription id>:cancelled``; the time is ``created`` (that
    event's) or when the subscription ended (``ended_at``, else ``canceled_at``)."""
    if not isinstance(sub, dict):
        raise BillingPayloadError("a Stripe subscription is a JSON object")
    sub_id = text(sub.get("id"))
    ended = created if created is not None else ended_at(sub)
    if sub_id is None or ended is None:
        raise BillingPayloadError("a canceled Stripe subscription needs an id and ended_at")
    event = {
        "id": event_id or f"backfill:stripe:{sub_id}:cancelled",
        "type": "customer.subscription.deleted",
        "created": ended,
        "data": {"object": sub},
    }
    return stripe_mapping.map_event(event, id_key)


def ended_at(sub: dict[str, Any]) -> int | None:
    """When the subscription ended (Unix seconds): ``ended_at``, else ``canceled_at``."""
    return as_int(sub.get("ended_at")) or as_int(sub.get("canceled_at"))


def active_again(sub: dict[str, Any]) -> bool:
    """The (expanded) customer has another live subscription: they are a customer now."""
    customer = sub.get("customer")
    if not isinstance(customer, dict):
        return False
    subscriptions = obj(customer.get("subscriptions")).get("data")
    if not isinstance(subscriptions, list):
        return False
    return any(
        isinstance(s, dict)
        and s.get("id") != sub.get("id")
        and s.get("status") in stripe_mapping.LIVE
        for s in subscriptions
    )


def cloudevent(mapped: Mapped, type_prefix: str) -> CloudEvent:
    """The inbound CloudEvent of a mapped subscription: as the webhook route builds it."""
    assert mapped.name is not None
    customer = mapped.data.get("customer_id")
    return CloudEvent(
        id=mapped.event_id,
        source=SOURCE.format(provider=mapped.provider),
        type=f"{type_prefix.rstrip('.')}.{mapped.name}",
        time=mapped.occurred_at,
        data=mapped.data,
        subject=customer if isinstance(customer, str) else None,
    )


# --- the run --------------------------------------------------------------------------------


Progress = Callable[[Counts, bool], None]
"""Called after each page (and once at the end, ``True``)."""


@dataclass(frozen=True)
class Run:
    since: datetime
    topic: str
    type_prefix: str
    checkpoint: Checkpoint
    restart: bool = False
    id_key: str | None = None


async def backfill(
    source: Source,
    publisher: Publisher,
    run: Run,
    progress: Progress | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Counts:
    """Page through ``source``, publish each canceled subscription's event to ``run.topic``
    and checkpoint after each page the broker acknowledged. Returns the counts (a resumed run
    counts on from its checkpoint)."""
    state = State() if run.restart else run.checkpoint.load()
    if state.finished_at is not None or (state.since not in (None, run.since)):
        # the last run finished (or another --since was under way): a new run, which knows
        # what the finished ones published
        state = State(covered=state.covered)
    if state.started_at is None:
        state.since, state.started_at = run.since, now()
    window = Window(run.since, tuple(state.covered))
    counts = state.counts
    counts.total = await source.total()
    await source.prepare(run.since)
    if progress is not None:
        progress(counts, False)
    async for page in source.pages(state.after):
        records: list[OutgoingRecord] = []
        for verdict in await source.read(page, window, run.id_key):
            counts.read += 1
            if isinstance(verdict, Mapped) and verdict.name is not None:
                records.append(_record(verdict, run))
            else:
                skip = verdict if isinstance(verdict, str) else "not_mapped"
                setattr(counts, skip, getattr(counts, skip) + 1)
        if records:
            await publisher.publish(records)
            counts.published += len(records)
        if page:
            state.after = text(page[-1].get("id"), 255) or state.after
        run.checkpoint.save(state)
        if progress is not None:
            progress(counts, False)
    state.finished_at = now()
    assert state.started_at is not None
    state.covered = [*state.covered, (run.since, state.started_at)]
    run.checkpoint.save(state)
    if progress is not None:
        progress(counts, True)
    return counts


def _record(mapped: Mapped, run: Run) -> OutgoingRecord:
    event = cloudevent(mapped, run.type_prefix)
    value, headers = event.to_structured()
    key = (event.subject or event.id).encode()
    return OutgoingRecord(run.topic, key, value, tuple(headers))


# --- progress -------------------------------------------------------------------------------


def progress_to(
    stream: TextIO, provider: str, clock: Callable[[], float] = time.monotonic
) -> Progress:
    """A bar with counts, rate and ETA on a terminal (redrawn in place); otherwise one count
    line per page. The ETA needs the provider's total (Stripe's Search ``total_count``);
    without it the line shows the rate only."""
    tty = stream.isatty()
    started = clock()
    first: list[int] = []

    def show(counts: Counts, final: bool) -> None:
        if not first:
            first.append(counts.read)  # a resumed run: the rate counts this run's reads
        elapsed = clock() - started
        rate = (counts.read - first[0]) / elapsed if elapsed > 0 else 0.0
        done = f"{counts.published} published, {counts.skipped} skipped"
        total = counts.total
        if total and counts.read <= total:
            left = total - counts.read
            eta = _duration(left / rate) if rate > 0 else "?"
            width = 30
            filled = width * counts.read // total
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {counts.read}/{total}"
            line = f"backfill {provider} {bar} {done}, {rate:.1f}/s, ETA {eta}"
        else:
            line = f"backfill {provider}: {counts.read} read, {done}, {rate:.1f}/s"
        if tty:
            stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        elif not final:  # the summary follows on stdout
            stream.write(line + "\n")
        stream.flush()

    return show


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def default_progress(provider: str) -> Progress:
    return progress_to(sys.stderr, provider)


__all__ = [
    "PROVIDERS",
    "RATE_LIMITED",
    "BackfillError",
    "Checkpoint",
    "Counts",
    "PaddleSource",
    "RateLimited",
    "Run",
    "Source",
    "State",
    "StripeSource",
    "Window",
    "active_again",
    "backfill",
    "checkpoint_path",
    "cloudevent",
    "map_canceled_subscription",
    "progress_to",
]
