"""The errors winback raises on purpose. Each docstring says what the error means."""

from __future__ import annotations


class WinbackError(Exception):
    """Base of every error winback raises on purpose."""


class ConfigError(WinbackError):
    """The configuration cannot be used; the message names the source, the field and why."""


class InvalidEvent(WinbackError):
    """An incoming event cannot be accepted. ``code`` says which kind of poison it is.

    Codes: ``malformed_json``, ``missing_attribute``, ``invalid_attribute``, ``unknown_type``,
    ``invalid_payload``, ``oversize``, ``future_time``, ``handler_error``.
    """

    def __init__(self, code: str, reason: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {reason}" + (f" (field {field})" if field else ""))
        self.code = code
        self.reason = reason
        self.field = field


class TransientError(WinbackError):
    """A failure worth retrying: the same input may succeed later."""
