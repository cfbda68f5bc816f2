"""Settings are checked at start-up; each bad value is reported with where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import load_settings


def test_defaults_are_valid_for_development() -> None:
    settings = load_settings()
    assert settings.environment == "development"
    assert settings.topics.dead_letter


def test_a_bad_environment_variable_is_named_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WINBACK_KAFKA__MAX_BATCH", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "environment variable WINBACK_KAFKA__MAX_BATCH" in str(info.value)
    assert "valid integer" in str(info.value)


def test_a_bad_value_in_the_config_file_names_the_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "winback.yaml"
    config.write_text("kafka:\n  max_batch: -3\n")
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{config}: kafka.max_batch" in str(info.value)
    assert "greater than or equal to 1" in str(info.value)


def test_an_unknown_setting_in_the_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "winback.yaml"
    config.write_text("kafak:\n  max_batch: 3\n")
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "kafak" in str(info.value)


def test_production_refuses_the_development_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_ENVIRONMENT", "production")
    monkeypatch.setenv("WINBACK_DATABASE__URL", "postgresql://db/winback")
    monkeypatch.setenv("WINBACK_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "WINBACK_HTTP__API_KEYS" in str(info.value)
    monkeypatch.setenv("WINBACK_HTTP__API_KEYS", "a-real-key-of-some-length")
    assert load_settings().environment == "production"


def test_comma_lists_are_accepted_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_TOPICS__INBOUND", "a, b,c")
    assert load_settings().topics.inbound == ["a", "b", "c"]


def test_inbox_retention_outlasts_a_stock_kafka_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    retention = load_settings().retention
    # a stock broker keeps a record 7 days (retention.ms) plus up to a segment's 7 (segment.ms)
    assert retention.keep_inbox_days >= 14
    assert retention.batch_size >= 1
    monkeypatch.setenv("WINBACK_RETENTION__KEEP_INBOX_DAYS", "30")
    monkeypatch.setenv("WINBACK_RETENTION__INTERVAL_SECONDS", "60")
    retention = load_settings().retention
    assert (retention.keep_inbox_days, retention.interval_seconds) == (30, 60)


def test_a_too_short_inbox_retention_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_RETENTION__KEEP_INBOX_DAYS", "0.5")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "environment variable WINBACK_RETENTION__KEEP_INBOX_DAYS" in str(info.value)
    assert "greater than or equal to 1" in str(info.value)
