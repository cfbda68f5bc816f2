"""Churn reasons, normalised. Billing systems say it many ways; the scheduler needs one word.

Pure: no I/O. Stripe's ``cancellation_details.feedback`` codes map directly; free words
are matched by keyword; anything else is ``unknown`` (the raw reason is kept beside it).
"""

from __future__ import annotations

from shared.churn import CHURN_REASONS, ChurnReason

Reason = ChurnReason
REASONS = CHURN_REASONS

_EXACT: dict[str, Reason] = {
    # Stripe cancellation_details.feedback
    "too_expensive": "price",
    "missing_features": "missing_feature",
    "switched_service": "competitor",
    "unused": "unused",
    "customer_service": "poor_experience",
    "too_complex": "poor_experience",
    "low_quality": "poor_experience",
    "other": "unknown",
    # our own words, and common billing-system codes
    "price": "price",
    "pricing": "price",
    "missing_feature": "missing_feature",
    "feature_gap": "missing_feature",
    "poor_experience": "poor_experience",
    "poor_onboarding": "poor_experience",
    "bad_experience": "poor_experience",
    "budget": "budget",
    "budget_cut": "budget",
    "competitor": "competitor",
    "situational": "situational",
    "project_ended": "situational",
    "seasonal": "situational",
    "champion_left": "situational",
    "not_used": "unused",
    # involuntary churn: the billing system ended it after failed payments
    "payment_failed": "payment_failed",  # Stripe cancellation_details.reason
    "not_paid": "payment_failed",  # Chargebee cancel_reason
    "no_card": "payment_failed",  # Chargebee cancel_reason
    "dunning": "payment_failed",
    "unknown": "unknown",
}

_KEYWORDS: tuple[tuple[tuple[str, ...], Reason], ...] = (
    (("payment failed", "card declined", "failed payment", "card expired"), "payment_failed"),
    (("budget", "funding", "cost cutting", "freeze"), "budget"),
    (("expensive", "price", "pricing", "cost", "cheaper", "afford"), "price"),
    (("competitor", "switched", "moved to", "alternative"), "competitor"),
    (("feature", "missing", "lacks", "integration"), "missing_feature"),
    (
        ("onboarding", "support", "bug", "quality", "complex", "difficult", "slow"),
        "poor_experience",
    ),
    (("project", "season", "temporary", "left the company", "reorg", "team change"), "situational"),
    (("not using", "unused", "didn't use", "did not use", "no time"), "unused"),
)


def normalise_reason(raw: str | None) -> Reason:
    if raw is None:
        return "unknown"
    key = raw.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _EXACT:
        return _EXACT[key]
    words = raw.strip().lower()
    for keywords, reason in _KEYWORDS:
        if any(k in words for k in keywords):
            return reason
    return "unknown"
