"""The churn vocabulary the services share: the normalised reasons a churn episode carries.

Ingest normalises whatever the billing system said into one of these; the scheduler's
segmentation and playbooks select on them. One definition, so the two can never drift.
``payment_failed`` is involuntary churn (the billing system ended the subscription after failed
payments): it gets its own track (the payment_failed playbook), never a discount.
Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

ChurnReason: TypeAlias = Literal[
    "price",
    "missing_feature",
    "poor_experience",
    "budget",
    "competitor",
    "situational",
    "unused",
    "payment_failed",
    "unknown",
]
CHURN_REASONS: tuple[ChurnReason, ...] = get_args(ChurnReason)
