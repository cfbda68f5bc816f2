"""Who sent a billing webhook: each provider's own scheme, checked by its official library.

- Stripe: ``Stripe-Signature: t=…,v1=…`` — ``stripe.WebhookSignature.verify_header`` (HMAC-SHA256
  of ``"{t}.{body}"``, any ``v1`` matching in constant time, ``t`` within the tolerance), tried
  with each configured endpoint secret (rotation).
- Paddle Billing: ``Paddle-Signature: ts=…;h1=…`` — ``paddle_billing.Notifications.Verifier``
  (HMAC-SHA256 of ``"{ts}:{body}"``, several secrets, ``ts`` within the tolerance).
- Chargebee: no signature; HTTP Basic credentials on the URL, compared in constant time.

Each raises ``SignatureError`` with a short reason and ``kind`` (missing / invalid / stale),
never echoing the secret or the signature.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import stripe
from paddle_billing.Logger import get_logger  # type: ignore[import-untyped]
from paddle_billing.Notifications import Secret, Verifier  # type: ignore[import-untyped]
from paddle_billing.Notifications.PaddleSignature import (  # type: ignore[import-untyped]
    PaddleSignature,
)

STRIPE_HEADER = "Stripe-Signature"
PADDLE_HEADER = "Paddle-Signature"

# The SDK's verifier logs three INFO lines per request; ours says what matters
get_logger().setLevel(logging.WARNING)


class SignatureError(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def verify_stripe(body: bytes, header: str | None, secrets: Sequence[str], tolerance: int) -> None:
    """Accept if the header verifies with any of ``secrets`` within ``tolerance`` seconds."""
    if not header:
        raise SignatureError("missing", f"no {STRIPE_HEADER} header")
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("invalid", "the body is not UTF-8") from None
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
        except stripe.SignatureVerificationError as exc:
            # the library checks the signature before the time: a stale one matched a secret
            stale = stale or "tolerance" in str(exc)
            continue
        return
    if stale:
        raise SignatureError("stale", f"the {STRIPE_HEADER} timestamp is too old")
    raise SignatureError("invalid", f"no {STRIPE_HEADER} signature matches")


@dataclass(frozen=True)
class _Request:
    """What the Paddle SDK's verifier reads: the raw body and the headers."""

    body: bytes
    headers: dict[str, str]


def verify_paddle(body: bytes, header: str | None, secrets: Sequence[str], tolerance: int) -> None:
    """Accept if the header verifies with any of ``secrets`` and its ``ts`` is within
    ``tolerance`` seconds of now (either way)."""
    if not header:
        raise SignatureError("missing", f"no {PADDLE_HEADER} header")
    try:
        body.decode("utf-8")
        ts, hashes = PaddleSignature.parse(header)
    except (UnicodeDecodeError, ValueError, TypeError):
        raise SignatureError("invalid", f"the {PADDLE_HEADER} header is malformed") from None
    if ts <= 0 or not hashes.get("h1"):
        raise SignatureError("invalid", f"the {PADDLE_HEADER} header is malformed")
    verifier = Verifier(maximum_variance=tolerance)
    request = _Request(body, {PADDLE_HEADER: header})
    try:
        # the SDK reads TEST_MODE from the environment to skip the time check: do it ourselves
        # too, so no environment variable can turn it off
        if abs(time.time() - ts) > tolerance:
            raise SignatureError("stale", f"the {PADDLE_HEADER} timestamp is out of tolerance")
        ok = verifier.verify(request, [Secret(s) for s in secrets])
    except ConnectionRefusedError:
        ok = False
    except (ValueError, TypeError):
        raise SignatureError("invalid", f"the {PADDLE_HEADER} header is malformed") from None
    if not ok:
        raise SignatureError("invalid", f"no {PADDLE_HEADER} signature matches")


def verify_basic(authorization: str | None, username: str, password: str) -> None:
    """Check ``Authorization: Basic …`` against the webhook's credentials (constant time)."""
    if not authorization:
        raise SignatureError("missing", "no credentials")
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise SignatureError("invalid", "not HTTP Basic credentials")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("invalid", "the credentials are not base64") from None
    user, sep, secret = decoded.partition(b":")
    user_ok = hmac.compare_digest(user, username.encode())
    secret_ok = hmac.compare_digest(secret, password.encode())
    if not (sep and user_ok and secret_ok):
        raise SignatureError("invalid", "wrong credentials")
