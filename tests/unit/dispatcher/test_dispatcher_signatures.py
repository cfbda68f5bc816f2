"""Webhook signatures and unsubscribe tokens, checked against independently computed vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.signatures import (
    SendGridWebhookVerifier,
    SignatureError,
    StaleSignatureError,
    TwilioRequestValidator,
    UnsubscribeTokens,
    sign_winback_webhook,
    twilio_signature,
    verify_basic_auth,
    verify_shared_secret,
    verify_winback_webhook,
)
from shared.clock import FrozenClock

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
KEY = b"k" * 32
OTHER_KEY = b"o" * 32

# --- SendGrid ----------------------------------------------------------------------------


class SendGridSigner:
    """Signs like SendGrid: ECDSA P-256/SHA-256 over timestamp + payload, base64 DER."""

    def __init__(self, curve: ec.EllipticCurve | None = None) -> None:
        self.private_key = ec.generate_private_key(curve or ec.SECP256R1())

    @property
    def public_key_b64_der(self) -> str:
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    @property
    def public_key_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(self, timestamp: str, payload: bytes) -> str:
        signature = self.private_key.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


@pytest.fixture(scope="module")
def signer() -> SendGridSigner:
    return SendGridSigner()


PAYLOAD = json.dumps(
    [{"email": "a@example.com", "event": "delivered", "sg_event_id": "e1", "timestamp": 1}]
).encode()


def test_sendgrid_signature_verifies_with_base64_der_and_pem_keys(signer: SendGridSigner) -> None:
    timestamp = str(int(NOW.timestamp()))
    signature = signer.sign(timestamp, PAYLOAD)

    for key in (signer.public_key_b64_der, signer.public_key_pem):
        verifier = SendGridWebhookVerifier(key, FrozenClock(NOW))
        verifier.verify(PAYLOAD, signature, timestamp)  # raises if it does not verify
        with pytest.raises(SignatureError):  # and the same key tells a changed payload apart
            verifier.verify(PAYLOAD.replace(b"delivered", b"bounce"), signature, timestamp)


def test_sendgrid_published_test_vector_verifies() -> None:
    # The key, signature, timestamp and payload SendGrid's own SDK tests use.
    key = (
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7"
        "yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA=="
    )
    signature = (
        "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWY"
        "NH2j/0="
    )
    payload = b'{"category":"example_payload","event":"test_event","message_id":"message_id"}'
    clock = FrozenClock(datetime.fromtimestamp(1588788367, UTC))
    verifier = SendGridWebhookVerifier(key, clock)

    verifier.verify(payload, signature, "1588788367")
    with pytest.raises(SignatureError):
        verifier.verify(payload + b"\n", signature, "1588788367")


@pytest.mark.parametrize(
    ("body", "timestamp_header"),
    [
        (PAYLOAD.replace(b"delivered", b"bounce"), None),  # tampered body
        (PAYLOAD, "+1"),  # tampered timestamp (signed one, sent another)
    ],
)
def test_sendgrid_tampering_is_rejected(
    signer: SendGridSigner, body: bytes, timestamp_header: str | None
) -> None:
    timestamp = str(int(NOW.timestamp()))
    signature = signer.sign(timestamp, PAYLOAD)
    sent_timestamp = str(int(timestamp) + 1) if timestamp_header else timestamp

    with pytest.raises(SignatureError, match="does not match"):
        SendGridWebhookVerifier(signer.public_key_b64_der, FrozenClock(NOW)).verify(
            body, signature, sent_timestamp
        )


@pytest.mark.parametrize("skew", [timedelta(minutes=6), timedelta(minutes=-6), timedelta(days=2)])
def test_sendgrid_stale_or_future_timestamp_is_rejected(
    signer: SendGridSigner, skew: timedelta
) -> None:
    signed_at = NOW - skew
    timestamp = str(int(signed_at.timestamp()))
    signature = signer.sign(timestamp, PAYLOAD)
    verifier = SendGridWebhookVerifier(signer.public_key_b64_der, FrozenClock(NOW))

    with pytest.raises(StaleSignatureError):
        verifier.verify(PAYLOAD, signature, timestamp)


def test_sendgrid_timestamp_inside_tolerance_is_accepted(signer: SendGridSigner) -> None:
    verifier = SendGridWebhookVerifier(signer.public_key_b64_der, FrozenClock(NOW))
    inside = str(int((NOW - timedelta(minutes=4)).timestamp()))
    verifier.verify(PAYLOAD, signer.sign(inside, PAYLOAD), inside)  # raises if refused
    outside = str(int((NOW - timedelta(minutes=6)).timestamp()))
    with pytest.raises(StaleSignatureError):
        verifier.verify(PAYLOAD, signer.sign(outside, PAYLOAD), outside)


def test_sendgrid_signature_from_another_key_is_rejected(signer: SendGridSigner) -> None:
    timestamp = str(int(NOW.timestamp()))
    forged = SendGridSigner().sign(timestamp, PAYLOAD)
    with pytest.raises(SignatureError, match="does not match"):
        SendGridWebhookVerifier(signer.public_key_b64_der, FrozenClock(NOW)).verify(
            PAYLOAD, forged, timestamp
        )


@pytest.mark.parametrize(
    ("signature", "timestamp", "reason"),
    [
        (None, "1777896000", "missing signature"),
        ("", "1777896000", "missing signature"),
        ("not base64!!", "1777896000", "not base64"),
        (base64.b64encode(b"junk").decode(), "1777896000", "does not match|malformed"),
        ("AAAA", None, "timestamp"),
        ("AAAA", "yesterday", "timestamp"),
    ],
)
def test_sendgrid_malformed_headers_are_rejected(
    signer: SendGridSigner, signature: str | None, timestamp: str | None, reason: str
) -> None:
    verifier = SendGridWebhookVerifier(signer.public_key_b64_der, FrozenClock(NOW))
    with pytest.raises(SignatureError, match=reason):
        verifier.verify(PAYLOAD, signature, timestamp)


def test_sendgrid_key_must_be_p256() -> None:
    with pytest.raises(ValueError, match="P-256"):
        SendGridWebhookVerifier(SendGridSigner(ec.SECP384R1()).public_key_b64_der, FrozenClock())
    rsa_der = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="P-256"):
        SendGridWebhookVerifier(base64.b64encode(rsa_der).decode(), FrozenClock())
    with pytest.raises(ValueError, match="not a public key"):
        SendGridWebhookVerifier("bm90IGEga2V5", FrozenClock())


# --- Twilio ------------------------------------------------------------------------------


def independent_twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented algorithm, written out again here: URL, then sorted name+value."""
    data = url
    for name in sorted(params):
        data += name + params[name]
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


def test_twilio_documented_example_vector() -> None:
    # Twilio's security documentation example: auth token "12345".
    expected = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert independent_twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS) == expected
    assert twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS.items()) == expected
    TwilioRequestValidator("12345").verify(TWILIO_URL, TWILIO_PARAMS, expected)


def test_twilio_status_callback_verifies_and_tampering_is_rejected() -> None:
    token = "f" * 32
    url = "https://winback.example.com/v1/webhooks/twilio"
    params = {"MessageSid": "SM123", "MessageStatus": "delivered", "ErrorCode": ""}
    signature = independent_twilio_signature(token, url, params)
    validator = TwilioRequestValidator(token)

    validator.verify(url, params, signature)
    with pytest.raises(SignatureError):
        validator.verify(url, params | {"MessageStatus": "failed"}, signature)
    with pytest.raises(SignatureError):
        validator.verify(url, params | {"Extra": "x"}, signature)
    with pytest.raises(SignatureError):
        validator.verify(url + "?x=1", params, signature)
    with pytest.raises(SignatureError):
        TwilioRequestValidator("e" * 32).verify(url, params, signature)
    with pytest.raises(SignatureError, match="missing"):
        validator.verify(url, params, None)


def test_twilio_url_with_or_without_default_port_both_verify() -> None:
    token = "t0ken"
    signed_without = independent_twilio_signature(token, "https://h.example/cb", {"A": "1"})
    signed_with = independent_twilio_signature(token, "https://h.example:443/cb", {"A": "1"})
    validator = TwilioRequestValidator(token)

    validator.verify("https://h.example:443/cb", {"A": "1"}, signed_without)  # raises if not
    validator.verify("https://h.example/cb", {"A": "1"}, signed_with)
    with pytest.raises(SignatureError):  # another port is another URL
        validator.verify("https://h.example:8443/cb", {"A": "1"}, signed_without)


def test_twilio_repeated_parameters_are_all_signed() -> None:
    token = "tok"
    url = "https://h.example/cb"
    pairs = [("B", "2"), ("A", "z"), ("A", "a")]
    expected_data = url + "Aa" + "Az" + "B2"
    expected = base64.b64encode(
        hmac.new(token.encode(), expected_data.encode(), hashlib.sha1).digest()
    ).decode()

    TwilioRequestValidator(token).verify(url, pairs, expected)


# --- Postmark ----------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_postmark_basic_auth() -> None:
    verify_basic_auth(basic("postmark", "s3cret"), "postmark", "s3cret")
    for header in (
        basic("postmark", "wrong"),
        basic("someone", "s3cret"),
        basic("postmark", "s3cret") + "x",
        "Bearer abc",
        "Basic !!!",
        "",
        None,
    ):
        with pytest.raises(SignatureError):
            verify_basic_auth(header, "postmark", "s3cret")


def test_shared_secret_header() -> None:
    verify_shared_secret("abc123", "abc123")
    for value in ("abc124", "", None):
        with pytest.raises(SignatureError):
            verify_shared_secret(value, "abc123")


# --- our webhook channel -----------------------------------------------------------------


def test_winback_webhook_signature_matches_the_documented_scheme() -> None:
    body = b'{"id":"k1"}'
    timestamp = int(NOW.timestamp())
    header = sign_winback_webhook(KEY, body, timestamp)

    expected = hmac.new(KEY, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={timestamp},v1={expected}"
    verify_winback_webhook(KEY, body, header, NOW)
    verify_winback_webhook(KEY, body, f"t={timestamp},v1={'0' * 64},v1={expected}", NOW)


def test_winback_webhook_forgeries_and_replays_are_rejected() -> None:
    body = b'{"id":"k1"}'
    timestamp = int(NOW.timestamp())
    header = sign_winback_webhook(KEY, body, timestamp)

    with pytest.raises(SignatureError):
        verify_winback_webhook(KEY, body + b" ", header, NOW)
    with pytest.raises(SignatureError):
        verify_winback_webhook(OTHER_KEY, body, header, NOW)
    with pytest.raises(SignatureError):
        verify_winback_webhook(
            KEY, body, header.replace(f"t={timestamp}", f"t={timestamp + 1}"), NOW
        )
    with pytest.raises(StaleSignatureError):
        verify_winback_webhook(KEY, body, header, NOW + timedelta(minutes=10))
    for bad in (None, "", "v1=abc", f"t={timestamp}"):
        with pytest.raises(SignatureError):
            verify_winback_webhook(KEY, body, bad, NOW)


# --- unsubscribe tokens ------------------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


def test_unsubscribe_token_round_trip_is_url_safe(clock: FrozenClock) -> None:
    tokens = UnsubscribeTokens([KEY], clock)

    token = tokens.issue("cus_8f1c2a", "email")
    claim = tokens.verify(token)

    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)
    assert (claim.customer_id, claim.channel, claim.issued_at) == ("cus_8f1c2a", "email", NOW)


def _reencode(token: str, customer_id: str) -> str:
    version, payload, mac = token.split(".")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    _, channel, issued = raw.split("\n")
    forged = f"{customer_id}\n{channel}\n{issued}".encode()
    return f"{version}.{base64.urlsafe_b64encode(forged).rstrip(b'=').decode()}.{mac}"


def test_altered_and_forged_unsubscribe_tokens_are_rejected(clock: FrozenClock) -> None:
    tokens = UnsubscribeTokens([KEY], clock)
    token = tokens.issue("cus_1", "email")
    version, payload, mac = token.split(".")

    forged_by_other_key = UnsubscribeTokens([OTHER_KEY], clock).issue("cus_2", "email")
    candidates = [
        _reencode(token, "cus_2"),  # someone else's id, old MAC
        forged_by_other_key,  # well-formed, wrong key
        f"{version}.{payload}.{mac[:-2]}",  # truncated MAC
        f"{version}.{payload}.{'A' * len(mac)}",  # made-up MAC
        f"2.{payload}.{mac}",  # unknown version
        f"{version}.{payload}",  # missing part
        f"{version}.{payload}.{mac}.extra",
        f"{version}.{payload}.{mac}=",  # not base64url
        "",
    ]
    for candidate in candidates:
        with pytest.raises(SignatureError):
            tokens.verify(candidate)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.sampled_from("AQgw-_09zZ."))
def test_any_single_character_change_is_rejected(position: int, replacement: str) -> None:
    tokens = UnsubscribeTokens([KEY], FrozenClock(NOW))
    token = tokens.issue("cus_1", "sms")
    index = position % len(token)
    altered = token[:index] + replacement + token[index + 1 :]
    if altered == token:
        return
    with pytest.raises(SignatureError):
        tokens.verify(altered)


def test_unsubscribe_token_expiry_is_optional(clock: FrozenClock) -> None:
    forever = UnsubscribeTokens([KEY], clock)
    expiring = UnsubscribeTokens([KEY], clock, max_age=timedelta(days=60))
    token = forever.issue("cus_1", "email")

    clock.advance(timedelta(days=59))
    expiring.verify(token)
    clock.advance(timedelta(days=2))
    with pytest.raises(StaleSignatureError):
        expiring.verify(token)
    assert forever.verify(token).customer_id == "cus_1"


def test_unsubscribe_keys_rotate_without_breaking_sent_links(clock: FrozenClock) -> None:
    old = UnsubscribeTokens([OTHER_KEY], clock)
    rotated = UnsubscribeTokens([KEY, OTHER_KEY], clock)
    sent_before = old.issue("cus_1", "email")

    assert rotated.verify(sent_before).customer_id == "cus_1"
    new_token = rotated.issue("cus_1", "email")
    with pytest.raises(SignatureError):
        old.verify(new_token)


def test_unsubscribe_token_configuration_is_checked(clock: FrozenClock) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        UnsubscribeTokens([b"short"], clock)
    with pytest.raises(ValueError, match="30 days"):
        UnsubscribeTokens([KEY], clock, max_age=timedelta(days=7))
    tokens = UnsubscribeTokens([KEY], clock)
    with pytest.raises(ValueError, match="customer id"):
        tokens.issue("", "email")
    with pytest.raises(ValueError, match="customer id"):
        tokens.issue("a\nb", "email")
    with pytest.raises(ValueError, match="channel"):
        tokens.issue("cus_1", "E-Mail")
