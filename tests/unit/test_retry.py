"""The retry policy as a value: its waits, what it retries, when it stops, what it logs.
Nothing here waits: every test passes its own ``sleep`` that only records the delay."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator

import pytest
from prometheus_client import REGISTRY
from tenacity import AsyncRetrying, RetryCallState

from shared import logging as winback_logging
from shared.errors import TransientError
from shared.retry import REQUEST, RESTART, TRANSIENT, RetryPolicy, any_exception, is_transient


class Sleeps:
    """Stands in for ``asyncio.sleep``: records each delay, returns at once (and can set an
    event when asked to, as a stop arriving during a wait would)."""

    def __init__(self, on_sleep: Callable[[], None] | None = None) -> None:
        self.delays: list[float] = []
        self.on_sleep = on_sleep

    async def __call__(self, seconds: float) -> None:
        self.delays.append(float(seconds))
        if self.on_sleep is not None:
            self.on_sleep()


def failing(
    times: int, error: Callable[[], BaseException] = lambda: TransientError("down")
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A function that fails ``times`` times with ``error()``, then returns ``"done"``."""
    calls: list[int] = []

    async def fn() -> str:
        calls.append(len(calls) + 1)
        if len(calls) <= times:
            raise error()
        return "done"

    return fn, calls


def retries_metric(operation: str) -> float:
    value = REGISTRY.get_sample_value("winback_retries_total", {"operation": operation})
    return value or 0.0


@pytest.mark.parametrize(
    ("policy", "attempt", "bounds"),
    [
        (TRANSIENT, 1, (0.1, 0.1)),
        (TRANSIENT, 2, (0.1, 0.2)),
        (TRANSIENT, 3, (0.1, 0.4)),
        (TRANSIENT, 5, (0.1, 1.6)),
        (TRANSIENT, 6, (0.1, 3.2)),
        (TRANSIENT, 7, (0.1, 5.0)),  # the cap
        (TRANSIENT, 60, (0.1, 5.0)),
        (TRANSIENT, 100_000, (0.1, 5.0)),  # no overflow
        (RESTART, 1, (0.5, 0.5)),
        (RESTART, 4, (0.5, 4.0)),
        (RESTART, 7, (0.5, 30.0)),
        (REQUEST, 1, (0.05, 0.05)),
        (REQUEST, 2, (0.05, 0.1)),
        (REQUEST, 5, (0.05, 0.5)),
        (RetryPolicy(first_delay=1, max_delay=100, multiplier=3), 3, (1.0, 9.0)),
        (RetryPolicy(first_delay=1, max_delay=1, multiplier=1), 9, (1.0, 1.0)),
    ],
)
def test_the_wait_after_each_attempt_is_drawn_within_its_bounds(
    policy: RetryPolicy, attempt: int, bounds: tuple[float, float]
) -> None:
    low, high = policy.delay_bounds(attempt)
    assert (low, high) == pytest.approx(bounds)
    wait = policy.wait()
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    random.seed(attempt)
    drawn = [wait(state) for _ in range(500)]
    assert all(low <= d <= high for d in drawn)
    if high - low > 0.01:  # jittered: the draws spread over the window, not one value
        assert max(drawn) - min(drawn) > (high - low) / 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first_delay": 0},
        {"first_delay": 2, "max_delay": 1},
        {"multiplier": 0.5},
        {"max_attempts": 0},
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy needs"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


async def test_transient_failures_are_retried_with_the_policys_waits_until_it_succeeds() -> None:
    fn, calls = failing(4)
    sleeps = Sleeps()
    before = retries_metric("unit-test transient")

    assert await TRANSIENT.call(fn, "unit-test transient", sleep=sleeps) == "done"

    assert calls == [1, 2, 3, 4, 5]
    assert len(sleeps.delays) == 4
    for attempt, delay in enumerate(sleeps.delays, start=1):
        low, high = TRANSIENT.delay_bounds(attempt)
        assert low <= delay <= high
    assert retries_metric("unit-test transient") - before == 4


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("missing"), RuntimeError("x")])
async def test_a_failure_that_is_not_transient_is_raised_at_once(error: Exception) -> None:
    fn, calls = failing(1, lambda: error)
    sleeps = Sleeps()

    with pytest.raises(type(error)) as raised:
        await TRANSIENT.call(fn, "unit-test permanent", sleep=sleeps)

    assert raised.value is error  # the failure itself, not a tenacity RetryError
    assert calls == [1]
    assert sleeps.delays == []


async def test_a_cancellation_is_never_retried_even_by_a_policy_that_retries_everything() -> None:
    fn, calls = failing(1, asyncio.CancelledError)
    sleeps = Sleeps()
    with pytest.raises(asyncio.CancelledError):
        await RESTART.call(fn, "unit-test cancel", sleep=sleeps)
    assert calls == [1]
    assert sleeps.delays == []


async def test_a_set_stopping_event_stops_the_retries_and_raises_the_failure() -> None:
    stopping = asyncio.Event()
    stopping.set()
    fn, calls = failing(10)
    sleeps = Sleeps()

    with pytest.raises(TransientError, match="down"):
        await TRANSIENT.call(fn, "unit-test stopped", stopping=stopping, sleep=sleeps)

    assert calls == [1]  # tried once, not retried
    assert sleeps.delays == []


async def test_a_stop_during_a_wait_ends_the_retries_after_the_attempt_then_running() -> None:
    stopping = asyncio.Event()
    fn, calls = failing(10)
    sleeps = Sleeps(on_sleep=stopping.set)  # the stop arrives while the policy waits

    with pytest.raises(TransientError):
        await TRANSIENT.call(fn, "unit-test stop while waiting", stopping=stopping, sleep=sleeps)

    assert calls == [1, 2]
    assert len(sleeps.delays) == 1


async def test_the_default_wait_is_cut_short_by_the_stopping_event() -> None:
    """The real sleep (no ``sleep`` passed): a 30 s wait ends as soon as the stop comes."""
    stopping = asyncio.Event()
    policy = RetryPolicy(first_delay=30, max_delay=30)
    tried = asyncio.Event()
    calls: list[int] = []

    async def fn() -> None:
        calls.append(len(calls) + 1)
        tried.set()
        raise TransientError("down")

    task = asyncio.create_task(policy.call(fn, "unit-test long wait", stopping=stopping))
    await tried.wait()  # the first attempt failed: the policy waits 30 s
    stopping.set()
    with pytest.raises(TransientError):
        await asyncio.wait_for(task, timeout=5)
    assert calls == [1, 2]


async def test_max_attempts_gives_up_with_the_last_failure() -> None:
    errors: list[TransientError] = []

    def error() -> TransientError:
        errors.append(TransientError(f"down {len(errors) + 1}"))
        return errors[-1]

    fn, calls = failing(10, error)
    sleeps = Sleeps()
    with pytest.raises(TransientError) as raised:
        await REQUEST.call(fn, "unit-test bounded", sleep=sleeps)
    assert calls == [1, 2, 3]
    assert raised.value is errors[-1]
    assert len(sleeps.delays) == 2


async def test_a_policy_that_retries_everything_retries_a_bug_but_is_transient_does_not() -> None:
    assert not is_transient(ZeroDivisionError())
    assert any_exception(ZeroDivisionError())
    fn, calls = failing(2, ZeroDivisionError)
    assert await RESTART.call(fn, "unit-test restart", sleep=Sleeps()) == "done"
    assert calls == [1, 2, 3]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TransientError("broker down"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (OSError("network unreachable"), True),
        (ValueError("bad"), False),
        (KeyError("k"), False),
    ],
)
def test_which_failures_are_transient(error: BaseException, transient: bool) -> None:
    # database errors are classified on the real PostgreSQL (tests/integration/
    # test_unit_of_work.py): serialization failure, deadlock, unique violation
    assert is_transient(error) is transient


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def throttled_lines() -> Iterator[tuple[Lines, winback_logging.RepeatThrottle, logging.Logger]]:
    lines = Lines()
    throttle = winback_logging.RepeatThrottle(10.0, clock=lambda: 0.0, schedule=lambda d, f: None)
    lines.addFilter(throttle)
    logger = logging.getLogger("tests.unit.retry")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield lines, throttle, logger
    finally:
        logger.removeHandler(lines)
        logger.propagate = True


async def test_an_outage_logs_one_line_then_one_summary_through_the_throttle(
    throttled_lines: tuple[Lines, winback_logging.RepeatThrottle, logging.Logger],
) -> None:
    lines, throttle, logger = throttled_lines
    fn, _ = failing(6, lambda: TransientError("database unreachable"))

    await TRANSIENT.call(fn, "unit-test outage", logger, sleep=Sleeps())

    assert [r.getMessage() for r in lines.records] == ["unit-test outage failed; retrying"]
    first = lines.records[0]
    assert first.levelno == logging.WARNING
    assert first.__dict__["attempt"] == 1
    assert "database unreachable" in first.__dict__["error"]
    assert first.exc_info is None  # an expected failure: no traceback
    throttle.flush(force=True)
    assert lines.records[-1].getMessage() == (
        "5 similar tests.unit.retry warnings in the last 10 s: unit-test outage failed; retrying"
    )


async def test_a_crash_retried_by_restart_is_logged_as_an_error_with_its_traceback(
    throttled_lines: tuple[Lines, winback_logging.RepeatThrottle, logging.Logger],
) -> None:
    lines, _, logger = throttled_lines
    fn, _ = failing(1, lambda: ZeroDivisionError("a bug"))

    await RESTART.call(fn, "unit-test part", logger, sleep=Sleeps())

    [record] = lines.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ZeroDivisionError)
