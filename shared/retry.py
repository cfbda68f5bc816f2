"""One way to retry an operation that failed for now: a ``RetryPolicy`` value run by tenacity.

A policy says which failures are worth another attempt (``retry_on``: by default
``is_transient`` — the database or broker unreachable, a deadlock, a serialization failure),
how long to wait before each retry (exponential backoff with full jitter: the wait after
attempt *n* is drawn from ``[first_delay, min(max_delay, first_delay * multiplier ** (n-1))]``,
so replicas that failed together do not come back together), and when to give up
(``max_attempts``, or never; and always once the caller's stopping event is set — a wait is
cut short by it, and after the attempt then running a failure is raised as it is).

Every retry is logged through the log throttle (``shared.logging.throttled``): the first
failure of a kind in full, then one summary line per interval with the count, so an outage
logs a line every ``log_repeat_interval_seconds``, not one per attempt; and counted in
``winback_retries_total{operation}``.

    await TRANSIENT.call(lambda: pipeline.transact(items), "consumer batch", log, stopping)

Tests run a policy without waiting: pass ``sleep`` (a coroutine function taking seconds) to
``call`` / ``retrying``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base, stop_never
from tenacity.wait import wait_base, wait_random_exponential

from shared import metrics
from shared.errors import TransientError
from shared.logging import throttled

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]


def is_transient(exc: BaseException) -> bool:
    """A failure the same work may get past by trying again: ``TransientError``, a
    connection or timeout error, or a database error whose SQLSTATE says so (serialization
    failure or deadlock 40xxx, connection exception 08xxx, operator intervention 57Pxx, too
    many connections or out of resources 53xxx) or whose connection was invalidated."""
    if isinstance(exc, TransientError | ConnectionError | TimeoutError | OSError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code is None and exc.orig is not None and exc.orig.__cause__ is not None:
            code = getattr(exc.orig.__cause__, "sqlstate", None)
        return bool(code) and (str(code).startswith(("40", "08", "57P", "53")))
    return False


def any_exception(exc: BaseException) -> bool:
    """Every ``Exception`` (not a cancellation): for a supervisor restarting a crashed part."""
    return isinstance(exc, Exception)


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures to retry, how long to wait between attempts, and when to give up."""

    first_delay: float = 0.1
    """The wait after the first failed attempt; also the shortest wait ever."""
    max_delay: float = 5.0
    """The cap: no wait is longer."""
    multiplier: float = 2.0
    """Each retry's window is this many times the one before (until the cap)."""
    max_attempts: int | None = None
    """Give up (raise the last failure) after this many attempts; ``None``: never — only the
    stopping event ends the retries."""
    retry_on: Callable[[BaseException], bool] = is_transient
    """Whether a failure is worth another attempt; any other failure is raised at once."""

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError("RetryPolicy needs 0 < first_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("RetryPolicy needs multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("RetryPolicy needs max_attempts >= 1 (or None)")

    def delay_bounds(self, attempt: int) -> tuple[float, float]:
        """The shortest and longest wait after failed attempt ``attempt`` (1 is the first)."""
        if attempt < 1:
            raise ValueError("attempts count from 1")
        try:
            window = self.first_delay * self.multiplier ** (attempt - 1)
        except OverflowError:
            window = self.max_delay
        return self.first_delay, min(window, self.max_delay)

    def wait(self) -> wait_base:
        """The tenacity wait strategy: exponential backoff with full jitter, floored and
        capped (``delay_bounds``)."""
        return wait_random_exponential(
            multiplier=self.first_delay,
            max=self.max_delay,
            exp_base=self.multiplier,
            min=self.first_delay,
        )

    def retrying(
        self,
        operation: str,
        logger: logging.Logger | None = None,
        stopping: asyncio.Event | None = None,
        *,
        sleep: Sleep | None = None,
    ) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy. ``operation`` names what is retried
        in the log line (``"<operation> failed; retrying"``, throttled) and in
        ``winback_retries_total``. A transient failure is logged as a warning naming the
        error; any other (a bug, retried only by a policy that retries everything, such as
        ``RESTART``) as an error with its traceback. The failure that ends the retries is
        raised as it is (``reraise``)."""
        stop: stop_base = stop_never
        if self.max_attempts is not None:
            stop = stop_after_attempt(self.max_attempts)
        if stopping is not None:
            stop = stop | _stop_when_set(stopping)
        return AsyncRetrying(
            sleep=sleep or _napper(stopping),
            stop=stop,
            wait=self.wait(),
            retry=retry_if_exception(self.retry_on),
            before_sleep=_log_retry(operation, logger),
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        operation: str,
        logger: logging.Logger | None = None,
        stopping: asyncio.Event | None = None,
        *,
        sleep: Sleep | None = None,
    ) -> T:
        """``await fn()``, retried by this policy; see ``retrying``."""
        retrying = self.retrying(operation, logger, stopping, sleep=sleep)
        async for attempt in retrying:
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity raises the last failure")  # pragma: no cover


TRANSIENT = RetryPolicy()
"""A transient failure of a transaction (database unreachable, deadlock): 0.1 s, then windows
doubling to 5 s; until it succeeds or the caller stops."""

REQUEST = RetryPolicy(first_delay=0.05, max_delay=0.5, max_attempts=3)
"""A transient failure inside an HTTP request (a deadlock, a serialization failure, a dropped
connection): two more attempts within about a second, then the error goes to the client."""

RESTART = RetryPolicy(first_delay=0.5, max_delay=30.0, retry_on=any_exception)
"""A crashed service part (``shared.runtime``): restarted after 0.5 s, windows doubling to 30 s."""


class _stop_when_set(stop_base):
    """Stop retrying once ``event`` is set (tenacity's ``stop_when_event_set`` for asyncio)."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.event.is_set()


def _napper(stopping: asyncio.Event | None) -> Sleep:
    """Sleep for the wait, or until ``stopping`` is set, whichever comes first."""

    async def nap(seconds: float) -> None:
        if stopping is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=seconds)

    return nap


def _log_retry(operation: str, logger: logging.Logger | None) -> Callable[[RetryCallState], None]:
    retrying = throttled(logger or logging.getLogger(__name__))
    message = f"{operation} failed; retrying"

    def before_sleep(state: RetryCallState) -> None:
        metrics.RETRIES.labels(operation).inc()
        error = state.outcome.exception() if state.outcome is not None else None
        expected = error is None or is_transient(error)
        retrying.log(
            logging.WARNING if expected else logging.ERROR,
            message,
            extra={
                "operation": operation,
                "error": repr(error)[:500],
                "attempt": state.attempt_number,
                "retry_in_seconds": round(state.upcoming_sleep, 3),
            },
            exc_info=None if expected else error,
        )

    return before_sleep


__all__ = [
    "REQUEST",
    "RESTART",
    "TRANSIENT",
    "RetryPolicy",
    "any_exception",
    "is_transient",
]
