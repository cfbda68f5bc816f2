"""The embedded file provider: every message a file, an email a complete .eml, idempotent."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dispatcher.errors import PermanentSendError, ProviderConfigurationError
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


# --- the .eml as mail clients read it ---------------------------------------------------------


def parsed(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


@pytest.mark.parametrize(
    ("name", "subject", "text"),
    [
        ("Äcme Oy", "Tarjous sinulle, Äino — 20 % alennus", "Hei Äino ✓\n\nTervetuloa takaisin"),
        ("Søren & Co", "Vi savner dig, Søren 💌", "Hej Søren,\n"),
        ("Kedai Kopi", "Kami rindu anda, Siti", "Hai Siti,\nterima kasih"),
        (
            "東京 株式会社",
            "お久しぶりです — 特別なご案内があります。今すぐご確認ください、限定のオファーです",
            "こんにちは",
        ),
        ('Acme "the" company, Inc.', "Plain ASCII: 50% off (today)", "Hi,\n"),
    ],
)
async def test_non_ascii_names_and_subjects_parse_back_exactly(
    tmp_path: Path, name: str, subject: str, text: str
) -> None:
    provider = FileProvider(
        tmp_path, Channel.EMAIL, from_address="hello@acme.example", from_name=name
    )
    content = RenderedMessage("we_miss_you", Channel.EMAIL, "fi", subject, text, f"<p>{text}</p>")
    message = OutboundMessage(
        "case-ü:d0",
        Channel.EMAIL,
        "aino.virtanen+tag@example.com",
        content,
        tags={"customer_id": "cus_1"},
        unsubscribe_url="https://winback.example.com/u/1.abc.def",
    )
    await provider.send(message)
    raw = provider.path_for("case-ü:d0").read_bytes()
    mail = parsed(raw)
    assert mail["From"].addresses[0].display_name == name
    assert mail["From"].addresses[0].addr_spec == "hello@acme.example"
    assert mail["To"] == "aino.virtanen+tag@example.com"
    assert mail["Subject"] == subject
    assert mail["X-Winback-Idempotency-Key"] == "case-ü:d0"  # written by the stdlib path
    assert mail["List-Unsubscribe"] == "<https://winback.example.com/u/1.abc.def>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["Content-Language"] == "fi"
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().replace("\r\n", "\n").rstrip("\n") == text.rstrip("\n")
    assert html.get_content().replace("\r\n", "\n").rstrip("\n") == f"<p>{text}</p>"
    assert not mail.defects
    assert all(not part.defects for part in mail.walk())
    assert raw.isascii() or b"Content-Transfer-Encoding: 8bit" in raw  # raw UTF-8 only in bodies
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    for word in re.findall(rb"=\?[^?]+\?[bBqQ]\?[^?]*\?=", head):
        assert len(word) <= 75  # RFC 2047


async def test_the_direct_eml_is_the_stdlib_message_less_the_work(tmp_path: Path) -> None:
    """The same headers and parts as ``EmailMessage`` builds (the general path)."""
    provider = FileProvider(
        tmp_path, Channel.EMAIL, from_address="hello@acme.example", from_name="Äcme, Oy"
    )
    message = email_message()
    direct = parsed(provider.render(message, NOW))
    general = parsed(provider.email(message, NOW).as_bytes())
    assert headers_of(direct) == headers_of(general)
    assert parts_of(direct) == parts_of(general)


def headers_of(mail: email.message.EmailMessage) -> dict[str, str]:
    return {k: str(v) for k, v in mail.items() if k != "Content-Type"} | {
        "Content-Type": mail.get_content_type()
    }


def parts_of(mail: email.message.EmailMessage) -> list[tuple[str, str, str | None]]:
    return [
        (part.get_content_type(), part.get_content(), part.get("Content-Transfer-Encoding"))
        for part in mail.walk()
        if not part.is_multipart()
    ]


# Header values never hold a line boundary of str.splitlines (NEL, LS, PS, VT, FF, FS-RS): the
# renderer folds them away with the rest of the whitespace; with one, the stdlib's parser ends
# the header block early on either file and quotes the random MIME boundary as the body.
LINE_BOUNDARIES = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
header_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters=LINE_BOUNDARIES),
    max_size=120,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=header_text.filter(lambda s: s.strip()),
    name=st.one_of(st.none(), header_text.filter(lambda s: s.strip())),
    text=st.text(max_size=400),
    html=st.one_of(st.none(), st.text(max_size=400)),
    # a tag holds no control or line-break character (OutboundMessage refuses one; the
    # composer leaves such a value out)
    tag=st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
    ).filter(lambda s: "@" not in s and not s.startswith("+") and s.isprintable()),
)
def test_whatever_is_written_parses_as_the_stdlib_message(
    subject: str, name: str | None, text: str, html: str | None, tag: str
) -> None:
    """Any subject, sender name, bodies and tag: the direct path either declines (and the
    stdlib writes the file) or writes what parses to the stdlib's message."""
    provider = FileProvider(
        Path("/nonexistent"), Channel.EMAIL, from_address="hello@acme.example", from_name=name
    )
    content = RenderedMessage("we_miss_you", Channel.EMAIL, "en", subject, text, html)
    message = OutboundMessage(
        "case-1:d0",
        Channel.EMAIL,
        "a@example.com",
        content,
        tags={"case_id": tag},
        unsubscribe_url="https://winback.example.com/u/1.abc.def",
    )
    try:
        general = provider.email(message, NOW).as_bytes()
    except (PermanentSendError, ValueError, UnicodeError):
        return  # the stdlib cannot write this message: nothing to compare with
    written = parsed(provider.render(message, NOW))
    reference = parsed(general)
    assert headers_of(written) == headers_of(reference)
    assert [p[:2] for p in parts_of(written)] == [p[:2] for p in parts_of(reference)]


async def test_an_address_that_is_not_a_plain_dot_atom_takes_the_stdlib_path(
    tmp_path: Path,
) -> None:
    provider = FileProvider(tmp_path, Channel.EMAIL, from_address="hello@acme.example")
    await provider.send(email_message(to="o'brien.x@example.com"))
    await provider.send(email_message(key="case-2:d0", to="aino@exämple.com"))
    assert parsed(provider.path_for("case-1:d7").read_bytes())["To"] == "o'brien.x@example.com"
    assert parsed(provider.path_for("case-2:d0").read_bytes())["To"] == "aino@exämple.com"


# --- writing ------------------------------------------------------------------------------------


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_sends_made_together_share_one_thread_hand_off(tmp_path: Path) -> None:
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    provider = FileProvider(tmp_path, Channel.EMAIL, clock=FrozenClock(NOW))
    keys = [f"case-{i}:d0" for i in range(200)]
    results = await asyncio.gather(*(provider.send(email_message(key)) for key in keys))
    assert [r.provider_message_id for r in results] == [provider.path_for(k).stem for k in keys]
    assert sorted(p.name for p in (tmp_path / "email").iterdir()) == sorted(
        provider.path_for(k).name for k in keys
    )  # every file, no temporary one left
    assert executor.submitted <= 2


async def test_the_same_key_twice_in_one_batch_is_one_file(tmp_path: Path) -> None:
    provider = FileProvider(tmp_path, Channel.EMAIL, clock=FrozenClock(NOW))
    first, second = await asyncio.gather(
        provider.send(email_message()), provider.send(email_message())
    )
    assert first == second
    assert [p.name for p in (tmp_path / "email").iterdir()] == [provider.path_for("case-1:d7").name]


async def test_a_folder_removed_while_running_is_made_again(tmp_path: Path) -> None:
    provider = FileProvider(tmp_path, Channel.EMAIL, clock=FrozenClock(NOW))
    await provider.send(email_message())
    shutil.rmtree(tmp_path / "email")
    await provider.send(email_message("case-2:d0"))
    assert provider.path_for("case-2:d0").is_file()


async def test_a_folder_that_cannot_be_made_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "email").write_text("a file where the folder should be")
    provider = FileProvider(tmp_path, Channel.EMAIL, clock=FrozenClock(NOW))
    with pytest.raises(ProviderConfigurationError, match="cannot write the message file"):
        await provider.send(email_message())
    assert (tmp_path / "email").read_text() == "a file where the folder should be"
