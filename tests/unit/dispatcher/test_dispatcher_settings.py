"""The dispatcher's settings: providers per channel from the environment, checked at start-up
with the variable and the reason; production refuses development secrets."""

from __future__ import annotations

import pytest

from services.dispatcher.bootstrap import check_settings, check_templates
from shared.errors import ConfigError
from shared.settings import DEV_UNSUBSCRIBE_KEY, load_settings

PREFIX = "WINBACK_DISPATCHER__"


def test_every_channel_defaults_to_the_file_provider() -> None:
    d = load_settings().dispatcher
    for channel in ("email", "sms", "crm", "webhook"):
        assert [p.kind for p in d.channel(channel).providers] == ["file"]
    assert d.unsubscribe_keys[0].get_secret_value() == DEV_UNSUBSCRIBE_KEY


def test_providers_come_from_nested_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__KIND", "sendgrid")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__API_KEY", "SG.secret-key")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__FROM_ADDRESS", "hello@acme.example")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__RATE_PER_SECOND", "50")
    monkeypatch.setenv(f"{PREFIX}EMAIL__SECONDARY__KIND", "postmark")
    monkeypatch.setenv(f"{PREFIX}EMAIL__SECONDARY__API_KEY", "pm-token")
    monkeypatch.setenv(f"{PREFIX}EMAIL__SECONDARY__FROM_ADDRESS", "hello@acme.example")
    monkeypatch.setenv(f"{PREFIX}UNSUBSCRIBE_KEYS", "k" * 32 + ", " + "o" * 40)
    monkeypatch.setenv(f"{PREFIX}RETRY__MAX_ATTEMPTS", "5")
    d = load_settings().dispatcher
    primary, secondary = d.email.providers
    assert (primary.kind, primary.label, primary.rate_per_second) == ("sendgrid", "sendgrid", 50)
    assert primary.api_key is not None
    assert primary.api_key.get_secret_value() == "SG.secret-key"
    assert "SG.secret-key" not in repr(d)  # secrets stay out of logs
    assert secondary.kind == "postmark"
    assert [k.get_secret_value() for k in d.unsubscribe_keys] == ["k" * 32, "o" * 40]
    assert d.retry.max_attempts == 5


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EMAIL__PRIMARY__KIND": "sendgrid"}, "needs API_KEY (the SendGrid API key)"),
        (
            {"EMAIL__PRIMARY__KIND": "postmark", "EMAIL__PRIMARY__API_KEY": "t"},
            "needs FROM_ADDRESS",
        ),
        (
            {
                "SMS__PRIMARY__KIND": "sendgrid",
                "SMS__PRIMARY__API_KEY": "k",
                "SMS__PRIMARY__FROM_ADDRESS": "a@example.com",
            },
            "dispatcher.sms.primary.kind: a sendgrid provider cannot serve sms",
        ),
        (
            {"SMS__PRIMARY__KIND": "twilio", "SMS__PRIMARY__API_KEY": "t"},
            "needs ACCOUNT_SID",
        ),
        (
            {
                "WEBHOOK__PRIMARY__KIND": "webhook",
                "WEBHOOK__PRIMARY__API_KEY": "short",
                "WEBHOOK__PRIMARY__BASE_URL": "https://h.example",
            },
            "16+ characters",
        ),
        ({"EMAIL__SECONDARY__KIND": "file"}, "both named 'file'"),
        ({"UNSUBSCRIBE_KEYS": "too-short"}, "32+ bytes"),
        ({"PUBLIC_BASE_URL": "winback.example.com"}, "http(s) URL"),
        ({"STALE_SENDING_SECONDS": "10"}, "stale_sending_seconds: must be at least"),
        ({"MAX_IN_FLIGHT": "0"}, "WINBACK_DISPATCHER__MAX_IN_FLIGHT"),
        (
            # 512 sends queued behind 0.2/s wait 2560 s: longer than the stale limit (1800 s)
            {"EMAIL__PRIMARY__RATE_PER_SECOND": "0.2"},
            "timeouts, retries and rate limits",
        ),
    ],
)
def test_a_bad_dispatcher_setting_is_named_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(PREFIX + name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert expected in str(info.value)


def production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_ENVIRONMENT", "production")
    monkeypatch.setenv("WINBACK_DATABASE__URL", "postgresql://db/winback")
    monkeypatch.setenv("WINBACK_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("WINBACK_HTTP__API_KEYS", "a-real-key-of-some-length")


def test_production_refuses_development_secrets_when_the_dispatcher_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    production(monkeypatch)
    settings = load_settings()  # other services start without the dispatcher's secrets
    with pytest.raises(ConfigError) as info:
        check_settings(settings)
    message = str(info.value)
    assert "dispatcher.unsubscribe_keys: production needs a real key" in message
    assert "dispatcher.public_base_url: production needs an https URL" in message
    assert "dispatcher.postal_address" in message

    monkeypatch.setenv(f"{PREFIX}UNSUBSCRIBE_KEYS", "p" * 48)
    monkeypatch.setenv(f"{PREFIX}PUBLIC_BASE_URL", "https://winback.acme.example")
    monkeypatch.setenv(f"{PREFIX}POSTAL_ADDRESS", "Acme Oy, Mannerheimintie 1, Helsinki")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__KIND", "sendgrid")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__API_KEY", "dev-only-not-a-secret")
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__FROM_ADDRESS", "hello@acme.example")
    with pytest.raises(ConfigError, match=r"email\.primary\.api_key"):
        check_settings(load_settings())
    monkeypatch.setenv(f"{PREFIX}EMAIL__PRIMARY__API_KEY", "SG.a-real-sendgrid-key")
    check_settings(load_settings())


def test_a_bad_sendgrid_webhook_key_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}WEBHOOKS__SENDGRID_PUBLIC_KEY", "bm90IGEga2V5")
    with pytest.raises(ConfigError, match="sendgrid_public_key"):
        check_settings(load_settings())


def test_the_dispatcher_renders_every_catalogued_template_at_start_up() -> None:
    check_templates(load_settings())
