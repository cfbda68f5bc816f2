"""The errors winback raises on purpose. Each docstring says what the error means."""

from __future__ import annotations


class WinbackError(Exception):
    """Base of every error winback raises on purpose."""


class ConfigError(WinbackError):
    """The configuration cannot be used; the message names the source, the field and why."""


class InvalidEvent(WinbackError):
    """An incoming event cannot be accepted. ``code`` says which kind of poison it is.

    Codes: ``malformed_json``, ``too_deep`` (JSON nested deeper than the limit),
    ``missing_attribute``, ``invalid_attribute``, ``invalid_header`` (a Kafka header name that
    is not UTF-8), ``unknown_type``, ``invalid_payload``, ``oversize``, ``future_time``,
    ``decode_error`` (any other exception while decoding; the reason names its type),
    ``unreadable_record`` (bytes the Kafka transport cannot parse as a record at all),
    ``handler_error``.

    ``reason`` and ``field`` end up in Kafka headers and problem+json bodies: they are cut to
    ``MAX_REASON_CHARS`` / ``MAX_FIELD_CHARS`` and made encodable as UTF-8 here, whatever the
    input that caused them.
    """

    MAX_REASON_CHARS = 500
    MAX_FIELD_CHARS = 200

    def __init__(self, code: str, reason: str, field: str | None = None) -> None:
        reason = _safe(reason, self.MAX_REASON_CHARS)
        field = _safe(field, self.MAX_FIELD_CHARS) if field is not None else None
        super().__init__(f"{code}: {reason}" + (f" (field {field})" if field else ""))
        self.code = code
        self.reason = reason
        self.field = field


def _safe(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with anything UTF-8 cannot encode (a lone
    surrogate) escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TransientError(WinbackError):
    """A failure worth retrying: the same input may succeed later."""
