"""The rules that settle a delivery a crash left ``unknown`` (services/dispatcher/reconcile.py):
when it expires, how it may be confirmed, and which answers confirm it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.errors import (
    DeliveryFailedError,
    FailedAttempt,
    PermanentSendError,
    TransientSendError,
)
from services.dispatcher.providers import SendResult
from services.dispatcher.reconcile import (
    CONFIRMING_KINDS,
    confirms,
    next_step,
    resend_confirmation,
)
from services.dispatcher.webhooks import IGNORED, KIND_TYPES

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
WINDOW = timedelta(hours=6)


@pytest.mark.parametrize(
    ("resendable", "searchable", "step"),
    [
        (True, False, "resend"),
        (True, True, "resend"),
        (False, True, "search"),
        (False, False, "wait"),
    ],
)
def test_within_the_window_a_key_resends_a_search_searches_else_it_waits(
    resendable: bool, searchable: bool, step: str
) -> None:
    now = T0 + WINDOW - timedelta(seconds=1)
    assert next_step(T0, now, WINDOW, resendable=resendable, searchable=searchable) == step


@pytest.mark.parametrize("resendable", [True, False])
def test_at_the_end_of_the_window_it_expires_whatever_the_channel(resendable: bool) -> None:
    for now in (T0 + WINDOW, T0 + WINDOW * 3):
        assert next_step(T0, now, WINDOW, resendable=resendable, searchable=True) == "expire"


def test_every_matched_provider_event_confirms_the_send_and_an_ignored_one_does_not() -> None:
    assert set(KIND_TYPES) == CONFIRMING_KINDS
    assert all(confirms(kind) for kind in KIND_TYPES)
    assert not confirms(IGNORED)
    assert not confirms("processed")


def attempt(error: PermanentSendError | TransientSendError, provider: str) -> FailedAttempt:
    return FailedAttempt(provider=provider, attempt=1, error=error)


def test_an_accepted_resend_confirms_with_the_providers_message_id() -> None:
    result = SendResult(provider="hooks", provider_message_id="wh-1")
    assert resend_confirmation(result, None) == ("hooks", "wh-1")


def test_a_duplicate_refusal_confirms_without_a_message_id() -> None:
    duplicate = PermanentSendError("task exists", provider="hubspot", error_code="duplicate")
    error = DeliveryFailedError([attempt(duplicate, "hubspot")])
    assert resend_confirmation(None, error) == ("hubspot", None)


def test_any_other_refusal_or_a_timeout_confirms_nothing() -> None:
    refused = PermanentSendError("bad request", provider="hooks", status_code=400)
    timeout = TransientSendError("timed out", provider="hooks", ambiguous=True)
    assert resend_confirmation(None, DeliveryFailedError([attempt(refused, "hooks")])) is None
    assert resend_confirmation(None, DeliveryFailedError([attempt(timeout, "hooks")])) is None
    assert resend_confirmation(None, None) is None
