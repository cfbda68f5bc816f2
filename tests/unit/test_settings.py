"""Settings are checked at start-up; each bad value is reported with where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.errors import ConfigError
from shared.settings import Settings, load_settings


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


def _groups(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    from shared.settings import _model_in

    for field in model.model_fields.values():
        group = _model_in(field.annotation)
        if group is not None and group not in seen:
            seen.add(group)
            _groups(group, seen)
    return seen


def test_every_settings_group_refuses_a_field_it_does_not_have() -> None:
    groups = _groups(Settings, set())
    assert len(groups) >= 10
    lax = sorted(g.__name__ for g in groups if g.model_config.get("extra") != "forbid")
    assert lax == [], "add model_config = ConfigDict(extra='forbid') to these groups"


def test_a_typo_in_a_nested_variable_is_named_not_loaded_as_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WINBACK_SCHEDULER__CAP_PER_WEK", "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        "  environment variable WINBACK_SCHEDULER__CAP_PER_WEK: no such setting "
        "(did you mean WINBACK_SCHEDULER__CAP_PER_WEEK?)"
    ]


def test_a_winback_variable_that_names_no_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic-settings looks up the fields it knows and ignores the rest: our own check
    monkeypatch.setenv("WINBACK_LOGLEVEL", "DEBUG")
    monkeypatch.setenv("WINBACK_SCHEDULR__CAP_PER_WEEK", "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "environment variable WINBACK_LOGLEVEL: no such setting" in message
    assert "did you mean WINBACK_LOG_LEVEL?" in message
    assert "environment variable WINBACK_SCHEDULR__CAP_PER_WEEK: no such setting" in message


def test_winback_variables_that_are_not_settings_are_let_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WINBACK_CACHE_DIR", "/tmp/cache")
    monkeypatch.setenv("WINBACK_CI_ASYNCAPI_CLI_VERSION", "4.1.1")
    monkeypatch.setenv("NOT_WINBACK_AT_ALL", "x")
    assert load_settings().environment == "development"


def test_a_typo_in_the_config_file_names_the_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "winback.yaml"
    config.write_text("scheduler:\n  cap_per_wek: 1\n")
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        f"  {config}: scheduler.cap_per_wek: no such setting (did you mean scheduler.cap_per_week?)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kafka: [unclosed\n", "not valid YAML"),
        ("- a list\n", "the top level must be a mapping of settings"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_of_settings_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    config = tmp_path / "winback.yaml"
    config.write_text(text)
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings()
    assert str(info.value).startswith(f"{config}: ")


@pytest.mark.parametrize(
    ("var", "kind"),
    [
        ("WINBACK_CONFIG_FILE", "no such file"),
        ("WINBACK_ENV_FILE", "no such file"),
        ("WINBACK_SECRETS_DIR", "no such directory"),
    ],
)
def test_a_named_place_that_is_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, kind: str
) -> None:
    monkeypatch.setenv(var, str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == f"{var}={tmp_path / 'missing'}: {kind}"


def test_sources_in_order_environment_dotenv_secrets_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # .env is read from the working directory
    (tmp_path / ".env").write_text(
        "# a comment\nOTHER_TOOL_SETTING=1\n"
        "WINBACK_KAFKA__MAX_BATCH=200\nWINBACK_KAFKA__CLIENT_ID=from-dotenv\n"
    )
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "WINBACK_KAFKA__MAX_BATCH").write_text("300\n")
    (secrets / "WINBACK_KAFKA__POLL_TIMEOUT_MS").write_text("700\n")
    (secrets / "winback_database__url").write_text("postgresql+asyncpg://u:pw@db/winback\n")
    (secrets / "unrelated-secret").write_text("not ours")
    config = tmp_path / "winback.yaml"
    config.write_text("kafka:\n  max_batch: 400\n  poll_timeout_ms: 800\n  batch_linger_ms: 7\n")
    monkeypatch.setenv("WINBACK_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    monkeypatch.setenv("WINBACK_KAFKA__CLIENT_ID", "from-env")

    settings = load_settings()
    kafka = settings.kafka
    assert (kafka.client_id, kafka.max_batch, kafka.poll_timeout_ms, kafka.batch_linger_ms) == (
        "from-env",
        200,
        700,
        7,
    )
    assert settings.database.url == "postgresql+asyncpg://u:pw@db/winback"  # name: any case

    monkeypatch.setenv("WINBACK_ENV_FILE", "")  # empty: no .env
    assert load_settings().kafka.max_batch == 300


def test_a_bad_value_names_the_dotenv_file_or_the_secret_file_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "winback.env"
    env_file.write_text("WINBACK_KAFKA__MAX_BATCH=lots\nWINBACK_KAFKA__MAX_BATCHES=3\n")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "WINBACK_TOPICS__PARTITIONS").write_text("0")
    (secrets / "WINBACK_TOPICZ__PARTITIONS").write_text("1")
    monkeypatch.setenv("WINBACK_ENV_FILE", str(env_file))
    monkeypatch.setenv("WINBACK_SECRETS_DIR", str(secrets))
    with pytest.raises(ConfigError) as info:
        load_settings()
    lines = sorted(line.strip() for line in str(info.value).splitlines()[1:])
    assert lines == sorted(
        [
            f"{env_file}: WINBACK_KAFKA__MAX_BATCH: Input should be a valid integer, "
            "unable to parse string as an integer",
            f"{env_file}: WINBACK_KAFKA__MAX_BATCHES: no such setting "
            "(did you mean WINBACK_KAFKA__MAX_BATCH?)",
            f"secret file {secrets / 'WINBACK_TOPICS__PARTITIONS'}: "
            "Input should be greater than or equal to 1",
            f"secret file {secrets / 'WINBACK_TOPICZ__PARTITIONS'}: no such setting "
            "(did you mean WINBACK_TOPICS?)",
        ]
    )


def test_a_group_check_names_the_source_of_the_values_it_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the file moves the send window's start past its (default) end; an unrelated environment
    # variable of the same group must not take the blame
    config = tmp_path / "winback.yaml"
    config.write_text("scheduler:\n  send_window_start_hour: 21\n")
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    monkeypatch.setenv("WINBACK_SCHEDULER__CLAIM_BATCH", "50")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        "  scheduler.send_window_end_hour: must be after send_window_start_hour (20 <= 21) "
        f"(from {config}: scheduler.send_window_start_hour)"
    ]
    # the field the check names, set in the environment: that variable
    monkeypatch.setenv("WINBACK_SCHEDULER__SEND_WINDOW_END_HOUR", "8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        "  environment variable WINBACK_SCHEDULER__SEND_WINDOW_END_HOUR: "
        "scheduler.send_window_end_hour: must be after send_window_start_hour (8 <= 21)"
    ]


def test_a_group_check_on_a_value_from_the_file_names_the_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "winback.yaml"
    config.write_text("scheduler:\n  fallback_timezone: Mars/Olympus\n")
    monkeypatch.setenv("WINBACK_CONFIG_FILE", str(config))
    monkeypatch.setenv("WINBACK_SCHEDULER__CLAIM_BATCH", "50")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines()[1:] == [
        f"  {config}: scheduler.fallback_timezone: unknown IANA timezone 'Mars/Olympus'"
    ]
