"""Each channel's provider chain, built from settings: adapters over pooled HTTP clients, each
with its own circuit breaker, rate limiter and retry policy, and failover between them.

Never a second send: a failure after which the provider may already hold the message (a read
timeout, a connection dropped before the answer — ``TransientSendError.ambiguous``) is only
retried on a provider that deduplicates on our idempotency key, and it is never failed over to
the next provider: that one would not know the key, and the customer could get two messages.
Such a delivery ends as ``message.failed`` with an "outcome unknown" reason.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import certifi
import httpx

from services.dispatcher import metrics
from services.dispatcher.errors import (
    CircuitOpenError,
    DeliveryFailedError,
    FailedAttempt,
    PermanentSendError,
    ProviderConfigurationError,
    TransientSendError,
)
from services.dispatcher.providers import (
    HubSpotTaskProvider,
    OutboundMessage,
    PostmarkProvider,
    Provider,
    SendGridProvider,
    SendResult,
    TwilioProvider,
    WebhookProvider,
    hubspot,
    postmark,
    sendgrid,
    twilio,
)
from services.dispatcher.providers.file import FileProvider
from services.dispatcher.providers.hubspot import ContactCache, SentSteps
from services.dispatcher.rendering import Channel
from services.dispatcher.resilience import (
    AttemptListener,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    FailoverSender,
    GuardedProvider,
    Limiter,
    RetryPolicy,
    StateListener,
    rate_limiter,
)
from services.dispatcher.transport import provider_client
from shared.clock import Clock
from shared.settings import CHANNEL_KINDS, DispatcherSettings, ProviderSettings

TWILIO_CALLBACK_PATH = "/v1/webhooks/twilio"
DEFAULT_BASE_URLS = {
    "sendgrid": sendgrid.DEFAULT_BASE_URL,
    "postmark": postmark.DEFAULT_BASE_URL,
    "twilio": twilio.DEFAULT_BASE_URL,
    "hubspot": hubspot.DEFAULT_BASE_URL,
}


class OutcomeUnknownError(DeliveryFailedError):
    """A provider may have the message but did not say so: no retry elsewhere, no failover."""

    def __init__(self, attempts: Sequence[FailedAttempt]) -> None:
        super().__init__(attempts)
        self.permanent = True
        self.retry_after = None
        self.reason = "outcome unknown (the provider may have sent it): " + self.reason


class RoundRobin:
    """One provider spread over several adapter instances, one per HTTP client."""

    def __init__(self, instances: Sequence[Provider]) -> None:
        if not instances:
            raise ValueError("RoundRobin needs at least one provider instance")
        self._instances = tuple(instances)
        self._next: Iterator[Provider] = itertools.cycle(self._instances)

    @property
    def name(self) -> str:
        return self._instances[0].name

    @property
    def channel(self) -> Channel:
        return self._instances[0].channel

    async def send(self, message: OutboundMessage) -> SendResult:
        return await next(self._next).send(message)


class DuplicateIsSuccess:
    """For a provider that refuses a second create for our key (HubSpot with a unique task
    property answers 409): the refusal means the first call got through."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    @property
    def name(self) -> str:
        return self._provider.name

    @property
    def channel(self) -> Channel:
        return self._provider.channel

    async def send(self, message: OutboundMessage) -> SendResult:
        try:
            return await self._provider.send(message)
        except PermanentSendError as exc:
            if exc.error_code == "duplicate":
                return SendResult(self._provider.name, None)
            raise


class Instrumented:
    """Latency, errors and retries of one provider, for the metrics."""

    def __init__(self, provider: Provider, remember: int = 10_000) -> None:
        self._provider = provider
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        labels = (provider.channel.value, provider.name)
        # the labelled children, looked up once (``labels()`` per call is a lock and a dict)
        self._retries = metrics.RETRIES.labels(*labels)
        self._seconds = metrics.PROVIDER_SECONDS.labels(*labels)
        self._errors = {
            kind: metrics.PROVIDER_ERRORS.labels(*labels, kind)
            for kind in ("configuration", "permanent", "transient")
        }

    @property
    def name(self) -> str:
        return self._provider.name

    @property
    def channel(self) -> Channel:
        return self._provider.channel

    async def send(self, message: OutboundMessage) -> SendResult:
        key = message.idempotency_key
        if key in self._seen:
            self._retries.inc()
        else:
            self._seen[key] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        started = time.perf_counter()
        try:
            return await self._provider.send(message)
        except ProviderConfigurationError:
            self._errors["configuration"].inc()
            raise
        except PermanentSendError:
            self._errors["permanent"].inc()
            raise
        except TransientSendError:
            self._errors["transient"].inc()
            raise
        finally:
            self._seconds.observe(time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class Route:
    """One provider of a channel's chain: guarded, with its own single-provider sender."""

    guarded: GuardedProvider
    sender: FailoverSender
    idempotent: bool

    @property
    def name(self) -> str:
        return self.guarded.name

    @property
    def breaker(self) -> CircuitBreaker:
        return self.guarded.breaker


class ChannelSender:
    """Sends through the channel's providers in order (failover), once."""

    def __init__(self, channel: str, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError(f"channel {channel} needs at least one provider")
        self.channel = channel
        self.routes = tuple(routes)

    @property
    def idempotent(self) -> bool:
        """Every provider deduplicates on our key: a resend after a crash is harmless."""
        return all(route.idempotent for route in self.routes)

    def route(self, name: str) -> Route:
        return next(r for r in self.routes if r.name == name)

    async def send(self, message: OutboundMessage) -> SendResult:
        """The first provider's acceptance, or ``DeliveryFailedError`` with every attempt
        (``OutcomeUnknownError`` when a provider may have the message after all)."""
        attempts: list[FailedAttempt] = []
        for route in self.routes:
            try:
                return await route.sender.send(message)
            except DeliveryFailedError as exc:
                attempts.extend(exc.attempts)
                last = exc.last_error
                if isinstance(last, TransientSendError) and last.ambiguous:
                    raise OutcomeUnknownError(attempts) from exc
                if exc.permanent:
                    raise DeliveryFailedError(attempts) from exc
        raise DeliveryFailedError(attempts)


# --- building the chains from settings --------------------------------------------------------


def make_http_clients(settings: DispatcherSettings) -> list[httpx.AsyncClient]:
    """Clients for provider calls (used round robin); close them with ``aclose`` when done.

    ``http.transport = "pooled"`` (the default) puts each client over ``transport.
    PooledTransport`` (HTTP/1.1 keep-alive connections, O(1) checkout); ``"httpx"`` keeps httpx's
    own transport, whose cost per request grows with its pool (measured here: 8 connections
    per client about 0.6 ms of CPU per request, 32 about 2.6 ms), so prefer many small
    clients with it. All share one TLS context (the CA bundle is loaded once)."""
    http = settings.http
    timeout = httpx.Timeout(
        connect=http.connect_timeout,
        read=http.read_timeout,
        write=http.read_timeout,
        pool=http.read_timeout,
    )
    tls = ssl.create_default_context(cafile=certifi.where())
    if http.transport == "pooled":
        return [
            provider_client(max_connections=http.max_connections, timeout=timeout, ssl_context=tls)
            for _ in range(http.clients)
        ]
    limits = httpx.Limits(
        max_connections=http.max_connections,
        max_keepalive_connections=http.max_connections,
        keepalive_expiry=30,
    )
    return [
        httpx.AsyncClient(limits=limits, timeout=timeout, verify=tls) for _ in range(http.clients)
    ]


def provider_limiter(rate: float | None) -> Limiter | None:
    """``rate`` requests per second; below 1/s, one request per ``1 / rate`` seconds (a
    bucket must hold at least one request)."""
    if not rate:
        return None
    if rate >= 1:
        return rate_limiter(rate)
    return rate_limiter(1, 1 / rate)


def _secret(provider: ProviderSettings) -> str:
    return provider.api_key.get_secret_value() if provider.api_key is not None else ""


def _adapter(
    provider: ProviderSettings,
    channel: Channel,
    client: httpx.AsyncClient,
    clock: Clock,
    public_base_url: str,
    crm: CrmLookup | None = None,
) -> Provider:
    label = provider.label
    if provider.kind == "sendgrid":
        return SendGridProvider(
            client,
            api_key=_secret(provider),
            from_email=str(provider.from_address),
            from_name=provider.from_name,
            base_url=provider.base_url or DEFAULT_BASE_URLS[provider.kind],
            name=label,
            clock=clock,
        )
    if provider.kind == "postmark":
        sender = str(provider.from_address)
        if provider.from_name:
            sender = f'"{provider.from_name}" <{sender}>'
        return PostmarkProvider(
            client,
            server_token=_secret(provider),
            from_address=sender,
            message_stream=provider.message_stream,
            base_url=provider.base_url or DEFAULT_BASE_URLS[provider.kind],
            name=label,
            clock=clock,
        )
    if provider.kind == "twilio":
        callback = public_base_url.rstrip("/") + TWILIO_CALLBACK_PATH
        return TwilioProvider(
            client,
            account_sid=str(provider.account_sid),
            auth_token=_secret(provider),
            from_number=provider.from_address,
            messaging_service_sid=provider.messaging_service_sid,
            status_callback=callback if provider.status_callbacks else None,
            base_url=provider.base_url or DEFAULT_BASE_URLS[provider.kind],
            name=label,
            clock=clock,
        )
    if provider.kind == "hubspot":
        hubspot = HubSpotTaskProvider(
            client,
            access_token=_secret(provider),
            idempotency_property=provider.idempotency_property,
            base_url=provider.base_url or DEFAULT_BASE_URLS[provider.kind],
            name=label,
            clock=clock,
            create_missing_contacts=crm.create_missing_contacts if crm else False,
            contacts=crm.contacts if crm else None,
            history=crm.history if crm else None,
        )
        return DuplicateIsSuccess(hubspot) if provider.idempotency_property else hubspot
    if provider.kind == "webhook":
        return WebhookProvider(
            client,
            url=provider.base_url,
            secret=_secret(provider).encode(),
            name=label,
            clock=clock,
        )
    raise ValueError(f"no HTTP adapter for provider kind {provider.kind!r}")


def is_idempotent(provider: ProviderSettings) -> bool:
    """Does the provider deduplicate on our idempotency key? (See ``providers/__init__``.)"""
    if provider.kind in ("file", "webhook"):
        return True
    return provider.kind == "hubspot" and provider.idempotency_property is not None


def build_provider(
    provider: ProviderSettings,
    channel: Channel,
    clients: Sequence[httpx.AsyncClient],
    clock: Clock,
    public_base_url: str,
    *,
    create_missing_contacts: bool = False,
    history: SentSteps | None = None,
) -> Provider:
    if provider.kind == "file":
        return FileProvider(
            provider.directory,
            channel,
            from_address=provider.from_address,
            from_name=provider.from_name,
            name=provider.label,
            clock=clock,
        )
    # one contact cache for the provider, whichever pooled client sends
    crm = CrmLookup(create_missing_contacts, ContactCache(), history)
    return RoundRobin(
        [_adapter(provider, channel, c, clock, public_base_url, crm) for c in clients]
    )


@dataclass(frozen=True, slots=True)
class CrmLookup:
    """What a CRM adapter needs to find the customer's contact and the case's history."""

    create_missing_contacts: bool
    contacts: ContactCache
    history: SentSteps | None


def build_channels(
    settings: DispatcherSettings,
    clients: Sequence[httpx.AsyncClient],
    clock: Clock,
    extra: Mapping[str, Sequence[Provider]] | None = None,
    *,
    crm_history: SentSteps | None = None,
) -> dict[str, ChannelSender]:
    """Every channel's provider chain, ready to send.

    The built-in channels take their providers from the settings; ``extra`` gives the
    provider adapters of channels added to the channel registry (``shared.channels``) beyond
    them, each wrapped in the same circuit breaker, retries and metrics."""
    retry = settings.retry
    circuit = settings.circuit
    breaker_config = CircuitBreakerConfig(
        consecutive_failures=circuit.consecutive_failures,
        failure_ratio=circuit.failure_ratio,
        window=circuit.window,
        min_calls=circuit.min_calls,
        cooldown=timedelta(seconds=circuit.cooldown_seconds),
    )

    def route(
        name: str, label: str, adapter: Provider, idempotent: bool, rate: float | None
    ) -> Route:
        labels = (name, label)
        metrics.CIRCUIT_STATE.labels(*labels).set(0)
        breaker = CircuitBreaker(
            f"{name}/{label}",
            clock,
            breaker_config,
            on_state_change=_gauge(labels),
        )
        guarded = GuardedProvider(
            provider=Instrumented(adapter),
            breaker=breaker,
            limiter=provider_limiter(rate),
        )
        policy = RetryPolicy(
            max_attempts=retry.max_attempts,
            base_delay=retry.base_delay,
            max_delay=retry.max_delay,
            max_retry_after=retry.max_retry_after,
            retry_ambiguous=idempotent,
        )
        sender = FailoverSender([guarded], policy, on_attempt_failed=_count_skips(labels))
        return Route(guarded, sender, idempotent)

    channels: dict[str, ChannelSender] = {}
    for name in CHANNEL_KINDS:
        channel = Channel(name)
        routes = []
        for provider in settings.channel(name).providers:
            adapter = build_provider(
                provider,
                channel,
                clients,
                clock,
                settings.public_base_url,
                create_missing_contacts=settings.crm.create_missing_contacts,
                history=crm_history,
            )
            routes.append(
                route(
                    name, provider.label, adapter, is_idempotent(provider), provider.rate_per_second
                )
            )
        channels[name] = ChannelSender(name, routes)
    for name, adapters in (extra or {}).items():
        if name in channels:
            raise ValueError(f"channel {name!r} takes its providers from the settings")
        Channel(name)  # registered, or UnknownChannelError
        channels[name] = ChannelSender(
            name, [route(name, a.name, a, False, None) for a in adapters]
        )
    return channels


def _gauge(labels: tuple[str, str]) -> StateListener:
    def listener(_: str, old: CircuitState, new: CircuitState) -> None:
        metrics.CIRCUIT_STATE.labels(*labels).set(metrics.STATE_VALUE[new])

    return listener


def _count_skips(labels: tuple[str, str]) -> AttemptListener:
    def listener(attempt: FailedAttempt) -> None:
        if isinstance(attempt.error, CircuitOpenError):
            metrics.PROVIDER_ERRORS.labels(*labels, "circuit_open").inc()

    return listener


def breakers(channels: Mapping[str, ChannelSender]) -> dict[tuple[str, str], CircuitBreaker]:
    return {(c.channel, r.name): r.breaker for c in channels.values() for r in c.routes}
