"""How many SMS segments a text takes (3GPP TS 23.038): pure.

A text made only of the GSM 7-bit default alphabet (and its extension table, whose characters
take two septets each) is sent as GSM-7: 160 septets in one message, 153 per segment when it
has to be split (the rest is the concatenation header). Anything else (an emoji, "ő", "€" is
fine: it is in the extension table) makes the whole text UCS-2: 70 UTF-16 code units in one
message, 67 per segment. Carriers bill per segment; previews warn above a limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""The GSM 7-bit default alphabet (the escape to the extension table left out)."""
GSM7_EXTENSION: Final = frozenset("^{}\\[~]|€\f")
"""The extension table: each of these takes two septets (escape + character)."""


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: Literal["GSM-7", "UCS-2"]
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2) the text takes."""
    segments: int
    """Messages the carrier sends (and bills); 0 for an empty text."""


def segments(text: str) -> Segments:
    """The encoding and segment count of ``text`` as an SMS."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        units = sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
        single, part = 160, 153
        encoding: Literal["GSM-7", "UCS-2"] = "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = 70, 67
        encoding = "UCS-2"
    if units == 0:
        count = 0
    elif units <= single:
        count = 1
    else:
        count = -(-units // part)
    return Segments(encoding, units, count)
