"""Why a send did not happen: a small hierarchy the retry, failover and outcome code branch on.

``SendError``
    ``TransientSendError`` — worth trying again later (timeouts, connection errors, 5xx, 429).
        ``CircuitOpenError`` — we did not even try: the provider's circuit is open.
    ``PermanentSendError`` — trying again cannot help (invalid address, unsubscribed recipient,
    validation errors). ``suppress`` says whether the address itself should be suppressed.
        ``ProviderConfigurationError`` — the provider refused *us* (bad credentials, account
        suspended, sender not verified). Permanent for that provider, but not the message's
        fault, so failover does try the secondary provider with it.
        ``TemplateError`` — the message could not be rendered (missing template or field).
    ``DeliveryFailedError`` — the final answer of a failover sender: every provider was tried
    (or skipped) and none accepted the message; carries each attempt's reason.

Every error carries a human-readable ``reason`` safe to put in a ``message.failed`` event: no
recipient address, no message body, no credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SendError(Exception):
    """A message was not accepted by a provider."""

    def __init__(
        self,
        reason: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.provider = provider
        self.status_code = status_code
        self.error_code = error_code

    @property
    def detail(self) -> str:
        """The reason with the HTTP status and provider error code, without the provider."""
        parts = [self.reason]
        if self.status_code is not None:
            parts.append(f"(HTTP {self.status_code})")
        if self.error_code is not None:
            parts.append(f"(code {self.error_code})")
        return " ".join(parts)

    def __str__(self) -> str:
        return self.detail if self.provider is None else f"[{self.provider}] {self.detail}"


class TransientSendError(SendError):
    """The send failed for a reason that may go away: retry with backoff, or fail over.

    ``retry_after`` is the provider's own hint in seconds (``Retry-After`` or a rate-limit header),
    ``None`` when it gave none. ``ambiguous`` is true when the request may have reached the
    provider before the failure (read timeout, connection dropped after sending): a retry to a
    provider without an idempotency mechanism could then deliver twice.
    """

    def __init__(
        self,
        reason: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(reason, provider=provider, status_code=status_code, error_code=error_code)
        self.retry_after = retry_after
        self.ambiguous = ambiguous


class CircuitOpenError(TransientSendError):
    """The provider's circuit breaker is open: the call was not attempted."""


class PermanentSendError(SendError):
    """The send can never succeed as it stands: do not retry; ``suppress`` the address if set.

    ``unsubscribed`` says the recipient opted out at the provider (Twilio 21610: they replied
    STOP): besides the suppression, the customer counts as unsubscribed from the channel.

    ``provider_fault`` is false here: the message or the recipient is the problem, so another
    provider would refuse it too and failover is pointless.
    """

    provider_fault: bool = False

    def __init__(
        self,
        reason: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        error_code: str | None = None,
        suppress: bool = False,
        unsubscribed: bool = False,
    ) -> None:
        super().__init__(reason, provider=provider, status_code=status_code, error_code=error_code)
        self.suppress = suppress or unsubscribed
        self.unsubscribed = unsubscribed


class UnknownChannelError(PermanentSendError):
    """A delivery names a channel the channel registry (``shared.channels``) does not know: it
    fails for good, naming the channel, instead of going out some other way."""

    def __init__(self, channel: object) -> None:
        super().__init__(f"unknown channel {channel!r}")
        self.channel = channel


class ProviderConfigurationError(PermanentSendError):
    """The provider rejected our account or credentials (401/403, sender not verified, …).

    Retrying the same provider is pointless, but the message is fine: a failover sender moves
    on to the secondary provider, and the failure counts against the provider's circuit.
    """

    provider_fault = True


class TemplateError(PermanentSendError):
    """A message could not be rendered: no such template, or a field it needs is missing/blank."""

    def __init__(
        self,
        reason: str,
        *,
        template: str | None = None,
        channel: str | None = None,
        missing_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(reason, error_code="template_error")
        self.template = template
        self.channel = channel
        self.missing_fields = tuple(missing_fields)


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """One provider call (or skipped call) that did not succeed."""

    provider: str
    attempt: int
    error: SendError

    @property
    def reason(self) -> str:
        return f"{self.provider} attempt {self.attempt}: {self.error.detail}"


class DeliveryFailedError(SendError):
    """No provider accepted the message. ``attempts`` lists every failed attempt in order.

    ``permanent`` is true when the last failure was a ``PermanentSendError`` about the message or
    recipient (no later retry can help); otherwise the failure was transient everywhere and the
    caller may reschedule, no sooner than ``retry_after`` seconds if that is set. ``suppress``
    is true when any provider said the address should be suppressed, ``unsubscribed`` when one
    said the recipient opted out there.
    """

    def __init__(self, attempts: Sequence[FailedAttempt]) -> None:
        if not attempts:
            raise ValueError("DeliveryFailedError needs at least one failed attempt")
        self.attempts = tuple(attempts)
        last = self.attempts[-1].error
        super().__init__("; ".join(a.reason for a in self.attempts))
        self.permanent = isinstance(last, PermanentSendError) and not last.provider_fault
        self.suppress = any(
            isinstance(a.error, PermanentSendError) and a.error.suppress for a in self.attempts
        )
        self.unsubscribed = any(
            isinstance(a.error, PermanentSendError) and a.error.unsubscribed for a in self.attempts
        )
        hints = [
            a.error.retry_after
            for a in self.attempts
            if isinstance(a.error, TransientSendError) and a.error.retry_after is not None
        ]
        self.retry_after: float | None = min(hints) if hints and not self.permanent else None

    @property
    def last_error(self) -> SendError:
        return self.attempts[-1].error
