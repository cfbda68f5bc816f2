"""Settings: environment variables under the ``WINBACK_`` prefix (nested groups with ``__``),
optionally on top of a YAML file named by ``WINBACK_CONFIG_FILE``. Typed and validated at
start-up: every bad value is reported with where it came from, the field and why."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from shared.errors import ConfigError

ENV_PREFIX = "WINBACK_"
NESTED = "__"
DEV_SECRET = "dev-only-not-a-secret"


class DatabaseSettings(BaseModel):
    url: str = Field(
        default="",
        description="postgresql+asyncpg:// URL; empty = embedded PostgreSQL (pgserver)",
    )
    pool_size: int = Field(default=10, ge=1, le=200)
    data_dir: Path = Field(
        default=Path(".winback/pgdata"), description="embedded PostgreSQL data directory"
    )


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field(
        default="", description="host:port list; empty = a local broker started for you"
    )
    client_id: str = "winback"
    max_batch: int = Field(default=500, ge=1, le=10_000)
    poll_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    batch_linger_ms: int = Field(default=20, ge=0, le=5_000)
    session_timeout_ms: int = Field(default=30_000, ge=6_000)
    data_dir: Path = Field(default=Path(".winback/kafka"), description="local broker data")


class TopicSettings(BaseModel):
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
    event_type_prefix: str = Field(
        default="com.example", description="reverse-DNS prefix of inbound CloudEvent types"
    )
    max_event_bytes: int = Field(default=256 * 1024, ge=1024)
    max_future_skew_seconds: int = Field(default=300, ge=0)
    http_batch_limit: int = Field(default=1000, ge=1)


class SchedulerSettings(BaseModel):
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
            raise ValueError(f"unknown IANA timezone {self.fallback_timezone!r}") from None
        if self.send_window_end_hour <= self.send_window_start_hour:
            raise ValueError("send_window_end_hour must be after send_window_start_hour")
        return self


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    ingest_port: int = Field(default=8081, ge=0, le=65535)
    scheduler_port: int = Field(default=8082, ge=0, le=65535)
    dispatcher_port: int = Field(default=8083, ge=0, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=lambda: [SecretStr(DEV_SECRET)]
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class OutboxSettings(BaseModel):
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    idle_poll_seconds: float = Field(default=0.05, gt=0, le=60)
    keep_published_hours: float = Field(default=24, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        extra="forbid",
        validate_default=True,
    )

    environment: Literal["development", "test", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    service_name: str = "winback"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)

    @model_validator(mode="after")
    def _no_dev_secrets_in_production(self) -> Settings:
        if self.environment == "production":
            for key in self.http.api_keys:
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
        return (init_settings, env_settings, _YamlFileSource(settings_cls))


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``WINBACK_CONFIG_FILE`` (environment wins)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        if not path:
            return {}
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        return data


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + NESTED.join(str(part).upper() for part in loc if isinstance(part, str))


def _origin(loc: tuple[int | str, ...]) -> str:
    env = _env_name(loc)
    if any(name.upper().startswith(env) for name in os.environ):
        return f"environment variable {env}"
    path = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if path:
        return f"{path}: {'.'.join(str(part) for part in loc)}"
    return f"setting {'.'.join(str(p) for p in loc)} ({env})"


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise ``ConfigError`` naming each bad field."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        cause = exc.__cause__
        raise ConfigError(f"invalid configuration: {exc}: {cause}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if not loc and err["type"] == "value_error":
                # model-level check; its message starts with the field path
                message = str(err["msg"]).removeprefix("Value error, ")
                field, _, reason = message.partition(": ")
                lines.append(f"{_origin(tuple(field.split('.')))}: {reason}")
                continue
            lines.append(f"{_origin(loc)}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
