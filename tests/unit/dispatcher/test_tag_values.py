"""A tag value with a control or line-break character never reaches a header: the composer
leaves it out, and OutboundMessage refuses one given directly (a customer id with a CR would
otherwise end the header block of the .eml the file provider writes)."""

from __future__ import annotations

import pytest

from services.dispatcher.compose import _tags
from services.dispatcher.providers.base import OutboundMessage
from services.dispatcher.rendering import Channel, RenderedMessage

CONTENT = RenderedMessage("we_miss_you", Channel.EMAIL, "en", "Hi", "Body", None)


@pytest.mark.parametrize("bad", ["cus\r1", "cus\n1", "cus\x851", "cus\u20281", "cus\x001"])
def test_the_composer_leaves_such_a_tag_out(bad: str) -> None:
    tags = _tags({"customer": {"id": bad}, "case_id": "case-1", "template": "we_miss_you"})
    assert tags == {"case_id": "case-1", "template": "we_miss_you"}


@pytest.mark.parametrize("bad", ["\r", "a\nb", "\u2029"])
def test_an_outbound_message_refuses_one(bad: str) -> None:
    with pytest.raises(ValueError, match="control or line-break"):
        OutboundMessage("k1", Channel.EMAIL, "a@example.com", CONTENT, tags={"case_id": bad})


def test_printable_tags_go_through() -> None:
    message = OutboundMessage(
        "k1", Channel.EMAIL, "a@example.com", CONTENT, tags={"case_id": "Äiti ü-1"}
    )
    assert message.tags == {"case_id": "Äiti ü-1"}
