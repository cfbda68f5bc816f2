"""Every adapter against the fake provider server over real loopback HTTP."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from services.dispatcher.errors import (
    DeliveryFailedError,
    PermanentSendError,
    ProviderConfigurationError,
    TransientSendError,
)
from services.dispatcher.providers import (
    CrmTaskDetails,
    HubSpotTaskProvider,
    OutboundMessage,
    PostmarkProvider,
    Provider,
    SendGridProvider,
    TwilioProvider,
    WebhookProvider,
)
from services.dispatcher.rendering import Channel, RenderedMessage
from services.dispatcher.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    FailoverSender,
    GuardedProvider,
    RetryPolicy,
)
from services.dispatcher.signatures import verify_winback_webhook
from services.dispatcher.transport import client as pooled_client
from shared.clock import FrozenClock
from tests.fakes.provider_server import (
    FakeProviderServer,
    Fault,
    ProviderName,
    hubspot_rate_limit,
    postmark_error,
    twilio_error,
)


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read afresh (keeps type checkers from over-narrowing)."""
    return breaker.state


NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
WEBHOOK_SECRET = b"w" * 32
ACCOUNT_SID = "AC" + "1" * 32
TAGS = {"customer_id": "cus_1", "case_id": "case_9", "step_id": "step_3", "template": "x"}

EMAIL = RenderedMessage(
    "special_offer", Channel.EMAIL, "en", "A special offer", "Hi Aino", "<p>Hi Aino</p>"
)
SMS = RenderedMessage("special_offer", Channel.SMS, "en", None, "Hi Aino, an offer", None)
TASK = RenderedMessage(
    "crm_personal_outreach", Channel.CRM, "en", "Call Aino", "Call her\nMRR 249", None
)


def message_for(provider: ProviderName, key: str = "case_9:step_3") -> OutboundMessage:
    if provider in ("sendgrid", "postmark"):
        return OutboundMessage(
            key,
            Channel.EMAIL,
            "aino@example.com",
            EMAIL,
            tags=TAGS,
            unsubscribe_url="https://winback.example.com/u/1.abc.def",
        )
    if provider == "twilio":
        return OutboundMessage(key, Channel.SMS, "+358401234567", SMS, tags=TAGS)
    if provider == "hubspot":
        task = CrmTaskDetails(owner_id="77", due_at=NOW + timedelta(days=1))
        return OutboundMessage(key, Channel.CRM, "901", TASK, tags=TAGS, crm_task=task)
    return OutboundMessage(key, Channel.WEBHOOK, "cus_1", EMAIL, tags=TAGS)


@pytest.fixture
async def server() -> AsyncIterator[FakeProviderServer]:
    async with FakeProviderServer(webhook_secret=WEBHOOK_SECRET) as fake:
        yield fake


@pytest.fixture(params=["httpx", "pooled"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """Every adapter test runs over httpx's own transport and over the ``PooledClient``'s lean
    path (``post_bytes``), which the dispatcher uses by default."""
    timeout = httpx.Timeout(0.4)
    http = (
        httpx.AsyncClient(timeout=timeout)
        if request.param == "httpx"
        else pooled_client(max_connections=16, timeout=timeout)
    )
    async with http:
        yield http


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


Factory = Callable[[ProviderName], Provider]


@pytest.fixture
def adapter(server: FakeProviderServer, client: httpx.AsyncClient, clock: FrozenClock) -> Factory:
    def build(provider: ProviderName) -> Provider:
        base = server.base_url
        if provider == "sendgrid":
            return SendGridProvider(
                client,
                api_key="SG.key",
                from_email="hello@acme.example",
                base_url=base,
                clock=clock,
            )
        if provider == "postmark":
            return PostmarkProvider(
                client,
                server_token="pm-token",
                from_address="hello@acme.example",
                base_url=base,
                clock=clock,
            )
        if provider == "twilio":
            return TwilioProvider(
                client,
                account_sid=ACCOUNT_SID,
                auth_token="tw-token",
                from_number="+15005550006",
                status_callback="https://winback.example.com/v1/webhooks/twilio",
                base_url=base,
                clock=clock,
            )
        if provider == "hubspot":
            return HubSpotTaskProvider(
                client,
                access_token="hs-token",
                base_url=base,
                idempotency_property="winback_idempotency_key",
                clock=clock,
            )
        return WebhookProvider(client, url=server.webhook_url, secret=WEBHOOK_SECRET, clock=clock)

    return build


ALL: list[ProviderName] = ["sendgrid", "postmark", "twilio", "hubspot", "webhook"]


# --- success: the request each API expects, and the id it answers with ------------------


async def test_sendgrid_send(server: FakeProviderServer, adapter: Factory) -> None:
    result = await adapter("sendgrid").send(message_for("sendgrid"))

    (request,) = server.requests_for("sendgrid")
    assert result.provider == "sendgrid"
    assert result.provider_message_id
    assert request.status == 202
    assert request.headers["authorization"] == "Bearer SG.key"
    body = request.json
    assert body["personalizations"] == [{"to": [{"email": "aino@example.com"}]}]
    assert body["from"] == {"email": "hello@acme.example"}
    assert body["subject"] == "A special offer"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["custom_args"] == TAGS | {"idempotency_key": "case_9:step_3"}
    assert "@" not in str(body["custom_args"]) + str(body["categories"])
    assert body["headers"] == {
        "List-Unsubscribe": "<https://winback.example.com/u/1.abc.def>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert request.idempotency_key == "case_9:step_3"


async def test_postmark_send(server: FakeProviderServer, adapter: Factory) -> None:
    result = await adapter("postmark").send(message_for("postmark"))

    (request,) = server.requests_for("postmark")
    assert result.provider_message_id is not None
    assert len(result.provider_message_id) == 36  # Postmark's MessageID is a UUID
    assert request.headers["x-postmark-server-token"] == "pm-token"
    body = request.json
    assert (body["To"], body["From"], body["Subject"]) == (
        "aino@example.com",
        "hello@acme.example",
        "A special offer",
    )
    assert (body["TextBody"], body["HtmlBody"]) == ("Hi Aino", "<p>Hi Aino</p>")
    assert body["MessageStream"] == "broadcast"
    assert body["Metadata"]["idempotency_key"] == "case_9:step_3"
    assert {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"} in body[
        "Headers"
    ]


async def test_twilio_send(server: FakeProviderServer, adapter: Factory) -> None:
    result = await adapter("twilio").send(message_for("twilio"))

    (request,) = server.requests_for("twilio")
    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("SM")
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:tw-token".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected_auth}"
    assert request.form == {
        "To": "+358401234567",
        "From": "+15005550006",
        "Body": "Hi Aino, an offer",
        "StatusCallback": "https://winback.example.com/v1/webhooks/twilio",
    }
    assert request.idempotency_key == "case_9:step_3"


async def test_hubspot_task(server: FakeProviderServer, adapter: Factory) -> None:
    result = await adapter("hubspot").send(message_for("hubspot"))

    (request,) = server.requests_for("hubspot")
    assert result.provider_message_id == "1"
    assert request.headers["authorization"] == "Bearer hs-token"
    properties = request.json["properties"]
    assert properties["hs_timestamp"] == "2026-05-05T12:00:00.000Z"
    assert properties["hs_task_subject"] == "Call Aino"
    assert properties["hs_task_body"] == "Call her<br>MRR 249"
    assert properties["hubspot_owner_id"] == "77"
    assert (properties["hs_task_priority"], properties["hs_task_type"]) == ("HIGH", "CALL")
    assert request.json["associations"][0]["to"] == {"id": "901"}
    assert request.json["associations"][0]["types"][0]["associationTypeId"] == 204


async def test_hubspot_unique_property_turns_a_duplicate_into_a_conflict(
    server: FakeProviderServer, adapter: Factory
) -> None:
    hubspot = adapter("hubspot")
    await hubspot.send(message_for("hubspot"))

    with pytest.raises(PermanentSendError) as caught:
        await hubspot.send(message_for("hubspot"))

    assert caught.value.error_code == "duplicate"
    assert len(server.accepted("hubspot")) == 1


async def test_webhook_is_signed_and_deduplicated_by_the_receiver(
    server: FakeProviderServer, adapter: Factory
) -> None:
    webhook = adapter("webhook")
    first = await webhook.send(message_for("webhook"))
    again = await webhook.send(message_for("webhook"))

    assert first == again
    requests = server.requests_for("webhook")
    assert [r.status for r in requests] == [200, 200]
    assert len(server.accepted("webhook")) == 1
    assert requests[1].replayed
    signed = requests[0]
    verify_winback_webhook(WEBHOOK_SECRET, signed.body, signed.headers["x-winback-signature"], NOW)
    assert signed.headers["idempotency-key"] == "case_9:step_3"
    assert signed.json["id"] == "case_9:step_3"


async def test_webhook_with_the_wrong_secret_is_refused(
    server: FakeProviderServer, client: httpx.AsyncClient, clock: FrozenClock
) -> None:
    forger = WebhookProvider(client, url=server.webhook_url, secret=b"x" * 32, clock=clock)

    with pytest.raises(ProviderConfigurationError):
        await forger.send(message_for("webhook"))


# --- transient failures: 5xx, 429, timeouts, dropped connections -------------------------


@pytest.mark.parametrize("provider", ALL)
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_transient(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName, status: int
) -> None:
    server.fail_next(provider, Fault.http(status, {"error": "boom"}))

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert caught.value.status_code == status
    assert caught.value.provider == provider
    assert server.accepted() == []


@pytest.mark.parametrize("provider", ALL)
async def test_429_carries_retry_after_seconds(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName
) -> None:
    server.fail_next(provider, Fault.rate_limited(retry_after="7"))

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert caught.value.status_code == 429
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("provider", ALL)
async def test_429_carries_retry_after_http_date(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName
) -> None:
    when = format_datetime(NOW + timedelta(seconds=45), usegmt=True)
    server.fail_next(provider, Fault.rate_limited(retry_after=when))

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert caught.value.retry_after == 45.0


@pytest.mark.parametrize("provider", ALL)
async def test_a_hung_provider_times_out_as_an_ambiguous_transient_error(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName
) -> None:
    server.fail_next(provider, Fault.hang(5.0))

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert "no answer in time" in caught.value.reason
    assert caught.value.ambiguous


@pytest.mark.parametrize("provider", ALL)
async def test_a_dropped_connection_is_an_ambiguous_transient_error(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName
) -> None:
    server.fail_next(provider, Fault.drop())

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert caught.value.ambiguous
    assert server.requests_for(provider)[0].fault == "drop"


async def test_latency_below_the_timeout_is_fine(
    server: FakeProviderServer, adapter: Factory
) -> None:
    server.set_latency("postmark", 0.05)
    result = await adapter("postmark").send(message_for("postmark"))
    assert result.provider == "postmark"


async def test_nobody_listening_is_a_transient_connect_error(
    client: httpx.AsyncClient, clock: FrozenClock
) -> None:
    async with FakeProviderServer() as gone:
        base = gone.base_url
    sendgrid = SendGridProvider(
        client, api_key="k", from_email="hello@acme.example", base_url=base, clock=clock
    )

    with pytest.raises(TransientSendError) as caught:
        await sendgrid.send(message_for("sendgrid"))

    assert not caught.value.ambiguous  # nothing was sent


async def test_sendgrid_rate_limit_reset_header_is_used_without_retry_after(
    server: FakeProviderServer, adapter: Factory
) -> None:
    reset = str(int(NOW.timestamp()) + 12)
    server.fail_next(
        "sendgrid", Fault.rate_limited(retry_after=None, headers={"X-RateLimit-Reset": reset})
    )

    with pytest.raises(TransientSendError) as caught:
        await adapter("sendgrid").send(message_for("sendgrid"))

    assert caught.value.retry_after == 12.0


@pytest.mark.parametrize(
    ("fault", "retry_after", "code"),
    [
        (hubspot_rate_limit(interval_ms=10000), 10.0, "TEN_SECONDLY_ROLLING"),
        (hubspot_rate_limit(policy="DAILY"), 3600.0, "DAILY"),
        (hubspot_rate_limit(retry_after="3"), 3.0, "TEN_SECONDLY_ROLLING"),
    ],
)
async def test_hubspot_rate_limits_use_its_headers(
    server: FakeProviderServer, adapter: Factory, fault: Fault, retry_after: float, code: str
) -> None:
    server.fail_next("hubspot", fault)

    with pytest.raises(TransientSendError) as caught:
        await adapter("hubspot").send(message_for("hubspot"))

    assert caught.value.retry_after == retry_after
    assert caught.value.error_code == code


@pytest.mark.parametrize("provider", ["twilio"])
async def test_twilio_20429_is_transient(
    server: FakeProviderServer, adapter: Factory, provider: ProviderName
) -> None:
    server.fail_next(provider, twilio_error(20429, status=429, message="Too Many Requests"))

    with pytest.raises(TransientSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert caught.value.error_code == "20429"


# --- permanent failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "fault", "error_type", "suppress", "code"),
    [
        (
            "twilio",
            twilio_error(21610, message="Attempt to send to unsubscribed recipient"),
            PermanentSendError,
            True,
            "21610",
        ),
        (
            "twilio",
            twilio_error(21211, message="Invalid 'To' Phone Number"),
            PermanentSendError,
            True,
            "21211",
        ),
        (
            "twilio",
            twilio_error(21408, message="Permission to send to region"),
            PermanentSendError,
            False,
            "21408",
        ),
        ("twilio", twilio_error(20003, status=401), ProviderConfigurationError, False, "20003"),
        (
            "postmark",
            postmark_error(406, message="Inactive recipient"),
            PermanentSendError,
            True,
            "406",
        ),
        (
            "postmark",
            postmark_error(300, message="Invalid 'To' address"),
            PermanentSendError,
            False,
            "300",
        ),
        ("postmark", postmark_error(10, status=401), ProviderConfigurationError, False, "10"),
        (
            "postmark",
            postmark_error(412, message="Account is pending"),
            ProviderConfigurationError,
            False,
            "412",
        ),
        (
            "sendgrid",
            Fault.http(400, {"errors": [{"message": "Invalid from email"}]}),
            PermanentSendError,
            False,
            None,
        ),
        (
            "sendgrid",
            Fault.http(403, {"errors": [{"message": "forbidden"}]}),
            ProviderConfigurationError,
            False,
            None,
        ),
        (
            "hubspot",
            Fault.http(400, {"status": "error", "category": "VALIDATION_ERROR", "message": "bad"}),
            PermanentSendError,
            False,
            "VALIDATION_ERROR",
        ),
        ("webhook", Fault.http(410), PermanentSendError, True, None),
        ("webhook", Fault.http(422), PermanentSendError, False, None),
    ],
)
async def test_permanent_errors_are_mapped_with_suppression(
    server: FakeProviderServer,
    adapter: Factory,
    provider: ProviderName,
    fault: Fault,
    error_type: type[PermanentSendError],
    suppress: bool,
    code: str | None,
) -> None:
    server.fail_next(provider, fault)

    with pytest.raises(PermanentSendError) as caught:
        await adapter(provider).send(message_for(provider))

    assert type(caught.value) is error_type
    assert caught.value.suppress is suppress
    assert caught.value.error_code == code


async def test_wrong_credentials_are_a_configuration_error(
    client: httpx.AsyncClient, clock: FrozenClock
) -> None:
    async with FakeProviderServer(credentials={"sendgrid": "the-real-key"}) as pinned:
        sendgrid = SendGridProvider(
            client, api_key="a-stale-key", from_email="h@acme.example", base_url=pinned.base_url
        )
        with pytest.raises(ProviderConfigurationError) as caught:
            await sendgrid.send(message_for("sendgrid"))
    assert caught.value.status_code == 401
    assert caught.value.provider_fault


# --- retries, failover and the circuit over real HTTP ------------------------------------


async def _no_sleep(_: float) -> None:
    return None


def email_sender(
    adapter: Factory, clock: FrozenClock, config: CircuitBreakerConfig, attempts: int = 2
) -> FailoverSender:
    return FailoverSender(
        [
            GuardedProvider(adapter("sendgrid"), CircuitBreaker("sendgrid", clock, config)),
            GuardedProvider(adapter("postmark"), CircuitBreaker("postmark", clock, config)),
        ],
        RetryPolicy(max_attempts=attempts, base_delay=0.0),
        sleep=_no_sleep,
        rng=lambda: 0.0,
    )


async def test_a_transient_failure_is_retried_and_the_message_sent_exactly_once(
    server: FakeProviderServer, adapter: Factory, clock: FrozenClock
) -> None:
    server.fail_next("sendgrid", Fault.http(503))
    failover = email_sender(adapter, clock, CircuitBreakerConfig())

    result = await failover.send(message_for("sendgrid"))

    assert result.provider == "sendgrid"
    attempts = server.requests_for("sendgrid")
    assert [r.status for r in attempts] == [503, 202]
    assert {r.idempotency_key for r in attempts} == {"case_9:step_3"}
    assert len(server.accepted()) == 1


async def test_primary_down_secondary_used(
    server: FakeProviderServer, adapter: Factory, clock: FrozenClock
) -> None:
    server.fail_always("sendgrid", Fault.http(503))
    failover = email_sender(adapter, clock, CircuitBreakerConfig())

    result = await failover.send(message_for("sendgrid"))

    assert result.provider == "postmark"
    assert len(server.requests_for("sendgrid")) == 2
    assert [r.provider for r in server.accepted()] == ["postmark"]


async def test_both_down_gives_one_final_error_with_every_reason(
    server: FakeProviderServer, adapter: Factory, clock: FrozenClock
) -> None:
    server.fail_always("sendgrid", Fault.rate_limited(retry_after="2"))
    server.fail_always("postmark", Fault.drop())
    failover = email_sender(adapter, clock, CircuitBreakerConfig())

    with pytest.raises(DeliveryFailedError) as caught:
        await failover.send(message_for("sendgrid"))

    error = caught.value
    assert [a.provider for a in error.attempts] == ["sendgrid", "sendgrid", "postmark", "postmark"]
    assert "HTTP 429" in error.reason
    assert "connection failed before an answer" in error.reason
    assert not error.permanent
    assert server.accepted() == []


async def test_a_suppressing_refusal_does_not_fail_over(
    server: FakeProviderServer, adapter: Factory, clock: FrozenClock
) -> None:
    server.fail_next("sendgrid", Fault.http(400, {"errors": [{"message": "invalid to"}]}))
    failover = email_sender(adapter, clock, CircuitBreakerConfig())

    with pytest.raises(DeliveryFailedError) as caught:
        await failover.send(message_for("sendgrid"))

    assert caught.value.permanent
    assert server.requests_for("postmark") == []


async def test_the_circuit_opens_and_closes_again(
    server: FakeProviderServer, adapter: Factory, clock: FrozenClock
) -> None:
    config = CircuitBreakerConfig(consecutive_failures=2, cooldown=timedelta(seconds=30))
    failover = email_sender(adapter, clock, config)
    breaker = failover.providers[0].breaker
    server.fail_always("sendgrid", Fault.http(503))

    assert (await failover.send(message_for("sendgrid", "k1"))).provider == "postmark"
    assert state_of(breaker) is CircuitState.OPEN
    assert len(server.requests_for("sendgrid")) == 2

    assert (await failover.send(message_for("sendgrid", "k2"))).provider == "postmark"
    assert len(server.requests_for("sendgrid")) == 2  # open: not even tried

    server.heal("sendgrid")
    clock.advance(timedelta(seconds=30))
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert (await failover.send(message_for("sendgrid", "k3"))).provider == "sendgrid"
    assert state_of(breaker) is CircuitState.CLOSED
    assert [r.idempotency_key for r in server.accepted()] == ["k1", "k2", "k3"]
