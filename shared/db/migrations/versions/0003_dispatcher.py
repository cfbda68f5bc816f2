"""Dispatcher: deliveries wait in a queue (``queued``, optionally ``not_before`` a time).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_deliveries_queued",
        "deliveries",
        ["id"],
        unique=False,
        postgresql_where=sa.text("state = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_deliveries_queued",
        table_name="deliveries",
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.drop_column("deliveries", "not_before")
