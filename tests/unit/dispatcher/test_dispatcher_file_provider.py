"""The embedded file provider: every message a file, an email a complete .eml, idempotent."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.dispatcher.errors import PermanentSendError
from services.dispatcher.providers import CrmTaskDetails, OutboundMessage
from services.dispatcher.providers.file import FileProvider, file_stem
from services.dispatcher.rendering import Channel, RenderedMessage
from shared.clock import FrozenClock

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
EMAIL = RenderedMessage(
    "special_offer", Channel.EMAIL, "fi", "Tarjous sinulle", "Hei Aino ✓", "<p>Hei Aino ✓</p>"
)


def email_message(key: str = "case-1:d7", to: str = "aino@example.com") -> OutboundMessage:
    return OutboundMessage(
        key,
        Channel.EMAIL,
        to,
        EMAIL,
        tags={"customer_id": "cus_1", "case_id": "case-1"},
        unsubscribe_url="https://winback.example.com/u/1.abc.def",
        unsubscribe_mailto="unsubscribe@acme.example",
    )


async def test_an_email_becomes_an_eml_with_every_header(tmp_path: Path) -> None:
    provider = FileProvider(
        tmp_path,
        Channel.EMAIL,
        from_address="hello@acme.example",
        from_name="Acme",
        clock=FrozenClock(NOW),
    )
    result = await provider.send(email_message())
    path = provider.path_for("case-1:d7")
    assert path.parent == tmp_path / "email"
    assert path.suffix == ".eml"
    assert result.provider_message_id == path.stem
    mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert mail["From"] == "Acme <hello@acme.example>"
    assert mail["To"] == "aino@example.com"
    assert mail["Subject"] == "Tarjous sinulle"
    assert mail["Date"] == "Mon, 04 May 2026 12:00:00 +0000"
    assert mail["Message-ID"] == f"<{path.stem}@acme.example>"
    assert mail["List-Unsubscribe"] == (
        "<https://winback.example.com/u/1.abc.def>, <mailto:unsubscribe@acme.example>"
    )
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["X-Winback-Idempotency-Key"] == "case-1:d7"
    assert mail["X-Winback-Customer-Id"] == "cus_1"
    assert mail.get_content_type() == "multipart/alternative"
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().strip() == "Hei Aino ✓"
    assert html.get_content().strip() == "<p>Hei Aino ✓</p>"


async def test_a_second_send_with_the_same_key_writes_nothing(tmp_path: Path) -> None:
    clock = FrozenClock(NOW)
    provider = FileProvider(tmp_path, Channel.EMAIL, clock=clock)
    first = await provider.send(email_message())
    written = provider.path_for("case-1:d7").read_bytes()
    clock.advance(timedelta(hours=1))
    again = await provider.send(email_message())
    assert again == first
    assert provider.path_for("case-1:d7").read_bytes() == written
    assert len(list((tmp_path / "email").iterdir())) == 1


async def test_sms_and_crm_tasks_become_json(tmp_path: Path) -> None:
    sms = FileProvider(tmp_path, Channel.SMS, from_address="+15005550006")
    text = RenderedMessage("we_miss_you", Channel.SMS, "en", None, "Hi Aino", None)
    await sms.send(OutboundMessage("case-1:s1", Channel.SMS, "+358401234567", text))
    document = json.loads(sms.path_for("case-1:s1").read_text())
    assert (document["to"], document["body"], document["from"]) == (
        "+358401234567",
        "Hi Aino",
        "+15005550006",
    )

    crm = FileProvider(tmp_path, Channel.CRM)
    task = RenderedMessage("crm_personal_outreach", Channel.CRM, "en", "Call Aino", "Call", None)
    details = CrmTaskDetails(owner_id="o-1", due_at=NOW)
    await crm.send(OutboundMessage("case-1:c1", Channel.CRM, "", task, crm_task=details))
    document = json.loads(crm.path_for("case-1:c1").read_text())
    assert (document["owner_id"], document["subject"], document["priority"]) == (
        "o-1",
        "Call Aino",
        "HIGH",
    )


async def test_an_invalid_address_is_refused_like_a_provider_would(tmp_path: Path) -> None:
    provider = FileProvider(tmp_path, Channel.EMAIL)
    with pytest.raises(PermanentSendError) as info:
        await provider.send(email_message(to="not-an-address"))
    assert info.value.suppress
    assert not (tmp_path / "email").exists()


def test_file_names_are_safe_and_distinct() -> None:
    assert file_stem("case/1:../../etc") != file_stem("case_1_.._.._etc")
    assert "/" not in file_stem("a/b")
    assert ":" not in file_stem("a:b")
