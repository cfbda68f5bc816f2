"""Every step of every shipped playbook renders in every shipped locale with what the step
itself provides: a template that needs an offer gets one, so no default step fails at send
time for a missing field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.dispatcher.rendering import TEMPLATE_SPECS, Brand, Channel, TemplateRenderer
from services.scheduler.domain import load_playbooks
from shared.settings import load_settings

PLAYBOOKS = load_playbooks(load_settings().scheduler.playbooks_dir)
CASES = [
    (pb.name, step.key, variant.name if variant else "-", template, step.channel, offer)
    for pb in PLAYBOOKS
    for step in pb.steps
    for variant in (step.variants or [None])
    for template, offer in {
        (
            (variant.template if variant and variant.template else step.template),
            (variant.offer if variant and variant.offer else step.offer),
        ),
        *([(step.without_discount, None)] if step.without_discount else []),
    }
]
RENDERER = TemplateRenderer(Brand("Example Ltd", "Esimerkkikatu 1, 00100 Helsinki"))


def test_the_shipped_playbooks_have_steps_to_check() -> None:
    assert len(CASES) > 40


@pytest.mark.parametrize(("playbook", "step", "variant", "template", "channel", "offer"), CASES)
@pytest.mark.parametrize("locale", ["en", "fi-FI", "da", "ms"])
def test_each_default_step_renders_with_what_it_provides(
    playbook: str,
    step: str,
    variant: str,
    template: str,
    channel: str,
    offer: str | None,
    locale: str,
) -> None:
    spec = TEMPLATE_SPECS[(template, Channel(channel))]
    context = {
        "name": "Aino",
        "product": "Example App",
        "cta_url": "https://app.example/back",
        "unsubscribe_url": "https://app.example/u/token",
        "new_features": ["SSO"],
        "churn_reason": "price",
        "segment": "churned_customer",
        "mrr": 4900,
        "currency": "EUR",
    }
    if offer:
        context["offer"] = offer
        context["valid_until"] = datetime(2026, 5, 1, tzinfo=UTC)
    context = {k: v for k, v in context.items() if k in spec.required | spec.optional}
    message = RENDERER.render(template, channel, locale, context)
    assert message.text.strip()
    assert "None" not in message.text
