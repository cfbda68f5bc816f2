"""A CRM task names whom to call: the composer's CRM fields and the adapter's contact rules
(the HTTP side against HubSpot's spec: tests/integration/dispatcher/test_hubspot_prism.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from services.dispatcher.compose import Composer, Profile
from services.dispatcher.errors import PermanentSendError
from services.dispatcher.providers.hubspot import ContactCache, HubSpotTaskProvider
from services.dispatcher.rendering import Brand, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared.clock import FrozenClock
from shared.contracts.dispatch import DispatchCommand

NOW = datetime(2026, 5, 4, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def renderer() -> TemplateRenderer:
    return TemplateRenderer(Brand("Acme Oy", "Mannerheimintie 1, Helsinki"))


def composer(renderer: TemplateRenderer, status: str | None = None) -> Composer:
    return Composer(
        renderer,
        UnsubscribeTokens([b"k" * 32], FrozenClock(NOW)),
        public_base_url="https://winback.example.com",
        product="Ledgerly",
        cta_url="https://app.example.com/back",
        crm_default_owner="77",
        status_api_base_url=status,
    )


def command(**customer: Any) -> dict[str, Any]:
    return {
        "idempotency_key": "case-9:d14",
        "case_id": "case-9",
        "step_id": 3,
        "step_key": "d14",
        "channel": "crm",
        "template": "crm_at_risk",
        "reason": "too_expensive",
        "customer": {"id": "cus/42", "name": "Aino", "locale": "en"} | customer,
    }


def test_the_task_carries_contact_details_tenure_and_money_in_its_currency(
    renderer: TemplateRenderer,
) -> None:
    profile = Profile(
        email="aino@example.com",
        phone="+358401234567",
        mrr_minor=24900,
        currency="jpy",  # no minor unit: 24900 is ¥24,900
        segment={"tenure": "long_term", "reason": "too_expensive"},
    )

    message = composer(renderer, "https://api.example.com/").compose(command(), profile, NOW)

    lines = message.content.text.splitlines()
    assert "MRR: ¥24,900" in lines
    assert "Customer id: cus/42" in lines
    assert "Email: aino@example.com" in lines
    assert "Phone: +358401234567" in lines
    assert "Customer for: long term" in lines
    assert "Win-back status: https://api.example.com/v1/customers/cus%2F42/winback" in lines
    task = message.crm_task
    assert task is not None
    assert (task.customer_id, task.case_id, task.email, task.name, task.phone) == (
        "cus/42",
        "case-9",
        "aino@example.com",
        "Aino",
        "+358401234567",
    )
    assert message.to == ""  # no contact id on the profile: the adapter looks it up


def test_a_profile_without_contact_details_leaves_those_lines_out(
    renderer: TemplateRenderer,
) -> None:
    message = composer(renderer).compose(command(), Profile(segment={"tenure": "unknown"}), NOW)

    text = message.content.text
    for label in ("Email:", "Phone:", "Customer for:", "Win-back status:", "Sent so far"):
        assert label not in text
    assert "Customer id: cus/42" in text


def test_the_profiles_crm_contact_id_is_the_recipient(renderer: TemplateRenderer) -> None:
    message = composer(renderer).compose(command(crm_contact_id="3101"), Profile(), NOW)

    assert message.to == "3101"


def test_rendering_again_adds_what_was_sent_so_far(renderer: TemplateRenderer) -> None:
    message = composer(renderer).compose(command(), Profile(), NOW)
    assert message.crm_task is not None
    assert message.crm_task.rerender is not None

    again = message.crm_task.rerender({"sent_so_far": ["email: we_miss_you (2026-04-20)"]})

    assert "Sent so far in this win-back:\n- email: we_miss_you (2026-04-20)\n" in again.text
    assert again.subject == message.content.subject


async def test_a_task_is_never_built_without_a_contact(renderer: TemplateRenderer) -> None:
    message = composer(renderer).compose(command(), Profile(), NOW)
    async with httpx.AsyncClient() as client:
        provider = HubSpotTaskProvider(client, access_token="t", clock=FrozenClock(NOW))

        with pytest.raises(PermanentSendError) as caught:
            provider.build_request(message)
        assert caught.value.error_code == "no_crm_contact"
        # no email either: refused before any call to HubSpot
        with pytest.raises(PermanentSendError, match="no CRM contact id and no email"):
            await provider.send(message)


def test_the_contact_cache_keeps_the_most_recently_used() -> None:
    cache = ContactCache(maxsize=2)
    cache.put("a", "1")
    cache.put("b", "2")
    assert cache.get("a") == "1"  # a is now the most recent

    cache.put("c", "3")

    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("1", None, "3")
    assert len(cache) == 2


def test_the_dispatch_contract_carries_the_crm_contact_id_and_leaves_it_optional() -> None:
    customer: dict[str, Any] = {
        "id": "cus_42",
        "email": None,
        "phone": None,
        "name": None,
        "locale": None,
        "timezone": None,
        "plan": None,
        "crm_owner": "77",
        "crm_contact_id": "3101",
    }
    data = {
        "idempotency_key": "case-9:d14",
        "case_id": "case-9",
        "step_id": 3,
        "step_key": "d14",
        "playbook": "default",
        "playbook_version": 1,
        "channel": "crm",
        "template": "crm_personal_outreach",
        "offer": None,
        "is_discount": False,
        "variant": None,
        "valid_until": None,
        "customer": customer,
        "reason": None,
        "features": [],
        "feature_description": None,
        "requested_at": "2026-05-04T09:30:00+00:00",
    }
    assert DispatchCommand.decode(data).customer.crm_contact_id == "3101"
    del customer["crm_contact_id"]
    assert DispatchCommand.decode(data).customer.crm_contact_id is None
