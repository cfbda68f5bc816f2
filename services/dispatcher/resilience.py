"""Retry policy, circuit breaker, rate limiting and failover around provider adapters.

``FailoverSender`` is what the dispatcher calls. For each provider in order (primary, then
secondary …) it:

1. skips the provider when its circuit is open (recorded as a ``CircuitOpenError`` attempt);
2. waits for the provider's rate limiter;
3. calls it, retrying transient failures per ``RetryPolicy`` (exponential backoff with full
   jitter, honouring ``retry_after``) while the circuit stays closed;
4. on a ``PermanentSendError`` about the message or recipient, stops at once: no retry, no
   failover — another provider would refuse it too (and an unsubscribed recipient must not be
   reached another way);
5. on a ``ProviderConfigurationError`` (bad credentials, account suspended) does not retry
   that provider but *does* fail over: the message is fine, our account there is not.

When nothing accepted the message it raises ``DeliveryFailedError`` listing every attempt.

Time is injected: the breaker reads a ``shared.clock.Clock``; backoff sleeps through an
injectable ``sleep`` and draws jitter from an injectable ``rng``.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from aiolimiter import AsyncLimiter

from services.dispatcher.errors import (
    CircuitOpenError,
    DeliveryFailedError,
    FailedAttempt,
    PermanentSendError,
    TransientSendError,
)
from services.dispatcher.providers.base import OutboundMessage, Provider, SendResult
from shared.clock import Clock

Sleep = Callable[[float], Awaitable[None]]
Random = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry one provider on transient failures.

    ``max_attempts`` counts the first call. Backoff before attempt ``n + 1`` is drawn uniformly
    from ``[0, min(max_delay, base_delay * multiplier ** (n - 1))]`` ("full jitter"). A provider's
    ``retry_after`` hint is honoured as a floor (plus up to ``base_delay`` of jitter); a hint
    longer than ``max_retry_after`` ends the retries, leaving the caller to fail over or
    reschedule. With ``retry_ambiguous`` false, a failure after which the provider may already
    have the message (a read timeout) is not retried.
    """

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_retry_after: float = 60.0
    retry_ambiguous: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must not be negative")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def backoff(self, attempt: int, rng: Random) -> float:
        """The jittered wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * self.multiplier ** max(0, attempt - 1))
        return rng() * cap

    def delay_before_retry(
        self, attempt: int, error: TransientSendError, rng: Random
    ) -> float | None:
        """Seconds to wait before retrying after failed attempt ``attempt``; ``None`` = stop."""
        if attempt >= self.max_attempts:
            return None
        if error.ambiguous and not self.retry_ambiguous:
            return None
        if error.retry_after is not None:
            if error.retry_after > self.max_retry_after:
                return None
            return error.retry_after + rng() * self.base_delay
        return self.backoff(attempt, rng)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """When a provider's circuit opens and how long it stays open.

    Opens after ``consecutive_failures`` failures in a row, or when at least ``min_calls`` of
    the last ``window`` calls were made and the share of failures among them reaches
    ``failure_ratio`` (``None`` disables the ratio rule). After ``cooldown`` one probe call is
    let through (half-open): success closes the circuit, failure opens it for another cooldown.
    """

    consecutive_failures: int = 5
    failure_ratio: float | None = 0.5
    window: int = 20
    min_calls: int = 10
    cooldown: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.window < 1 or self.min_calls < 1:
            raise ValueError("thresholds must be at least 1")
        if self.failure_ratio is not None and not 0 < self.failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if self.cooldown <= timedelta(0):
            raise ValueError("cooldown must be positive")


StateListener = Callable[[str, CircuitState, CircuitState], None]
"""Called with (breaker name, old state, new state) on every transition, e.g. for metrics."""


class CircuitBreaker:
    """A per-provider circuit breaker driven by an injected clock.

    Use: ``allow_request()`` before a call; then exactly one of ``record_success()``,
    ``record_failure()`` or — if the call ended without an answer (cancelled) — ``release()``.
    Outcomes reported while the circuit is open (calls that started before it opened) are
    ignored. Single event loop only: no locking needed, none done.
    """

    def __init__(
        self,
        name: str,
        clock: Clock,
        config: CircuitBreakerConfig | None = None,
        *,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._listener = on_state_change
        self._state = CircuitState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=self.config.window)
        self._consecutive = 0
        self._opened_at: datetime | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit past its cooldown reads as half-open."""
        if self._state is CircuitState.OPEN and self._cooled_down():
            return CircuitState.HALF_OPEN
        return self._state

    def seconds_until_probe(self) -> float | None:
        """While open: seconds until a probe is allowed; otherwise ``None``."""
        if self._state is not CircuitState.OPEN or self._opened_at is None:
            return None
        due = self._opened_at + self.config.cooldown
        return max(0.0, (due - self._clock.now()).total_seconds())

    def allow_request(self) -> bool:
        """May a call go to the provider now? In half-open only one probe at a time."""
        if self._state is CircuitState.OPEN:
            if not self._cooled_down():
                return False
            self._transition(CircuitState.HALF_OPEN)
        if self._state is CircuitState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        """The provider answered properly (a recipient-level refusal counts as an answer)."""
        if self._state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False
            self._outcomes.clear()
            self._consecutive = 0
            self._transition(CircuitState.CLOSED)
        elif self._state is CircuitState.CLOSED:
            self._outcomes.append(True)
            self._consecutive = 0

    def record_failure(self) -> None:
        """The provider failed (transient error, timeout, or refused our account)."""
        if self._state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False
            self._open()
        elif self._state is CircuitState.CLOSED:
            self._outcomes.append(False)
            self._consecutive += 1
            if self._should_open():
                self._open()

    def release(self) -> None:
        """A permitted call ended without an outcome: let another probe through."""
        if self._state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False

    def _should_open(self) -> bool:
        cfg = self.config
        if self._consecutive >= cfg.consecutive_failures:
            return True
        if cfg.failure_ratio is None or len(self._outcomes) < cfg.min_calls:
            return False
        failures = sum(1 for ok in self._outcomes if not ok)
        return failures / len(self._outcomes) >= cfg.failure_ratio

    def _open(self) -> None:
        self._opened_at = self._clock.now()
        self._outcomes.clear()
        self._consecutive = 0
        self._transition(CircuitState.OPEN)

    def _cooled_down(self) -> bool:
        return (
            self._opened_at is not None
            and self._clock.now() - self._opened_at >= self.config.cooldown
        )

    def _transition(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if old is not new and self._listener is not None:
            self._listener(self.name, old, new)


class Limiter(Protocol):
    """A rate limiter: ``acquire`` waits until one more request may be made."""

    async def acquire(self, amount: float = 1) -> None: ...


def rate_limiter(max_rate: float, per_seconds: float = 1.0) -> AsyncLimiter:
    """A leaky-bucket limiter allowing ``max_rate`` requests per ``per_seconds`` (aiolimiter)."""
    return AsyncLimiter(max_rate, per_seconds)


@dataclass(slots=True)
class GuardedProvider:
    """A provider with its own circuit breaker and (optional) rate limiter."""

    provider: Provider
    breaker: CircuitBreaker
    limiter: Limiter | None = None
    policy: RetryPolicy | None = field(default=None)
    """Overrides the sender's retry policy for this provider when set."""

    @property
    def name(self) -> str:
        return self.provider.name


AttemptListener = Callable[[FailedAttempt], None]


class FailoverSender:
    """Sends through the first provider that accepts, with retries, breakers and limits."""

    def __init__(
        self,
        providers: Sequence[GuardedProvider],
        policy: RetryPolicy | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: Random = random.random,
        on_attempt_failed: AttemptListener | None = None,
    ) -> None:
        if not providers:
            raise ValueError("FailoverSender needs at least one provider")
        channels = {p.provider.channel for p in providers}
        if len(channels) != 1:
            raise ValueError(f"all providers must serve one channel, got {sorted(channels)}")
        self._providers = tuple(providers)
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rng = rng
        self._listener = on_attempt_failed

    @property
    def providers(self) -> tuple[GuardedProvider, ...]:
        return self._providers

    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver ``message`` once, or raise ``DeliveryFailedError`` with every attempt.

        Safe to call concurrently for different messages.
        """
        attempts: list[FailedAttempt] = []
        for guarded in self._providers:
            result = await self._try_provider(guarded, message, attempts)
            if result is not None:
                return result
        raise DeliveryFailedError(attempts) from attempts[-1].error

    async def _try_provider(
        self, guarded: GuardedProvider, message: OutboundMessage, attempts: list[FailedAttempt]
    ) -> SendResult | None:
        """The result, or ``None`` to fail over; raises when failover must not happen."""
        policy = guarded.policy or self._policy
        breaker = guarded.breaker
        attempt = 0
        while True:
            attempt += 1
            if not breaker.allow_request():
                error = CircuitOpenError(
                    f"circuit {breaker.state.value}, call not attempted",
                    provider=guarded.name,
                    retry_after=breaker.seconds_until_probe(),
                )
                self._record(attempts, FailedAttempt(guarded.name, attempt, error))
                return None
            try:
                if guarded.limiter is not None:
                    await guarded.limiter.acquire()
                result = await guarded.provider.send(message)
            except TransientSendError as exc:
                breaker.record_failure()
                self._record(attempts, FailedAttempt(guarded.name, attempt, exc))
                delay = policy.delay_before_retry(attempt, exc, self._rng)
                if delay is None:
                    return None
                await self._sleep(delay)
            except PermanentSendError as exc:
                self._record(attempts, FailedAttempt(guarded.name, attempt, exc))
                if exc.provider_fault:
                    breaker.record_failure()
                    return None
                breaker.record_success()
                raise DeliveryFailedError(attempts) from exc
            except BaseException:
                breaker.release()
                raise
            else:
                breaker.record_success()
                return result

    def _record(self, attempts: list[FailedAttempt], attempt: FailedAttempt) -> None:
        attempts.append(attempt)
        if self._listener is not None:
            self._listener(attempt)
