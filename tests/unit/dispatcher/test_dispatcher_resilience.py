"""Retry policy, circuit breaker, rate limiting and failover, with fake clocks and providers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from services.dispatcher.errors import (
    CircuitOpenError,
    DeliveryFailedError,
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TransientSendError,
)
from services.dispatcher.providers.base import OutboundMessage, SendResult
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    FailoverSender,
    GuardedProvider,
    RetryPolicy,
    rate_limiter,
)
from shared.clock import FrozenClock
from tests.support.services import eventually


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read afresh (keeps type checkers from over-narrowing)."""
    return breaker.state


MESSAGE = OutboundMessage(
    idempotency_key="case-1:step-1",
    channel=Channel.EMAIL,
    to="aino@example.com",
    content=RenderedMessage("we_miss_you", Channel.EMAIL, "en", "Hi", "Hi Aino", "<p>Hi</p>"),
    tags={"customer_id": "cus_1", "case_id": "case-1", "step_id": "step-1"},
)

Outcome = SendError | SendResult


@dataclass
class ScriptedProvider:
    """A provider that plays back a script of outcomes, one per call, and counts calls."""

    name: str
    script: list[Outcome] = field(default_factory=list)
    channel: Channel = Channel.EMAIL
    calls: int = 0
    hang: bool = False

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        outcome = self.script.pop(0) if self.script else SendResult(self.name, f"{self.name}-ok")
        if isinstance(outcome, SendError):
            raise outcome
        return outcome


@dataclass
class RecordingSleep:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@dataclass
class CountingLimiter:
    acquired: int = 0

    async def acquire(self, amount: float = 1) -> None:
        self.acquired += 1


def transient(provider: str, retry_after: float | None = None) -> TransientSendError:
    return TransientSendError(
        "HTTP 503", provider=provider, status_code=503, retry_after=retry_after
    )


def guarded(
    provider: ScriptedProvider,
    clock: FrozenClock,
    config: CircuitBreakerConfig | None = None,
    limiter: CountingLimiter | None = None,
) -> GuardedProvider:
    return GuardedProvider(provider, CircuitBreaker(provider.name, clock, config), limiter)


def sender(
    providers: Iterable[GuardedProvider], sleep: RecordingSleep, policy: RetryPolicy | None = None
) -> FailoverSender:
    return FailoverSender(
        list(providers), policy or RetryPolicy(max_attempts=3), sleep=sleep, rng=lambda: 0.5
    )


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


# --- retry policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rng", "expected"),
    [
        (1, 1.0, 0.5),
        (2, 1.0, 1.0),
        (3, 1.0, 2.0),
        (4, 1.0, 4.0),
        (10, 1.0, 30.0),  # capped at max_delay
        (3, 0.0, 0.0),  # full jitter reaches down to zero
        (3, 0.25, 0.5),
    ],
)
def test_backoff_is_exponential_with_full_jitter(attempt: int, rng: float, expected: float) -> None:
    policy = RetryPolicy(base_delay=0.5, multiplier=2.0, max_delay=30.0)
    assert policy.backoff(attempt, lambda: rng) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("policy", "attempt", "error", "expected"),
    [
        (RetryPolicy(max_attempts=3), 1, transient("p"), 0.25),
        (RetryPolicy(max_attempts=3), 3, transient("p"), None),  # attempts used up
        (RetryPolicy(max_attempts=3), 1, transient("p", retry_after=7.0), 7.25),  # hint is a floor
        (RetryPolicy(max_retry_after=5.0), 1, transient("p", retry_after=7.0), None),  # too long
        (
            RetryPolicy(retry_ambiguous=False),
            1,
            TransientSendError("read timeout", provider="p", ambiguous=True),
            None,
        ),
        (
            RetryPolicy(retry_ambiguous=True),
            1,
            TransientSendError("read timeout", provider="p", ambiguous=True),
            0.25,
        ),
    ],
)
def test_delay_before_retry(
    policy: RetryPolicy, attempt: int, error: TransientSendError, expected: float | None
) -> None:
    delay = policy.delay_before_retry(attempt, error, lambda: 0.5)
    assert delay == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"base_delay": -1}, {"multiplier": 0.5}, {"max_retry_after": -1}],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- circuit breaker ---------------------------------------------------------------------


def test_circuit_opens_after_consecutive_failures_and_half_opens_after_cooldown(
    clock: FrozenClock,
) -> None:
    changes: list[tuple[str, CircuitState, CircuitState]] = []
    config = CircuitBreakerConfig(consecutive_failures=3, cooldown=timedelta(seconds=30))
    breaker = CircuitBreaker(
        "sendgrid", clock, config, on_state_change=lambda *c: changes.append(c)
    )

    for _ in range(2):
        assert breaker.allow_request()
        breaker.record_failure()
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.allow_request()
    breaker.record_failure()

    assert state_of(breaker) is CircuitState.OPEN
    assert not breaker.allow_request()
    assert breaker.seconds_until_probe() == 30.0
    clock.advance(timedelta(seconds=29))
    assert not breaker.allow_request()
    assert breaker.seconds_until_probe() == 1.0
    clock.advance(timedelta(seconds=1))
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert breaker.allow_request()  # the probe
    assert not breaker.allow_request()  # only one at a time
    breaker.record_success()

    assert state_of(breaker) is CircuitState.CLOSED
    assert changes == [
        ("sendgrid", CircuitState.CLOSED, CircuitState.OPEN),
        ("sendgrid", CircuitState.OPEN, CircuitState.HALF_OPEN),
        ("sendgrid", CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


def test_a_success_resets_the_consecutive_count(clock: FrozenClock) -> None:
    breaker = CircuitBreaker(
        "p", clock, CircuitBreakerConfig(consecutive_failures=2, failure_ratio=None)
    )
    for _ in range(5):
        breaker.record_failure()
        breaker.record_success()
    assert state_of(breaker) is CircuitState.CLOSED


def test_circuit_opens_on_failure_ratio_once_enough_calls(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(
        consecutive_failures=100, failure_ratio=0.5, window=10, min_calls=6
    )
    breaker = CircuitBreaker("p", clock, config)

    for ok in (True, False, True, False, True):  # 2 of 5: too few calls to judge
        breaker.record_success() if ok else breaker.record_failure()
    assert state_of(breaker) is CircuitState.CLOSED
    breaker.record_failure()  # 3 of 6 = 50 %

    assert state_of(breaker) is CircuitState.OPEN


def test_a_failed_probe_reopens_for_a_full_cooldown(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(consecutive_failures=1, cooldown=timedelta(seconds=10))
    breaker = CircuitBreaker("p", clock, config)
    breaker.record_failure()
    clock.advance(timedelta(seconds=10))

    assert breaker.allow_request()
    breaker.record_failure()

    assert state_of(breaker) is CircuitState.OPEN
    assert breaker.seconds_until_probe() == 10.0


def test_a_released_probe_lets_the_next_probe_through(clock: FrozenClock) -> None:
    breaker = CircuitBreaker("p", clock, CircuitBreakerConfig(consecutive_failures=1))
    breaker.record_failure()
    clock.advance(breaker.config.cooldown)
    assert breaker.allow_request()
    assert not breaker.allow_request()

    breaker.release()

    assert breaker.allow_request()


def test_late_outcomes_while_open_are_ignored(clock: FrozenClock) -> None:
    breaker = CircuitBreaker("p", clock, CircuitBreakerConfig(consecutive_failures=1))
    breaker.record_failure()
    breaker.record_success()  # a call that started before the circuit opened
    assert state_of(breaker) is CircuitState.OPEN


# --- failover sender ---------------------------------------------------------------------


async def test_transient_failures_are_retried_with_backoff_then_succeed(clock: FrozenClock) -> None:
    primary = ScriptedProvider("sendgrid", [transient("sendgrid"), transient("sendgrid", 2.0)])
    sleep = RecordingSleep()

    result = await sender([guarded(primary, clock)], sleep).send(MESSAGE)

    assert result == SendResult("sendgrid", "sendgrid-ok")
    assert primary.calls == 3
    assert sleep.delays == [pytest.approx(0.25), pytest.approx(2.25)]


async def test_a_permanent_error_neither_retries_nor_fails_over(clock: FrozenClock) -> None:
    refusal = PermanentSendError(
        "unsubscribed", provider="twilio", error_code="21610", suppress=True
    )
    primary = ScriptedProvider("twilio", [refusal], channel=Channel.SMS)
    secondary = ScriptedProvider("backup-sms", channel=Channel.SMS)
    sleep = RecordingSleep()
    failover = sender([guarded(primary, clock), guarded(secondary, clock)], sleep)

    with pytest.raises(DeliveryFailedError) as caught:
        await failover.send(MESSAGE)

    assert (primary.calls, secondary.calls, sleep.delays) == (1, 0, [])
    error = caught.value
    assert error.permanent
    assert error.suppress
    assert error.last_error is refusal
    assert state_of(failover.providers[0].breaker) is CircuitState.CLOSED  # the provider answered


async def test_primary_failing_transiently_fails_over_to_secondary(clock: FrozenClock) -> None:
    primary = ScriptedProvider("sendgrid", [transient("sendgrid")] * 3)
    secondary = ScriptedProvider("postmark")

    result = await sender(
        [guarded(primary, clock), guarded(secondary, clock)], RecordingSleep()
    ).send(MESSAGE)

    assert result.provider == "postmark"
    assert (primary.calls, secondary.calls) == (3, 1)


async def test_a_configuration_error_fails_over_without_retrying(clock: FrozenClock) -> None:
    bad_key = ProviderConfigurationError("bad token", provider="sendgrid", status_code=401)
    primary = ScriptedProvider("sendgrid", [bad_key])
    secondary = ScriptedProvider("postmark")
    failover = sender([guarded(primary, clock), guarded(secondary, clock)], RecordingSleep())

    result = await failover.send(MESSAGE)

    assert result.provider == "postmark"
    assert primary.calls == 1


async def test_all_providers_failing_raises_one_error_with_every_reason(clock: FrozenClock) -> None:
    primary = ScriptedProvider("sendgrid", [transient("sendgrid", 1.0)] * 2)
    secondary = ScriptedProvider(
        "postmark",
        [TransientSendError("timed out", provider="postmark", ambiguous=True, retry_after=3.0)] * 2,
    )
    seen: list[str] = []
    failover = FailoverSender(
        [guarded(primary, clock), guarded(secondary, clock)],
        RetryPolicy(max_attempts=2),
        sleep=RecordingSleep(),
        rng=lambda: 0.0,
        on_attempt_failed=lambda attempt: seen.append(attempt.provider),
    )

    with pytest.raises(DeliveryFailedError) as caught:
        await failover.send(MESSAGE)

    error = caught.value
    assert [(a.provider, a.attempt) for a in error.attempts] == [
        ("sendgrid", 1),
        ("sendgrid", 2),
        ("postmark", 1),
        ("postmark", 2),
    ]
    assert seen == ["sendgrid", "sendgrid", "postmark", "postmark"]
    assert "sendgrid attempt 1" in error.reason
    assert "postmark attempt 2" in error.reason
    assert not error.permanent
    assert not error.suppress
    assert error.retry_after == 1.0
    assert isinstance(error.__cause__, TransientSendError)


async def test_an_open_circuit_skips_the_primary(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(consecutive_failures=2, cooldown=timedelta(seconds=60))
    primary = ScriptedProvider("sendgrid", [transient("sendgrid")] * 2)
    secondary = ScriptedProvider("postmark")
    failover = sender(
        [guarded(primary, clock, config), guarded(secondary, clock)],
        RecordingSleep(),
        RetryPolicy(max_attempts=5),
    )

    first = await failover.send(MESSAGE)  # two failures open the circuit mid-retry
    second = await failover.send(MESSAGE)

    assert (first.provider, second.provider) == ("postmark", "postmark")
    assert primary.calls == 2
    assert state_of(failover.providers[0].breaker) is CircuitState.OPEN


async def test_the_circuit_closes_again_after_a_successful_probe(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(consecutive_failures=1, cooldown=timedelta(seconds=60))
    primary = ScriptedProvider("sendgrid", [transient("sendgrid")])
    secondary = ScriptedProvider("postmark")
    failover = sender(
        [guarded(primary, clock, config), guarded(secondary, clock)],
        RecordingSleep(),
        RetryPolicy(max_attempts=1),
    )
    assert (await failover.send(MESSAGE)).provider == "postmark"

    clock.advance(timedelta(seconds=60))
    probe = await failover.send(MESSAGE)

    assert probe.provider == "sendgrid"
    assert state_of(failover.providers[0].breaker) is CircuitState.CLOSED


async def test_every_provider_open_reports_circuit_open_attempts(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(consecutive_failures=1, cooldown=timedelta(seconds=60))
    only = ScriptedProvider("sendgrid")
    gp = guarded(only, clock, config)
    gp.breaker.record_failure()

    with pytest.raises(DeliveryFailedError) as caught:
        await sender([gp], RecordingSleep()).send(MESSAGE)

    assert only.calls == 0
    assert isinstance(caught.value.last_error, CircuitOpenError)
    assert caught.value.retry_after == 60.0


async def test_each_call_waits_for_the_rate_limiter(clock: FrozenClock) -> None:
    limiter = CountingLimiter()
    primary = ScriptedProvider("sendgrid", [transient("sendgrid")])

    await sender([guarded(primary, clock, limiter=limiter)], RecordingSleep()).send(MESSAGE)

    assert limiter.acquired == primary.calls == 2


async def test_a_cancelled_probe_does_not_wedge_the_circuit(clock: FrozenClock) -> None:
    config = CircuitBreakerConfig(consecutive_failures=1, cooldown=timedelta(seconds=1))
    primary = ScriptedProvider("sendgrid", hang=True)
    gp = guarded(primary, clock, config)
    gp.breaker.record_failure()
    clock.advance(timedelta(seconds=1))
    failover = sender([gp], RecordingSleep())

    task = asyncio.create_task(failover.send(MESSAGE))

    async def calls() -> int:  # the probe reached the provider, which hangs
        return primary.calls

    assert await eventually(calls, lambda n: n == 1, timeout=5, interval=0.001) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert gp.breaker.allow_request()  # the next probe may go


async def test_a_per_provider_policy_overrides_the_default(clock: FrozenClock) -> None:
    primary = ScriptedProvider("sendgrid", [transient("sendgrid")] * 5)
    gp = guarded(primary, clock)
    gp.policy = RetryPolicy(max_attempts=1)

    with pytest.raises(DeliveryFailedError):
        await sender([gp], RecordingSleep(), RetryPolicy(max_attempts=5)).send(MESSAGE)

    assert primary.calls == 1


def test_failover_sender_needs_providers_of_one_channel(clock: FrozenClock) -> None:
    with pytest.raises(ValueError, match="at least one"):
        FailoverSender([])
    with pytest.raises(ValueError, match="one channel"):
        FailoverSender(
            [
                guarded(ScriptedProvider("sendgrid"), clock),
                guarded(ScriptedProvider("twilio", channel=Channel.SMS), clock),
            ]
        )


async def test_aiolimiter_paces_requests_per_provider() -> None:
    limiter = rate_limiter(max_rate=4, per_seconds=0.2)

    started = time.monotonic()
    for _ in range(8):
        await limiter.acquire()
    elapsed = time.monotonic() - started

    assert elapsed >= 0.15  # 4 at once, the next 4 at 20/s
