"""Wording follows the lifecycle: a trial that ended, a lost lead and a quiet user are never
told they decided to leave or that they were customers; a churned customer still is."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from services.dispatcher.compose import Composer, Profile
from services.dispatcher.rendering import Brand, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared.clock import FrozenClock

RENDERER = TemplateRenderer(Brand("Acme Oy", "Mannerheimintie 1, Helsinki"))
CONTEXT: dict[str, Any] = {
    "product": "Acme",
    "cta_url": "https://acme.example/back",
    "unsubscribe_url": "https://acme.example/u/t",
    "new_features": ["SSO"],
    "offer": "free_month",
    "valid_until": date(2026, 12, 31),
}
LEFT = {
    "en": "You decided to leave",
    "fi": "Päätit lopettaa",
    "da": "Du valgte at forlade",
    "ms": "memutuskan",
}
WERE_A_CUSTOMER = {
    "en": "because you were a Acme customer",
    "fi": "olit palvelun Acme asiakas",
    "da": "har været kunde hos Acme",
    "ms": "pernah menjadi pelanggan Acme",
}


@pytest.mark.parametrize("locale", ["en", "fi", "da", "ms"])
@pytest.mark.parametrize("lifecycle", ["expired_trial", "lost_lead", "passive_user"])
def test_who_never_cancelled_is_not_told_they_left(locale: str, lifecycle: str) -> None:
    for part in ("text", "html"):
        message = RENDERER.render(
            "we_miss_you", "email", locale, {**CONTEXT, "lifecycle": lifecycle}
        )
        body = getattr(message, part)
        assert body is not None
        assert LEFT[locale] not in body, (part, body)
        assert WERE_A_CUSTOMER[locale] not in body, (part, body)
        assert "Acme" in body


@pytest.mark.parametrize("locale", ["en", "fi", "da", "ms"])
@pytest.mark.parametrize("lifecycle", [None, "churned_customer"])
def test_a_churned_customer_keeps_the_template_s_own_words(
    locale: str, lifecycle: str | None
) -> None:
    context = CONTEXT if lifecycle is None else {**CONTEXT, "lifecycle": lifecycle}
    message = RENDERER.render("we_miss_you", "email", locale, context)
    assert LEFT[locale] in message.text
    assert WERE_A_CUSTOMER[locale] in message.text


def test_the_composer_takes_the_lifecycle_from_the_case_segment() -> None:
    composer = Composer(
        RENDERER,
        UnsubscribeTokens([b"k" * 32], FrozenClock()),
        public_base_url="https://winback.example",
        product="Acme",
        cta_url="https://acme.example/back",
    )
    command = {"template": "we_miss_you", "channel": "email", "customer": {"id": "c1"}}
    trial = composer.context(command, Profile(segment={"lifecycle": "expired_trial"}), "email")
    assert trial["lifecycle"] == "expired_trial"
    assert "lifecycle" not in composer.context(command, Profile(), "email")


@pytest.mark.parametrize("locale", ["en", "fi", "da", "ms"])
def test_the_comparison_names_the_competitor_they_left_for(locale: str) -> None:
    context = {**CONTEXT, "name": "Aino"}
    named = RENDERER.render("comparison", "email", locale, {**context, "competitor": "Rivalio"})
    unnamed = RENDERER.render("comparison", "email", locale, context)
    assert named.subject is not None
    assert "Rivalio" in named.subject
    assert "Rivalio" in named.text
    assert named.html is not None
    assert "Rivalio" in named.html
    assert unnamed.subject is not None
    assert "Rivalio" not in unnamed.subject + unnamed.text
