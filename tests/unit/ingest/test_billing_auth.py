"""Billing webhook authentication (services/ingest/billing/auth.py): signatures computed by the
documented schemes by hand and by the providers' own libraries are accepted; forged, tampered,
stale and malformed ones are refused with the kind of failure."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
import stripe
from paddle_billing.Notifications.PaddleSignature import (  # type: ignore[import-untyped]
    PaddleSignature,
)

from services.ingest.billing.auth import (
    SignatureError,
    verify_basic,
    verify_paddle,
    verify_stripe,
)

BODY = b'{"id":"evt_1","type":"customer.subscription.deleted","created":1780000000}'
STRIPE_SECRET = "whsec_test_current_0123456789"
STRIPE_OLD = "whsec_test_previous_0123456789"
PADDLE_SECRET = "pdl_ntfset_01test_current"
PADDLE_OLD = "pdl_ntfset_01test_previous"


def stripe_by_hand(body: bytes, secret: str, t: int) -> str:
    """Stripe's documented scheme: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def paddle_by_hand(body: bytes, secret: str, ts: int) -> str:
    """Paddle's documented scheme: ts=<unix>;h1=<hex HMAC-SHA256(secret, "ts:body")>."""
    mac = hmac.new(secret.encode(), f"{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return f"ts={ts};h1={mac}"


def refused(kind: str, call: object, *args: object) -> None:
    with pytest.raises(SignatureError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.kind == kind, caught.value.reason


# --- Stripe ------------------------------------------------------------------------------------


def test_stripe_accepts_the_documented_scheme_and_the_librarys_own_header() -> None:
    now = int(time.time())
    verify_stripe(BODY, stripe_by_hand(BODY, STRIPE_SECRET, now), [STRIPE_SECRET], 300)
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), STRIPE_SECRET)
    verify_stripe(BODY, header, [STRIPE_SECRET], 300)
    # and the library's signature is the documented one
    expected = stripe.WebhookSignature._compute_signature(f"{now}.{BODY.decode()}", STRIPE_SECRET)
    assert stripe_by_hand(BODY, STRIPE_SECRET, now) == f"t={now},v1={expected}"


def test_stripe_accepts_any_configured_secret_and_any_v1_during_rotation() -> None:
    now = int(time.time())
    old = stripe_by_hand(BODY, STRIPE_OLD, now)
    verify_stripe(BODY, old, [STRIPE_SECRET, STRIPE_OLD], 300)
    # Stripe signs with both secrets while rolling over: two v1 values in one header
    both = old + ",v1=" + stripe_by_hand(BODY, STRIPE_SECRET, now).split("v1=")[1]
    verify_stripe(BODY, both, [STRIPE_SECRET], 300)


def test_stripe_refuses_forged_tampered_stale_and_missing() -> None:
    now = int(time.time())
    refused(
        "invalid",
        verify_stripe,
        BODY,
        stripe_by_hand(BODY, "whsec_forged", now),
        [STRIPE_SECRET],
        300,
    )
    good = stripe_by_hand(BODY, STRIPE_SECRET, now)
    refused("invalid", verify_stripe, BODY.replace(b"evt_1", b"evt_2"), good, [STRIPE_SECRET], 300)
    # a captured delivery replayed after the tolerance
    stale = stripe_by_hand(BODY, STRIPE_SECRET, now - 301)
    refused("stale", verify_stripe, BODY, stale, [STRIPE_SECRET], 300)
    # a stale header with a wrong secret says invalid, not stale: nothing matched
    refused("invalid", verify_stripe, BODY, stale, ["whsec_other"], 300)
    refused("missing", verify_stripe, BODY, None, [STRIPE_SECRET], 300)
    refused("invalid", verify_stripe, BODY, "v1=deadbeef", [STRIPE_SECRET], 300)
    refused("invalid", verify_stripe, BODY, f"t={now}", [STRIPE_SECRET], 300)
    refused("invalid", verify_stripe, b"\xff\xfe", good, [STRIPE_SECRET], 300)


# --- Paddle ------------------------------------------------------------------------------------


def test_paddle_accepts_the_documented_scheme_and_the_sdks_own_hmac() -> None:
    now = int(time.time())
    verify_paddle(BODY, paddle_by_hand(BODY, PADDLE_SECRET, now), [PADDLE_SECRET], 5)
    sdk = PaddleSignature.calculate_hmac(PADDLE_SECRET, f"{now}:".encode() + BODY).hexdigest()
    verify_paddle(BODY, f"ts={now};h1={sdk}", [PADDLE_SECRET], 5)
    assert paddle_by_hand(BODY, PADDLE_SECRET, now) == f"ts={now};h1={sdk}"


def test_paddle_accepts_a_previous_secret_during_rotation() -> None:
    now = int(time.time())
    verify_paddle(BODY, paddle_by_hand(BODY, PADDLE_OLD, now), [PADDLE_SECRET, PADDLE_OLD], 5)


def test_paddle_refuses_forged_tampered_stale_future_and_malformed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the SDK skips its own time check when TEST_MODE=1; ours does not
    monkeypatch.setenv("TEST_MODE", "1")
    now = int(time.time())
    forged = paddle_by_hand(BODY, "pdl_forged", now)
    refused("invalid", verify_paddle, BODY, forged, [PADDLE_SECRET], 5)
    good = paddle_by_hand(BODY, PADDLE_SECRET, now)
    refused("invalid", verify_paddle, BODY + b" ", good, [PADDLE_SECRET], 5)
    old = paddle_by_hand(BODY, PADDLE_SECRET, now - 60)
    refused("stale", verify_paddle, BODY, old, [PADDLE_SECRET], 5)
    ahead = paddle_by_hand(BODY, PADDLE_SECRET, now + 60)
    refused("stale", verify_paddle, BODY, ahead, [PADDLE_SECRET], 5)
    refused("missing", verify_paddle, BODY, "", [PADDLE_SECRET], 5)
    for header in ("ts=abc;h1=00", "h1=00", f"ts={now};h1=a=b", f"ts={now};x=1"):
        refused("invalid", verify_paddle, BODY, header, [PADDLE_SECRET], 5)


# --- Chargebee (HTTP Basic) ----------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_chargebee_basic_credentials() -> None:
    verify_basic(basic("winback", "s3cret-passw0rd"), "winback", "s3cret-passw0rd")
    refused(
        "invalid", verify_basic, basic("winback", "wrong-password"), "winback", "s3cret-passw0rd"
    )
    refused(
        "invalid", verify_basic, basic("other", "s3cret-passw0rd"), "winback", "s3cret-passw0rd"
    )
    refused("invalid", verify_basic, "Bearer abc", "winback", "s3cret-passw0rd")
    refused("invalid", verify_basic, "Basic !!!", "winback", "s3cret-passw0rd")
    refused("missing", verify_basic, None, "winback", "s3cret-passw0rd")
