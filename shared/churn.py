"""The churn vocabulary the services share: the normalised reasons a churn episode carries.

Ingest normalises whatever the billing system said into one of these; the scheduler's
segmentation and playbooks select on them. One definition, so the two can never drift.
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
    "unknown",
]
CHURN_REASONS: tuple[ChurnReason, ...] = get_args(ChurnReason)
