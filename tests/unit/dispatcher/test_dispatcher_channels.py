"""A channel's provider chain: failover, and never a second send after an unknown outcome."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aiolimiter import AsyncLimiter

from services.dispatcher.channels import (
    ChannelSender,
    OutcomeUnknownError,
    Route,
    is_idempotent,
    provider_limiter,
)
from services.dispatcher.errors import (
    DeliveryFailedError,
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TransientSendError,
)
from services.dispatcher.providers import OutboundMessage, SendResult
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.resilience import (
    CircuitBreaker,
    FailoverSender,
    GuardedProvider,
    RetryPolicy,
)
from shared.clock import FrozenClock
from shared.settings import ProviderSettings

MESSAGE = OutboundMessage(
    "case-1:d0",
    Channel.EMAIL,
    "a@example.com",
    RenderedMessage("we_miss_you", Channel.EMAIL, "en", "Hi", "Hi", None),
)


class ScriptedProvider:
    """Answers from a script: each entry is a ``SendError`` to raise or ``None`` to accept."""

    def __init__(self, name: str, script: Sequence[SendError | None]) -> None:
        self._name = name
        self._script = list(script)
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return Channel.EMAIL

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        answer = self._script.pop(0) if self._script else None
        if answer is not None:
            raise answer
        return SendResult(self._name, f"{self._name}-{self.calls}")


async def no_sleep(_: float) -> None:
    return None


def route(provider: ScriptedProvider, idempotent: bool = False) -> Route:
    guarded = GuardedProvider(provider, CircuitBreaker(provider.name, FrozenClock()))
    policy = RetryPolicy(max_attempts=3, retry_ambiguous=idempotent)
    return Route(guarded, FailoverSender([guarded], policy, sleep=no_sleep), idempotent)


def transient(ambiguous: bool = False) -> TransientSendError:
    return TransientSendError("no answer", status_code=503, ambiguous=ambiguous)


async def test_the_primary_is_used_when_it_answers() -> None:
    primary, secondary = ScriptedProvider("p", []), ScriptedProvider("s", [])
    result = await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert result == SendResult("p", "p-1")
    assert secondary.calls == 0


async def test_transient_failures_are_retried_then_failed_over() -> None:
    primary = ScriptedProvider("p", [transient(), transient(), transient()])
    secondary = ScriptedProvider("s", [])
    result = await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert (primary.calls, secondary.calls) == (3, 1)
    assert result.provider == "s"


async def test_a_configuration_error_fails_over_at_once() -> None:
    primary = ScriptedProvider("p", [ProviderConfigurationError("bad key", status_code=401)])
    secondary = ScriptedProvider("s", [])
    result = await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert (primary.calls, result.provider) == (1, "s")


async def test_a_refused_recipient_is_not_tried_elsewhere() -> None:
    primary = ScriptedProvider("p", [PermanentSendError("inactive", suppress=True)])
    secondary = ScriptedProvider("s", [])
    with pytest.raises(DeliveryFailedError) as info:
        await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert info.value.permanent
    assert info.value.suppress
    assert secondary.calls == 0


async def test_an_unknown_outcome_at_a_provider_without_idempotency_stops_everything() -> None:
    primary = ScriptedProvider("p", [transient(ambiguous=True)])
    secondary = ScriptedProvider("s", [])
    with pytest.raises(OutcomeUnknownError) as info:
        await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert (primary.calls, secondary.calls) == (1, 0)
    assert info.value.permanent
    assert info.value.reason.startswith("outcome unknown")


async def test_an_idempotent_provider_is_retried_after_an_unknown_outcome_but_not_failed_over() -> (
    None
):
    retried = ScriptedProvider("hook", [transient(ambiguous=True)])
    result = await ChannelSender("webhook", [route(retried, idempotent=True)]).send(MESSAGE)
    assert (retried.calls, result.provider) == (2, "hook")

    stuck = ScriptedProvider("hook", [transient(ambiguous=True)] * 3)
    secondary = ScriptedProvider("s", [])
    with pytest.raises(OutcomeUnknownError):
        await ChannelSender("webhook", [route(stuck, True), route(secondary)]).send(MESSAGE)
    assert secondary.calls == 0


async def test_everything_down_lists_every_attempt() -> None:
    primary = ScriptedProvider("p", [transient()] * 3)
    secondary = ScriptedProvider("s", [transient()] * 3)
    with pytest.raises(DeliveryFailedError) as info:
        await ChannelSender("email", [route(primary), route(secondary)]).send(MESSAGE)
    assert [(a.provider, a.attempt) for a in info.value.attempts] == [
        ("p", 1),
        ("p", 2),
        ("p", 3),
        ("s", 1),
        ("s", 2),
        ("s", 3),
    ]
    assert not info.value.permanent


@pytest.mark.parametrize(
    ("settings", "idempotent"),
    [
        ({"kind": "file"}, True),
        ({"kind": "webhook", "base_url": "https://h.example", "api_key": "s" * 16}, True),
        ({"kind": "hubspot", "api_key": "t"}, False),
        ({"kind": "hubspot", "api_key": "t", "idempotency_property": "wb_key"}, True),
        ({"kind": "sendgrid", "api_key": "k", "from_address": "a@example.com"}, False),
        ({"kind": "postmark", "api_key": "k", "from_address": "a@example.com"}, False),
        (
            {"kind": "twilio", "api_key": "k", "account_sid": "AC1", "from_address": "+1555"},
            False,
        ),
    ],
)
def test_which_providers_absorb_a_resend(settings: dict[str, str], idempotent: bool) -> None:
    assert is_idempotent(ProviderSettings.model_validate(settings)) is idempotent


@pytest.mark.parametrize(("rate", "per", "period"), [(50.0, 50, 1.0), (1.0, 1, 1.0), (0.5, 1, 2.0)])
async def test_a_provider_rate_becomes_a_limiter_that_can_always_grant_one_request(
    rate: float, per: float, period: float
) -> None:
    limiter = provider_limiter(rate)
    assert isinstance(limiter, AsyncLimiter)
    assert (limiter.max_rate, limiter.time_period) == (per, period)
    await limiter.acquire()  # below 1/s the bucket still holds one request
    assert limiter.has_capacity() is (per > 1)


def test_no_rate_means_no_limiter() -> None:
    assert provider_limiter(None) is None
