"""The competitor_news template: the dispatch command's competitor reaches the message, in
every shipped locale, and a command without one still renders."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.dispatcher.compose import Composer, Profile
from services.dispatcher.rendering import Brand, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared.clock import FrozenClock
from shared.contracts.dispatch import DispatchCommand

NOW = datetime(2026, 5, 4, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def composer() -> Composer:
    return Composer(
        TemplateRenderer(Brand("Acme Oy", "Mannerheimintie 1, Helsinki")),
        UnsubscribeTokens([b"k" * 32], FrozenClock(NOW)),
        public_base_url="https://winback.example.com/",
        product="Acme Analytics",
        cta_url="https://app.acme.example/back",
        highlights=["Faster reports"],
        unsubscribe_mailto="unsubscribe@acme.example",
        crm_default_owner="owner-default",
    )


def command(locale: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "idempotency_key": "case-1:competitor_news",
        "case_id": "case-1",
        "step_id": 7,
        "step_key": "competitor_news",
        "playbook": "competitor",
        "playbook_version": 1,
        "channel": "email",
        "template": "competitor_news",
        "offer": None,
        "is_discount": False,
        "variant": None,
        "valid_until": None,
        "customer": {
            "id": "cus_1",
            "email": "aino@example.com",
            "phone": None,
            "name": None,
            "locale": locale,
            "timezone": None,
            "plan": None,
            "crm_owner": None,
        },
        "reason": "competitor",
        "features": [],
        "feature_description": None,
        "requested_at": NOW.isoformat(),
        **changes,
    }
    return DispatchCommand.decode(data, tolerant=False).to_data()


@pytest.mark.parametrize("locale", ["en", "fi", "da", "ms"])
def test_the_competitor_is_named_in_the_message(composer: Composer, locale: str) -> None:
    message = composer.compose(command(locale, competitor="Rival CRM"), Profile(), NOW)
    assert "Rival CRM" in (message.content.subject or "")
    assert "Rival CRM" in message.content.text
    plain = composer.compose(command(locale), Profile(), NOW)
    assert "Rival" not in plain.content.text
    assert message.content.locale == locale  # its own translation, no fallback
    assert plain.content.subject


def test_the_context_carries_the_commands_competitor(composer: Composer) -> None:
    ctx = composer.context(command("en", competitor="Rival CRM"), Profile(), "email")
    assert ctx["competitor"] == "Rival CRM"
    assert "competitor" not in composer.context(command("en"), Profile(), "email")
