"""Signature checks for provider webhooks, our own webhook channel and unsubscribe tokens.

Every ``verify_*`` function returns ``None`` on success and raises ``SignatureError`` (or its
``StaleSignatureError`` subclass) with a short ``reason`` otherwise, so the HTTP layer answers
401 and counts the reason. Secrets are compared in constant time.

- SendGrid signed event webhook: ECDSA P-256 with SHA-256 over ``timestamp + raw_body``;
  headers ``X-Twilio-Email-Event-Webhook-Signature`` (base64 DER signature) and
  ``X-Twilio-Email-Event-Webhook-Timestamp`` (unix seconds); the public key from the account
  settings, base64 DER (SubjectPublicKeyInfo) or PEM. SendGrid documents no freshness window,
  so we apply one (default 5 minutes either side) against replays.
- Twilio: ``X-Twilio-Signature`` = base64 HMAC-SHA1 with the auth token over the full request
  URL followed by every POST parameter name and value, sorted by name.
- Postmark signs nothing. Its webhooks are authenticated with HTTP Basic credentials put in the
  webhook URL (``https://user:pass@host/v1/webhooks/postmark``): ``verify_basic_auth`` is what
  we use. ``verify_shared_secret`` also exists for webhooks configured with a custom header.
- Our generic webhook channel: ``X-Winback-Signature: t=<unix>,v1=<hex>`` with HMAC-SHA256
  over ``"{t}.{raw_body}"`` (the Stripe scheme), so receivers can reuse familiar code.
- Unsubscribe tokens: HMAC-SHA256 over (customer id, channel, issued-at) with a server key;
  URL-safe; verified without any database lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from shared.clock import Clock

SENDGRID_SIGNATURE_HEADER: Final = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER: Final = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE_HEADER: Final = "X-Twilio-Signature"
WINBACK_SIGNATURE_HEADER: Final = "X-Winback-Signature"
DEFAULT_TOLERANCE: Final = timedelta(minutes=5)
MIN_KEY_BYTES: Final = 32


class SignatureError(Exception):
    """A webhook or token failed verification. ``reason`` is short and safe to log or count."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StaleSignatureError(SignatureError):
    """The signature is valid but its timestamp is outside the tolerance (a possible replay)."""


def _check_fresh(timestamp: int, now: datetime, tolerance: timedelta) -> None:
    age = now.timestamp() - timestamp
    if abs(age) > tolerance.total_seconds():
        raise StaleSignatureError(f"timestamp is {age:.0f} s away from now")


def _parse_unix(value: str | None) -> int:
    if value is None or not re.fullmatch(r"\s*[0-9]{1,12}\s*", value):
        raise SignatureError("missing or malformed timestamp")
    return int(value)


# --- SendGrid -------------------------------------------------------------------------


def load_sendgrid_public_key(key: str | bytes) -> ec.EllipticCurvePublicKey:
    """Load the account's verification key: PEM, or base64 of the DER SubjectPublicKeyInfo."""
    raw = key.encode() if isinstance(key, str) else key
    try:
        if b"-----BEGIN" in raw:
            loaded = load_pem_public_key(raw)
        else:
            loaded = load_der_public_key(base64.b64decode(b"".join(raw.split()), validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"not a public key: {exc}") from exc
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(
        loaded.curve, ec.SECP256R1
    ):
        raise ValueError("the SendGrid verification key must be an ECDSA P-256 public key")
    return loaded


class SendGridWebhookVerifier:
    """Verifies SendGrid's signed event webhook requests."""

    def __init__(
        self, public_key: str | bytes, clock: Clock, *, tolerance: timedelta = DEFAULT_TOLERANCE
    ) -> None:
        self._key = load_sendgrid_public_key(public_key)
        self._clock = clock
        self._tolerance = tolerance

    def verify(self, raw_body: bytes, signature: str | None, timestamp: str | None) -> None:
        """Check the two headers against the raw request body (not re-serialised JSON)."""
        ts = _parse_unix(timestamp)
        if not signature:
            raise SignatureError("missing signature")
        try:
            der = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError("signature is not base64") from None
        assert timestamp is not None  # _parse_unix accepted it
        try:
            self._key.verify(der, timestamp.encode() + raw_body, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureError("signature does not match") from None
        except ValueError:  # not a DER ECDSA signature
            raise SignatureError("signature is malformed") from None
        _check_fresh(ts, self._clock.now(), self._tolerance)


# --- Twilio ---------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's signature for a POST to ``url`` with form ``params`` (name/value pairs).

    Names are sorted; a name sent several times contributes each value, values sorted.
    """
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, and with the default port added or removed (proxies differ)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    variants = [url]
    host = parts.hostname or ""
    if default is None or not host:
        return variants
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    if parts.port == default:
        variants.append(urlunsplit(parts._replace(netloc=prefix + host)))
    elif parts.port is None:
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return variants


class TwilioRequestValidator:
    """Verifies ``X-Twilio-Signature`` on status callbacks and other Twilio webhooks."""

    def __init__(self, auth_token: str) -> None:
        if not auth_token:
            raise ValueError("TwilioRequestValidator needs the auth token")
        self._token = auth_token

    def verify(
        self,
        url: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]],
        signature: str | None,
    ) -> None:
        """``url`` is the full URL Twilio requested (scheme, host, path and query)."""
        if not signature:
            raise SignatureError("missing signature")
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        given = signature.strip().encode()
        for candidate in _url_variants(url):
            expected = twilio_signature(self._token, candidate, pairs).encode()
            if hmac.compare_digest(expected, given):
                return
        raise SignatureError("signature does not match")


# --- Postmark -------------------------------------------------------------------------


def verify_basic_auth(authorization: str | None, username: str, password: str) -> None:
    """Check an ``Authorization: Basic …`` header against the webhook's credentials."""
    if not authorization:
        raise SignatureError("missing credentials")
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise SignatureError("not basic credentials")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("credentials are not base64") from None
    user, sep, secret = decoded.partition(b":")
    user_ok = hmac.compare_digest(user, username.encode())
    secret_ok = hmac.compare_digest(secret, password.encode())
    if not (sep and user_ok and secret_ok):
        raise SignatureError("wrong credentials")


def verify_shared_secret(header_value: str | None, secret: str) -> None:
    """Check a custom header carrying a shared secret (for webhooks set up that way)."""
    if not header_value:
        raise SignatureError("missing secret")
    if not hmac.compare_digest(header_value.strip().encode(), secret.encode()):
        raise SignatureError("wrong secret")


# --- our own webhook channel ------------------------------------------------------------


def sign_winback_webhook(secret: bytes, raw_body: bytes, timestamp: int) -> str:
    """The ``X-Winback-Signature`` value for ``raw_body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + raw_body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_winback_webhook(
    secret: bytes,
    raw_body: bytes,
    header: str | None,
    now: datetime,
    *,
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> None:
    """Receiver side of ``sign_winback_webhook``: accepts if any ``v1`` matches."""
    if not header:
        raise SignatureError("missing signature")
    timestamp: str | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            candidates.append(value)
    ts = _parse_unix(timestamp)
    if not candidates:
        raise SignatureError("no v1 signature")
    expected = sign_winback_webhook(secret, raw_body, ts).rpartition("v1=")[2].encode()
    if not any(hmac.compare_digest(expected, c.encode()) for c in candidates):
        raise SignatureError("signature does not match")
    _check_fresh(ts, now, tolerance)


# --- unsubscribe tokens ----------------------------------------------------------------

_TOKEN_VERSION: Final = "1"
_TOKEN_DOMAIN: Final = b"winback/unsubscribe/v1\x00"
_CHANNEL: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise SignatureError("token is malformed")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError("token is malformed") from None
    if _b64e(data) != text:  # non-canonical encoding: one token, one spelling
        raise SignatureError("token is malformed")
    return data


@dataclass(frozen=True, slots=True)
class UnsubscribeClaim:
    """What a valid unsubscribe token says: who, on which channel, issued when."""

    customer_id: str
    channel: str
    issued_at: datetime


class UnsubscribeTokens:
    """Issues and verifies unsubscribe tokens: ``1.<payload>.<mac>``, all URL-safe.

    The payload is the customer id, channel and issued-at (unix seconds), base64url encoded —
    readable, not secret (the customer id is an internal id, never an address). The MAC is
    HMAC-SHA256 with the server key over a domain tag and the payload. ``keys[0]`` signs; every
    key in ``keys`` verifies, so a key can be rotated without breaking links already sent.
    With ``max_age`` set, older tokens are refused (CAN-SPAM needs links to work for at least
    30 days after sending; leave it ``None`` to honour every link ever sent).
    """

    def __init__(
        self, keys: Sequence[bytes], clock: Clock, *, max_age: timedelta | None = None
    ) -> None:
        if not keys:
            raise ValueError("UnsubscribeTokens needs at least one key")
        if any(len(k) < MIN_KEY_BYTES for k in keys):
            raise ValueError(f"unsubscribe keys must be at least {MIN_KEY_BYTES} bytes")
        if max_age is not None and max_age < timedelta(days=30):
            raise ValueError("unsubscribe links must keep working for at least 30 days")
        self._keys = tuple(keys)
        self._clock = clock
        self._max_age = max_age

    def issue(self, customer_id: str, channel: str) -> str:
        """A token for ``customer_id`` on ``channel`` (e.g. ``email``), issued now."""
        if not customer_id or "\n" in customer_id or "\x00" in customer_id:
            raise ValueError("customer id must be non-empty, without newlines or NULs")
        if not _CHANNEL.fullmatch(channel):
            raise ValueError(f"channel {channel!r} must match {_CHANNEL.pattern}")
        issued = int(self._clock.now().timestamp())
        payload = f"{customer_id}\n{channel}\n{issued}".encode()
        return f"{_TOKEN_VERSION}.{_b64e(payload)}.{_b64e(self._mac(self._keys[0], payload))}"

    def verify(self, token: str) -> UnsubscribeClaim:
        """The claim in ``token``; raises ``SignatureError`` if forged, altered or expired."""
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != _TOKEN_VERSION:
            raise SignatureError("token is malformed")
        payload, mac = _b64d(parts[1]), _b64d(parts[2])
        if not any(hmac.compare_digest(self._mac(k, payload), mac) for k in self._keys):
            raise SignatureError("token signature does not match")
        try:
            customer_id, channel, issued_text = payload.decode().split("\n")
            issued = datetime.fromtimestamp(int(issued_text), UTC)
        except (UnicodeDecodeError, ValueError, OverflowError, OSError):
            raise SignatureError("token payload is malformed") from None
        if self._max_age is not None and self._clock.now() - issued > self._max_age:
            raise StaleSignatureError("token has expired")
        return UnsubscribeClaim(customer_id=customer_id, channel=channel, issued_at=issued)

    @staticmethod
    def _mac(key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, _TOKEN_DOMAIN + payload, hashlib.sha256).digest()
