"""The customer's fiscal year (``fiscal_year_start_month``, 1-12, from ``customer.updated``) in
ingest's ``customers`` and the scheduler's ``scheduler_customers``, where the ``budget_cycle``
calendar rule reads it; and ingest's erasure mark (``customers.erased_at``): an erased
customer's later events never write the removed fields back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 04:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("customers", "scheduler_customers"):
        op.add_column(table, sa.Column("fiscal_year_start_month", sa.SmallInteger(), nullable=True))
    op.add_column("customers", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("customers", "erased_at")
    for table in ("customers", "scheduler_customers"):
        op.drop_column(table, "fiscal_year_start_month")
