"""The billing settings group: comma lists for rotation, connectors off until configured, and
the mistakes a new user makes refused at start-up without echoing the secret."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.settings import load_settings


def test_secrets_are_comma_lists_and_connectors_start_off(monkeypatch: pytest.MonkeyPatch) -> None:
    billing = load_settings().billing
    assert billing.stripe.webhook_secrets == []
    assert billing.paddle.webhook_secrets == []
    assert billing.chargebee.username is None
    monkeypatch.setenv("WINBACK_BILLING__STRIPE__WEBHOOK_SECRETS", "whsec_new, whsec_old")
    monkeypatch.setenv("WINBACK_BILLING__PADDLE__WEBHOOK_SECRETS", "pdl_ntfset_a,pdl_ntfset_b")
    billing = load_settings().billing
    assert [s.get_secret_value() for s in billing.stripe.webhook_secrets] == [
        "whsec_new",
        "whsec_old",
    ]
    assert len(billing.paddle.webhook_secrets) == 2
    assert (billing.stripe.tolerance_seconds, billing.paddle.tolerance_seconds) == (300, 5)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"WINBACK_BILLING__STRIPE__WEBHOOK_SECRETS": "sk_live_not_the_secret"},
            "starts with whsec_",
        ),
        ({"WINBACK_BILLING__CHARGEBEE__USERNAME": "winback"}, "give both username and password"),
        (
            {
                "WINBACK_BILLING__CHARGEBEE__USERNAME": "winback",
                "WINBACK_BILLING__CHARGEBEE__PASSWORD": "short",
            },
            "12+ characters",
        ),
        ({"WINBACK_BILLING__STRIPE__WEBHOOK_SECRET": "whsec_x"}, "did you mean"),
    ],
)
def test_mistakes_are_refused_naming_the_variable_not_the_secret(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], says: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert says in message
    assert any(name in message for name in env)
    for value in env.values():
        if value not in ("winback",):
            assert value not in message
