"""Settings: environment variables under the ``WINBACK_`` prefix (nested groups with ``__``),
on top of (in this order) a ``.env`` file, a secrets directory and a YAML file named by
``WINBACK_CONFIG_FILE`` (pydantic-settings' own sources). Typed and validated at start-up: every
bad value is reported with where it came from, the field and why; every group refuses a field
it does not have, and a ``WINBACK_`` variable that names no setting is refused too."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from shared.channels import BUILTIN as BUILTIN_CHANNELS
from shared.errors import ConfigError

ENV_PREFIX = "WINBACK_"
NESTED = "__"
DEV_SECRET = "dev-only-not-a-secret"


class DatabaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        default="",
        description="postgresql+asyncpg:// URL; empty = embedded PostgreSQL (pgserver)",
    )
    pool_size: int = Field(default=10, ge=1, le=200)
    data_dir: Path = Field(
        default=Path(".winback/pgdata"), description="embedded PostgreSQL data directory"
    )


class KafkaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field(
        default="", description="host:port list; empty = a local broker started for you"
    )
    client_id: str = "winback"
    max_batch: int = Field(default=500, ge=1, le=10_000)
    poll_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    batch_linger_ms: int = Field(default=20, ge=0, le=5_000)
    session_timeout_ms: int = Field(default=30_000, ge=6_000)
    max_record_bytes: int = Field(
        default=1024 * 1024,
        ge=128 * 1024,
        le=64 * 1024 * 1024,
        description="largest record we publish, counted as Kafka does (key, value, headers and "
        "record/batch overhead): the producer's max_request_size, and the check every outbox "
        "row gets when written (a dead-letter copy over it is cut down, any other row parked); "
        "keep it at or below the broker's message.max.bytes (1048588 by default) and the "
        "topics' max.message.bytes",
    )
    data_dir: Path = Field(default=Path(".winback/kafka"), description="local broker data")


class TopicSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inbound: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["billing.lifecycle", "product.activity"]
    )
    domain: str = "winback.customer-events"
    dispatch: str = "winback.dispatch-commands"
    outcomes: str = "winback.outcomes"
    dead_letter: str = "winback.dead-letter"
    erasure: str = "winback.erasure"
    partitions: int = Field(default=6, ge=1, le=1000)
    replication: int = Field(default=1, ge=1, le=10)

    @field_validator("inbound", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class IngestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type_prefix: str = Field(
        default="com.example", description="reverse-DNS prefix of inbound CloudEvent types"
    )
    max_event_bytes: int = Field(default=256 * 1024, ge=1024)
    max_future_skew_seconds: int = Field(default=300, ge=0)
    http_batch_limit: int = Field(default=1000, ge=1)


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    playbooks_dir: Path = Field(
        default=Path(__file__).resolve().parent.parent / "services" / "scheduler" / "playbooks",
        description="directory of playbook YAML files, validated at start-up",
    )
    claim_batch: int = Field(default=500, ge=1, le=10_000)
    poll_seconds: float = Field(default=0.5, gt=0, le=60)
    cap_per_week: int = Field(default=3, ge=1, description="messages per customer per 7 days")
    cap_per_month: int = Field(default=6, ge=1, description="messages per customer per 30 days")
    send_window_start_hour: int = Field(default=9, ge=0, le=23)
    send_window_end_hour: int = Field(default=20, ge=1, le=24)
    fallback_timezone: str = "UTC"
    discount_period_days: int = Field(default=365, ge=1)
    offer_valid_days: int = Field(default=14, ge=1)
    consent_by_default: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["email", "crm"],
        description="channels that need no recorded consent (email: EU soft opt-in for past "
        "customers, with an unsubscribe link in every message; crm: goes to the account owner)",
    )
    inactivity_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="days without product activity (customer.activity) after which a customer "
        "who is not churned and has no open case gets a passive-user case",
    )
    inactivity_days_by_plan: dict[str, Annotated[int, Field(ge=1, le=3650)]] = Field(
        default_factory=dict,
        description='per plan overrides of inactivity_days, JSON: {"enterprise": 14}',
    )
    usage_drop_percent: float = Field(
        default=50,
        ge=0,
        le=100,
        description="a user.inactive whose usage_drop_percent (or days_inactive against "
        "inactivity_days) reaches this opens a passive-user case; one with neither opens one",
    )
    fiscal_year_start_month: int = Field(
        default=1,
        ge=1,
        le=12,
        description="the month (1-12) a customer's fiscal year starts when their profile "
        "(customer.updated: fiscal_year_start_month) names none: the budget_cycle calendar rule",
    )

    @field_validator("consent_by_default", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> SchedulerSettings:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.fallback_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"fallback_timezone: unknown IANA timezone {self.fallback_timezone!r}"
            ) from None
        if self.send_window_end_hour <= self.send_window_start_hour:
            raise ValueError(
                f"send_window_end_hour: must be after send_window_start_hour "
                f"({self.send_window_end_hour} <= {self.send_window_start_hour})"
            )
        return self


ApiScope = Literal["ingest", "read", "operate", "erase"]
API_SCOPES: tuple[ApiScope, ...] = ("ingest", "read", "operate", "erase")


class ApiKey(BaseModel):
    """One bearer key and what it may do. A bare string is a key with every scope (the
    single-key settings of before scopes keep working)."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=1)
    scopes: list[ApiScope] = Field(default_factory=lambda: list(API_SCOPES), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, value: Any) -> Any:
        return {"key": value} if isinstance(value, str | SecretStr) else value


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    ingest_port: int = Field(default=8081, ge=0, le=65535)
    scheduler_port: int = Field(default=8082, ge=0, le=65535)
    dispatcher_port: int = Field(default=8083, ge=0, le=65535)
    relay_port: int = Field(default=8084, ge=0, le=65535)
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=lambda: [ApiKey(key=SecretStr(DEV_SECRET))],
        description="bearer keys: a comma-separated list (each key has every scope), or a JSON "
        'list of {"key": ..., "scopes": [...]} (scopes: ingest, read, operate, erase)',
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class OutboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    relay_enabled: bool = Field(
        default=True, description="run the outbox relay in this process (or `winback relay`)"
    )
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    idle_poll_seconds: float = Field(default=0.05, gt=0, le=60)
    keep_published_hours: float = Field(
        default=24, ge=0, description="published outbox rows are deleted after this long"
    )


class RetentionSettings(BaseModel):
    """Housekeeping of the shared loop's tables, run by every service (``retention`` job).

    ``keep_inbox_days``: how long an inbox row — the proof that a consumer already handled an
    event ``(source, id)`` — is kept. A redelivery of an event whose row is gone is handled a
    second time, so this must be comfortably longer than any record can be redelivered:
    Kafka re-reads at most what a topic still retains (a consumer group whose positions are
    lost starts at the earliest record, ``auto_offset_reset=earliest``). We create our topics
    without ``retention.ms``, so they take the broker's default: 7 days on a stock broker
    (``docker-compose.yml``), 24 hours on the local broker ``winback run --local-kafka``
    starts. Kafka deletes whole segments only, so a record may outlive the retention by up to a
    segment's age (``segment.ms``, 7 days on a stock broker): the default of 14 days covers a
    stock broker's 7 + 7 days. Raise it above ``retention.ms`` + ``segment.ms`` if your topics
    keep records longer. The in-process bus keeps every record and the groups' positions (in
    its file); it redelivers what lies past a group's committed position, which is recent.

    Published outbox rows are kept by ``outbox.keep_published_hours`` and pruned by the same
    job. Each run deletes at most ``batch_size`` rows per transaction, and at most
    ``max_batches_per_run`` batches per table; the rest waits ``interval_seconds`` for the
    next run.
    """

    model_config = ConfigDict(extra="forbid")

    keep_inbox_days: float = Field(
        default=14, ge=1, description="inbox (dedupe) rows are deleted after this long"
    )
    batch_size: int = Field(default=5000, ge=1, le=100_000, description="rows per transaction")
    max_batches_per_run: int = Field(default=100, ge=1, le=100_000)
    interval_seconds: float = Field(default=300, gt=0, le=86_400)


# --- dispatcher ------------------------------------------------------------------------------
DEV_UNSUBSCRIBE_KEY = "dev-only-unsubscribe-key-not-a-secret"
DEV_POSTAL_ADDRESS = "Example Street 1, 00100 Helsinki, Finland"
ProviderKind = Literal["file", "sendgrid", "postmark", "twilio", "hubspot", "webhook"]
CHANNEL_KINDS: dict[str, tuple[str, ...]] = {s.name: s.provider_kinds for s in BUILTIN_CHANNELS}
"""The dispatcher's channels and the provider kinds that can serve each (the channel registry's
built-in channels: these are the ones ``DispatcherSettings`` has a section for)."""


class ProviderSettings(BaseModel):
    """One provider of a channel. ``kind`` picks the adapter; ``file`` (the embedded default)
    writes each message into ``directory`` instead of calling an API."""

    model_config = {"extra": "forbid"}

    kind: ProviderKind = "file"
    name: str = Field(default="", description="name in metrics and outcomes; empty = the kind")
    base_url: str = Field(default="", description="API base URL (webhook: the receiver URL)")
    api_key: SecretStr | None = Field(
        default=None,
        description="SendGrid API key, Postmark server token, HubSpot private-app token, "
        "Twilio auth token or the webhook signing secret",
    )
    account_sid: str | None = Field(default=None, description="Twilio account SID")
    from_address: str | None = Field(default=None, description="email From / SMS From number")
    from_name: str | None = None
    messaging_service_sid: str | None = Field(default=None, description="Twilio, instead of From")
    message_stream: str = Field(default="broadcast", description="Postmark message stream")
    status_callbacks: bool = Field(default=True, description="Twilio: ask for status callbacks")
    idempotency_property: str | None = Field(
        default=None, description="HubSpot: a unique-valued task property that gets our key"
    )
    directory: Path = Field(default=Path(".winback/messages"), description="file provider folder")
    rate_per_second: float | None = Field(default=None, gt=0, description="rate limit")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @model_validator(mode="after")
    def _credentials(self) -> ProviderSettings:
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        needs_key = {
            "sendgrid": "API_KEY (the SendGrid API key)",
            "postmark": "API_KEY (the Postmark server token)",
            "hubspot": "API_KEY (the HubSpot private-app token)",
            "twilio": "API_KEY (the Twilio auth token)",
            "webhook": "API_KEY (the signing secret, 16+ characters)",
        }
        if self.kind in needs_key and not key:
            raise ValueError(f"a {self.kind} provider needs {needs_key[self.kind]}")
        if self.kind == "webhook":
            if len(key.encode()) < 16:
                raise ValueError("the webhook signing secret (API_KEY) needs 16+ characters")
            if not self.base_url:
                raise ValueError("a webhook provider needs BASE_URL, the receiver's URL")
        if self.kind in ("sendgrid", "postmark") and not self.from_address:
            raise ValueError(f"a {self.kind} provider needs FROM_ADDRESS (the sender email)")
        if self.kind == "twilio":
            if not self.account_sid:
                raise ValueError("a twilio provider needs ACCOUNT_SID")
            if (self.from_address is None) == (self.messaging_service_sid is None):
                raise ValueError(
                    "a twilio provider needs exactly one of FROM_ADDRESS (a number) and "
                    "MESSAGING_SERVICE_SID"
                )
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"BASE_URL {self.base_url!r} is not an http(s) URL")
        return self


class ChannelSettings(BaseModel):
    """A channel's providers in order: the primary, then an optional secondary (failover)."""

    model_config = {"extra": "forbid"}

    primary: ProviderSettings = Field(default_factory=ProviderSettings)
    secondary: ProviderSettings | None = None

    @property
    def providers(self) -> list[ProviderSettings]:
        return [self.primary] + ([self.secondary] if self.secondary is not None else [])

    @model_validator(mode="after")
    def _distinct(self) -> ChannelSettings:
        if self.secondary is not None and self.secondary.label == self.primary.label:
            raise ValueError(
                f"primary and secondary are both named {self.primary.label!r}: set NAME on one"
            )
        return self


class CrmChannelSettings(ChannelSettings):
    """The CRM channel's providers, and how a task finds the customer's contact."""

    create_missing_contacts: bool = Field(
        default=False,
        description="a customer with no CRM contact (none with their email) gets one created; "
        "off: the task fails with no_crm_contact",
    )


class DispatcherHttpSettings(BaseModel):
    """Outgoing HTTP to providers: several pooled clients share the in-flight sends."""

    model_config = {"extra": "forbid"}

    transport: Literal["pooled", "httpx"] = Field(
        default="pooled",
        description="pooled: our h11 keep-alive transport; httpx: httpx's own (httpcore)",
    )
    clients: int = Field(default=4, ge=1, le=256, description="httpx clients, used round robin")
    max_connections: int = Field(default=128, ge=1, le=10_000, description="per client")
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=15.0, gt=0, le=300)


class DispatcherRetrySettings(BaseModel):
    """Transient failures: retried per provider within a round (exponential backoff with full
    jitter, honouring Retry-After), then up to ``rounds`` rounds through the provider chain,
    ``round_delay_seconds`` (doubling) apart."""

    model_config = {"extra": "forbid"}

    max_attempts: int = Field(default=3, ge=1, le=20, description="per provider and round")
    base_delay: float = Field(default=0.5, ge=0, le=60)
    max_delay: float = Field(default=30.0, ge=0, le=600)
    max_retry_after: float = Field(default=60.0, ge=0, le=3600)
    rounds: int = Field(default=3, ge=1, le=50)
    round_delay_seconds: float = Field(default=300.0, ge=0, le=86_400)


class DispatcherCircuitSettings(BaseModel):
    """Per provider: open after ``consecutive_failures`` in a row or ``failure_ratio`` of the
    last ``window`` calls (at least ``min_calls``); probe again after ``cooldown_seconds``."""

    model_config = {"extra": "forbid"}

    consecutive_failures: int = Field(default=5, ge=1)
    failure_ratio: float | None = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=20, ge=1)
    min_calls: int = Field(default=10, ge=1)
    cooldown_seconds: float = Field(default=30.0, gt=0)


class DispatcherWebhookSettings(BaseModel):
    """How provider webhooks prove who they are; an endpoint left unconfigured answers 404."""

    model_config = {"extra": "forbid"}

    sendgrid_public_key: str | None = Field(
        default=None, description="SendGrid signed event webhook verification key (base64/PEM)"
    )
    twilio_auth_token: SecretStr | None = Field(
        default=None, description="Twilio auth token; empty = the Twilio provider's"
    )
    postmark_username: str | None = None
    postmark_password: SecretStr | None = None
    tolerance_seconds: int = Field(default=300, ge=1, le=3600)


class DispatcherSettings(BaseModel):
    model_config = {"extra": "forbid"}

    email: ChannelSettings = Field(default_factory=ChannelSettings)
    sms: ChannelSettings = Field(default_factory=ChannelSettings)
    crm: CrmChannelSettings = Field(default_factory=CrmChannelSettings)
    webhook: ChannelSettings = Field(default_factory=ChannelSettings)
    public_base_url: str = Field(
        default="http://127.0.0.1:8083",
        description="the dispatcher's public URL: unsubscribe links, Twilio signature URL",
    )
    unsubscribe_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=lambda: [SecretStr(DEV_UNSUBSCRIBE_KEY)],
        description="HMAC keys (32+ bytes, comma list): the first signs, all verify",
    )
    unsubscribe_mailto: str | None = Field(
        default=None, description="address for the mailto: part of List-Unsubscribe"
    )
    unsubscribe_max_age_days: int | None = Field(default=None, ge=30)
    company_name: str = "Example Ltd"
    postal_address: str = DEV_POSTAL_ADDRESS
    product_name: str = "Example App"
    cta_url: str = "https://app.example.com/welcome-back"
    highlights: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Faster reports", "A new mobile app", "Single sign-on"],
        description="what is new (comma list), for templates when a step names no feature",
    )
    crm_default_owner: str | None = Field(
        default=None, description="CRM task owner when the customer has none"
    )
    crm_task_due_hours: float = Field(default=24, gt=0)
    status_api_base_url: str | None = Field(
        default=None,
        description="the scheduler's public URL: a CRM task links to "
        "{url}/v1/customers/{id}/winback (none: no link)",
    )
    sms_max_segments: int = Field(
        default=3,
        ge=1,
        le=10,
        description="previews and winback validate warn when an SMS takes more segments",
    )
    test_recipients: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="who POST /v1/test-sends may send to: glob patterns (comma list), e.g. "
        "*@acme.example,+35840*; none set: anyone outside production, no one in production",
    )
    webhooks: DispatcherWebhookSettings = Field(default_factory=DispatcherWebhookSettings)
    http: DispatcherHttpSettings = Field(default_factory=DispatcherHttpSettings)
    retry: DispatcherRetrySettings = Field(default_factory=DispatcherRetrySettings)
    circuit: DispatcherCircuitSettings = Field(default_factory=DispatcherCircuitSettings)
    max_in_flight: int = Field(
        default=512,
        ge=1,
        le=20_000,
        description="concurrent sends (at most http.clients * http.max_connections go out "
        "at once; more wait for a free connection)",
    )
    claim_batch: int = Field(default=500, ge=1, le=10_000)
    poll_seconds: float = Field(default=0.05, gt=0, le=60)
    late_send_grace_seconds: float = Field(
        default=900,
        ge=0,
        le=6 * 3600,
        description="a delivery may still go this long after the customer's send window "
        "closes; later, it is held until the window opens again",
    )
    stale_sending_seconds: float = Field(
        default=1800,
        gt=0,
        description="a delivery left 'sending' this long belongs to a crashed dispatcher",
    )
    unknown_reconcile_seconds: float = Field(
        default=86_400,
        gt=0,
        le=30 * 86_400,
        description="a delivery whose send outcome a crash left unknown may be confirmed this "
        "long (provider webhook, resend with the same key, Postmark search); then it ends "
        "failed (unconfirmed), never re-sent without a key",
    )

    @field_validator("unsubscribe_keys", "highlights", "test_recipients", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def channel(self, name: str) -> ChannelSettings:
        value: ChannelSettings = getattr(self, name)
        return value

    def worst_send_seconds(self) -> float:
        """The longest one claimed delivery may take through its whole provider chain,
        including the wait in a provider's rate limiter behind every other send in flight."""
        chain = max(len(self.channel(c).providers) for c in CHANNEL_KINDS)
        wait = max(self.retry.max_delay, self.retry.max_retry_after + self.retry.base_delay)
        call = self.http.connect_timeout + self.http.read_timeout
        rates = [
            p.rate_per_second
            for c in CHANNEL_KINDS
            for p in self.channel(c).providers
            if p.rate_per_second
        ]
        queue = max((self.max_in_flight / r for r in rates), default=0.0)
        return chain * (self.retry.max_attempts * (call + wait) + queue)

    @model_validator(mode="after")
    def _check(self) -> DispatcherSettings:
        for channel, kinds in CHANNEL_KINDS.items():
            for position, provider in zip(
                ("primary", "secondary"), self.channel(channel).providers, strict=False
            ):
                if provider.kind not in kinds:
                    raise ValueError(
                        f"dispatcher.{channel}.{position}.kind: a {provider.kind} provider "
                        f"cannot serve {channel} (one of {', '.join(kinds)})"
                    )
        if not self.unsubscribe_keys:
            raise ValueError("dispatcher.unsubscribe_keys: at least one key is needed")
        if any(len(k.get_secret_value().encode()) < 32 for k in self.unsubscribe_keys):
            raise ValueError("dispatcher.unsubscribe_keys: each key needs 32+ bytes")
        for name in ("public_base_url", "cta_url"):
            if not getattr(self, name).startswith(("http://", "https://")):
                raise ValueError(f"dispatcher.{name}: must be an http(s) URL")
        if not self.company_name.strip() or not self.postal_address.strip():
            raise ValueError("dispatcher.postal_address: commercial email needs a postal address")
        if self.stale_sending_seconds < self.worst_send_seconds():
            raise ValueError(
                "dispatcher.stale_sending_seconds: must be at least "
                f"{self.worst_send_seconds():.0f} s, the longest a send may take with these "
                "timeouts, retries and rate limits (max_in_flight sends queued behind the "
                "slowest rate); a slow send must never look like a crashed one"
            )
        hooks = self.webhooks
        if (hooks.postmark_username is None) != (hooks.postmark_password is None):
            raise ValueError("dispatcher.webhooks.postmark_username: give username and password")
        return self

    def production_problems(self) -> list[str]:
        """What production refuses, checked when the dispatcher starts (other services do not
        need its secrets): development keys, a placeholder address, plain http, no credential."""
        problems = []
        if any(k.get_secret_value() == DEV_UNSUBSCRIBE_KEY for k in self.unsubscribe_keys):
            problems.append("dispatcher.unsubscribe_keys: production needs a real key")
        if not self.public_base_url.startswith("https://"):
            problems.append("dispatcher.public_base_url: production needs an https URL")
        if self.postal_address == DEV_POSTAL_ADDRESS:
            problems.append("dispatcher.postal_address: production needs the real postal address")
        for channel in CHANNEL_KINDS:
            for position, provider in zip(
                ("primary", "secondary"), self.channel(channel).providers, strict=False
            ):
                key = provider.api_key.get_secret_value() if provider.api_key else ""
                if provider.kind != "file" and (key in ("", DEV_SECRET) or len(key) < 8):
                    problems.append(
                        f"dispatcher.{channel}.{position}.api_key: production needs the real "
                        f"{provider.kind} credential"
                    )
        return problems


# --- billing connectors (ingest's /v1/billing/<provider> webhooks) -----------------------------


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class StripeBillingSettings(BaseModel):
    """Stripe: ``Stripe-Signature`` checked against each endpoint secret (rotation: list the new
    and the old one while Stripe rolls the secret over). Off (404) while no secret is set."""

    model_config = ConfigDict(extra="forbid")

    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="whsec_... endpoint secrets (comma list)"
    )
    tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    api_key: SecretStr | None = Field(default=None, description="for backfill and coupons")
    customer_id_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="the key of the Stripe metadata holding your own customer id: "
        "the customer id in winback where the event has it, the billing system's otherwise",
    )

    _split = field_validator("webhook_secrets", mode="before")(_comma_list)

    @field_validator("webhook_secrets")
    @classmethod
    def _whsec(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not s.get_secret_value().startswith("whsec_") for s in value):
            raise ValueError("a Stripe endpoint secret starts with whsec_ (not the API key)")
        return value


class PaddleBillingSettings(BaseModel):
    """Paddle Billing: ``Paddle-Signature`` (ts, h1) checked against each notification
    destination's secret key. Off (404) while no secret is set."""

    model_config = ConfigDict(extra="forbid")

    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="pdl_ntfset_... secret keys (comma list)"
    )
    tolerance_seconds: int = Field(
        default=5, ge=1, le=3600, description="Paddle's (and its SDK's) recommended 5 s"
    )
    api_key: SecretStr | None = Field(default=None, description="for backfill and coupons")
    customer_id_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="the key of the Paddle custom_data holding your own customer id: "
        "the customer id in winback where the event has it, the billing system's otherwise",
    )

    _split = field_validator("webhook_secrets", mode="before")(_comma_list)


class ChargebeeBillingSettings(BaseModel):
    """Chargebee: HTTP Basic credentials on the webhook URL. Off (404) while unset."""

    model_config = ConfigDict(extra="forbid")

    username: str | None = None
    password: SecretStr | None = None
    api_key: SecretStr | None = Field(default=None, description="for backfill and coupons")
    customer_id_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="the key of the Chargebee meta_data holding your own customer id: "
        "the customer id in winback where the event has it, the billing system's otherwise",
    )

    @model_validator(mode="after")
    def _pair(self) -> ChargebeeBillingSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password (or neither)")
        if self.password is not None and len(self.password.get_secret_value()) < 12:
            raise ValueError("password: use 12+ characters")
        return self


class BillingSettings(BaseModel):
    """The billing connectors; each is off until its webhook secret is configured."""

    model_config = ConfigDict(extra="forbid")

    stripe: StripeBillingSettings = Field(default_factory=StripeBillingSettings)
    paddle: PaddleBillingSettings = Field(default_factory=PaddleBillingSettings)
    chargebee: ChargebeeBillingSettings = Field(default_factory=ChargebeeBillingSettings)


class OfferCostSettings(BaseModel):
    """What one redeemed offer costs the business, for the results report's cost and ROI."""

    model_config = ConfigDict(extra="forbid")

    mrr_months: float = Field(
        default=0.0,
        ge=0,
        le=36,
        description="months of the customer's regained MRR given away (50% off for 3 months: "
        "1.5; a free month: 1)",
    )
    fixed_minor: float = Field(
        default=0.0, ge=0, description="a fixed cost per redemption (results.currency minor units)"
    )


class ResultsSettings(BaseModel):
    """The prices the results report charges for cost, cost per reactivation and ROI."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field(
        default="EUR", pattern=r"^[A-Z]{3}$", description="the currency of cost and ROI"
    )
    message_cost_minor: dict[str, float] = Field(
        default_factory=lambda: {"email": 0.1, "sms": 7.0, "crm": 0.0, "webhook": 0.0},
        description='minor units per message sent, by channel ("email") or channel and '
        'provider ("email/sendgrid", which wins)',
    )
    offer_cost: dict[str, OfferCostSettings] = Field(
        default_factory=dict,
        description="cost per redeemed offer (the offer on the step a return is credited to), "
        "by offer name: replaces the price derived from the content's offers.yaml (percent "
        "off x months, free months, amount off, cost_minor)",
    )
    exchange_rates: dict[str, float] = Field(
        default_factory=dict,
        description="one unit of a currency in results.currency; returns in a currency "
        "without a rate are left out of the money figures (and counted)",
    )

    @field_validator("message_cost_minor", "exchange_rates")
    @classmethod
    def _not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if amount < 0:
                raise ValueError(f"{name}: must not be negative")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        extra="forbid",
        validate_default=True,
    )

    environment: Literal["development", "test", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: a readable console line when the log stream (stderr) is a terminal, "
        "JSON lines otherwise",
    )
    log_repeat_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="repeats of a Kafka client log line (and of a retry loop's) within this "
        "interval become one summary line with the count",
    )
    service_name: str = "winback"
    content_dir: Path | None = Field(
        default=None,
        description="a content directory of your own (catalog.yaml, offers.yaml and the message "
        "files per locale, laid out as shared/content); unset: the shipped content",
    )
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)

    @model_validator(mode="after")
    def _no_dev_secrets_in_production(self) -> Settings:
        if self.environment == "production":
            for api_key in self.http.api_keys:
                key = api_key.key
                if key.get_secret_value() in ("", DEV_SECRET) or len(key.get_secret_value()) < 16:
                    raise ValueError(
                        "http.api_keys: production needs real API keys (16+ characters), "
                        "not the development default"
                    )
            if not self.database.url:
                raise ValueError("database.url: production needs an explicit database URL")
            if not self.kafka.bootstrap_servers:
                raise ValueError("kafka.bootstrap_servers: production needs a Kafka cluster")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # highest priority first: arguments, environment, .env, secrets directory, YAML file
        sources = _sources(settings_cls, settings_places())
        return (init_settings, *(source for source, _ in sources))


CONFIG_FILE_VAR = f"{ENV_PREFIX}CONFIG_FILE"
ENV_FILE_VAR = f"{ENV_PREFIX}ENV_FILE"
SECRETS_DIR_VAR = f"{ENV_PREFIX}SECRETS_DIR"
DEFAULT_ENV_FILE = Path(".env")
DEFAULT_SECRETS_DIR = Path("/run/secrets")
NOT_SETTINGS = frozenset({CONFIG_FILE_VAR, ENV_FILE_VAR, SECRETS_DIR_VAR, f"{ENV_PREFIX}CACHE_DIR"})
"""``WINBACK_`` variables that are not settings: where the settings are, and the local broker's
download cache. Every other ``WINBACK_`` variable must name a setting (``WINBACK_CI_*``, the CI
tools' versions, excepted)."""
NOT_SETTINGS_PREFIXES = (f"{ENV_PREFIX}CI_",)


@dataclass(frozen=True)
class Places:
    """Where settings come from besides the environment (which wins over all of them), in
    order of priority: a ``.env`` file, a secrets directory (one file per variable, named like
    it: ``WINBACK_HTTP__API_KEYS``), the YAML file."""

    env_file: Path | None = None
    secrets_dir: Path | None = None
    config_file: Path | None = None


def settings_places() -> Places:
    """``WINBACK_ENV_FILE`` (default ``.env`` in the working directory, if there is one),
    ``WINBACK_SECRETS_DIR`` (default ``/run/secrets``, if it exists) and ``WINBACK_CONFIG_FILE``
    (no default). Set to an empty value, a place is not read; named and missing, it is a
    ``ConfigError``."""

    def named(var: str, default: Path | None, kind: str) -> Path | None:
        value = os.environ.get(var)
        if value is None:
            present = default is not None and (
                default.is_dir() if kind == "directory" else default.is_file()
            )
            return default if present else None
        if not value:
            return None
        path = Path(value)
        if kind == "directory" and not path.is_dir():
            raise ConfigError(f"{var}={value}: no such directory")
        if kind == "file" and not path.is_file():
            raise ConfigError(f"{var}={value}: no such file")
        return path

    return Places(
        env_file=named(ENV_FILE_VAR, DEFAULT_ENV_FILE, "file"),
        secrets_dir=named(SECRETS_DIR_VAR, DEFAULT_SECRETS_DIR, "directory"),
        config_file=named(CONFIG_FILE_VAR, None, "file"),
    )


Describe = Callable[[tuple[str, ...]], str]


class _YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, with our errors: the file unreadable, not YAML or not a
    mapping of settings is a ``ConfigError`` naming the file."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read the config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file_path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file_path}: the top level must be a mapping of settings")
        return data


def _sources(
    settings_cls: type[BaseSettings], places: Places
) -> list[tuple[PydanticBaseSettingsSource, Describe]]:
    """Every source besides the arguments, highest priority first, each with how to name
    where one of its values came from."""
    sources: list[tuple[PydanticBaseSettingsSource, Describe]] = [
        (EnvSettingsSource(settings_cls), lambda p: f"environment variable {_env_name(p)}")
    ]
    if places.env_file is not None:
        env_file = places.env_file
        sources.append(
            (
                # only what names a field: our own check reports every other WINBACK_ name
                DotEnvSettingsSource(
                    settings_cls, env_file=env_file, dotenv_filtering="only_existing"
                ),
                lambda p: f"{env_file}: {_env_name(p)}",
            )
        )
    if places.secrets_dir is not None:
        secrets_dir = places.secrets_dir
        sources.append(
            (
                NestedSecretsSettingsSource(
                    SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir),
                    secrets_dir=secrets_dir,
                    secrets_dir_missing="error",
                    secrets_nested_delimiter=NESTED,
                ),
                lambda p: f"secret file {secrets_dir / _env_name(p)}",
            )
        )
    if places.config_file is not None:
        config_file = places.config_file
        sources.append(
            (
                _YamlFile(settings_cls, yaml_file=config_file),
                lambda p: f"{config_file}: {'.'.join(p)}",
            )
        )
    return sources


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + NESTED.join(str(part).upper() for part in loc if isinstance(part, str))


def _leaves(data: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(data, dict) and (data or not path):
        for key, value in data.items():
            yield from _leaves(value, (*path, str(key)))
    else:
        yield path


def _provenance(places: Places) -> dict[tuple[str, ...], str]:
    """Each value a source gave, by its path, named by the source that wins."""
    seen: dict[tuple[str, ...], str] = {}
    for source, describe in reversed(_sources(Settings, places)):
        for path in _leaves(source()):
            seen[path] = describe(path)
    return seen


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def _model_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings group at ``path`` (``()``: ``Settings``), if there is one."""
    model: type[BaseModel] | None = Settings
    for part in path:
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return model


def _did_you_mean(path: tuple[str, ...], as_variable: bool) -> str:
    """`` (did you mean WINBACK_X__Y?)`` (or ``x.y`` in a file) for a name close to a field."""
    model = _model_at(path[:-1])
    if model is None or not path:
        return ""
    close = difflib.get_close_matches(path[-1].lower(), list(model.model_fields), n=1)
    if not close:
        return ""
    field = (*path[:-1], close[0])
    return f" (did you mean {_env_name(field) if as_variable else '.'.join(field)}?)"


def _unknown_variables(places: Places) -> list[str]:
    """``WINBACK_`` variables — in the environment, the ``.env`` file or the secrets directory
    — whose first part names no setting. pydantic-settings ignores them (it looks up the
    fields it knows); a typo must not load the default. A wrong name deeper down
    (``WINBACK_SCHEDULER__CAP_PER_WEK``) reaches the group, which refuses extra fields."""
    names = [(name, f"environment variable {name}") for name in os.environ]
    if places.env_file is not None:
        names += [(name, f"{places.env_file}: {name}") for name in dotenv_values(places.env_file)]
    if places.secrets_dir is not None:
        names += [
            (p.name, f"secret file {p}")
            for p in sorted(places.secrets_dir.iterdir())
            if not p.name.startswith(".")
        ]
    problems = []
    for name, origin in names:
        upper = name.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in NOT_SETTINGS
            or upper.startswith(NOT_SETTINGS_PREFIXES)
        ):
            continue
        head = upper.removeprefix(ENV_PREFIX).split(NESTED)[0].lower()
        if head not in Settings.model_fields:
            problems.append(f"{origin}: no such setting{_did_you_mean((head,), True)}")
    return problems


def _origin(
    path: tuple[str, ...], seen: dict[tuple[str, ...], str], reason: str = ""
) -> tuple[str, bool] | None:
    """Who set ``path``: ``(description, True)`` for the value itself (or a whole group given
    at once above it), ``(descriptions, False)`` for the values set under it (a group's check
    fails on the values it was given: those its message names, if any, else all of them);
    ``None`` if nothing set it (its default)."""
    for end in range(len(path), 0, -1):
        if path[:end] in seen:
            return seen[path[:end]], end == len(path)
    given = [(p, what) for p, what in seen.items() if path and p[: len(path)] == path]
    named = [(p, what) for p, what in given if re.search(rf"\b{re.escape(p[-1])}\b", reason)]
    under = sorted({what for _, what in named or given})
    if not under:
        return None
    return ", ".join(under[:4]) + (f" and {len(under) - 4} more" if len(under) > 4 else ""), False


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): (.+)$", re.DOTALL)


def _describe_error(err: Any, seen: dict[tuple[str, ...], str]) -> str:
    path = tuple(part for part in err["loc"] if isinstance(part, str))
    reason = str(err["msg"])
    found = _origin(path, seen)
    if err["type"] == "extra_forbidden":
        as_variable = found is None or _env_name(path) in found[0]
        reason = f"no such setting{_did_you_mean(path, as_variable)}"
    elif err["type"] == "value_error":
        # a group's own check (model_validator): its message may start with the field it is
        # about, from the top (``dispatcher.stale_sending_seconds: ...``) or within the group
        reason = reason.removeprefix("Value error, ")
        match = _FIELD.match(reason)
        if match is not None:
            named = tuple(match.group(1).split("."))
            field = named if named[: len(path)] == path else (*path, *named)
            reason = match.group(2)
            found = _origin(field, seen) or (_origin(path, seen, reason) if path else None)
            return _line(field, reason, found, named=True)
        return _line(path, reason, found, named=True)
    return _line(path, reason, found, named=False)


def _line(path: tuple[str, ...], reason: str, found: tuple[str, bool] | None, named: bool) -> str:
    """``<where the value came from>: [<field>: ]<reason>``; the field is named when the
    origin does not name it already, and always for a group's own check (``named``)."""
    dotted = ".".join(path)
    if found is None:  # the default, or a value passed in
        return f"setting {dotted} ({_env_name(path)}): {reason}"
    origin, exact = found
    if not exact:  # a group's check, on values given for other fields of the group
        return f"{dotted}: {reason} (from {origin})"
    if origin.endswith(dotted) or not named:
        return f"{origin}: {reason}"
    return f"{origin}: {dotted}: {reason}"


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise ``ConfigError`` naming each bad field and where
    its value came from (environment variable, ``.env`` file, secret file or YAML file:field).
    """
    places = settings_places()
    problems = _unknown_variables(places)
    settings: Settings | None = None
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:
        cause = exc.__cause__
        raise ConfigError(f"invalid configuration: {exc}: {cause}") from None
    except ValidationError as exc:
        seen = _provenance(places)
        problems += [_describe_error(err, seen) for err in exc.errors()]
    if problems or settings is None:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings
