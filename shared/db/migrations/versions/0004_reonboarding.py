"""Scheduler: re-onboarding cases (``cases.purpose``), monitoring steps
(``case_steps.inactive_for``) and the customer's latest activity.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "cases",
        sa.Column("purpose", sa.String(20), nullable=False, server_default=sa.text("'winback'")),
    )
    op.add_column("case_steps", sa.Column("inactive_for", sa.Interval(), nullable=True))
    op.add_column(
        "scheduler_customers",
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("scheduler_customers", "last_active_at")
    op.drop_column("case_steps", "inactive_for")
    op.drop_column("cases", "purpose")
