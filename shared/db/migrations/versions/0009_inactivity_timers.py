"""The scheduler's per-customer inactivity timers: ``inactivity_timers`` (one row per customer
who is not churned: their latest activity and when they count as a passive user), pushed
forward by every ``customer.activity`` and claimed by the step timer loop at ``due_at``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inactivity_timers",
        sa.Column("customer_id", sa.String(200), nullable=False),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("customer_id", name="pk_inactivity_timers"),
    )
    op.create_index("ix_inactivity_timers_due_at", "inactivity_timers", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_inactivity_timers_due_at", table_name="inactivity_timers")
    op.drop_table("inactivity_timers")
