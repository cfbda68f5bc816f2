"""Deliveries whose send outcome is not known: ``unknown_since`` (when a crash between the
provider call and recording it left the row ``unknown``; kept once it is settled) and a
partial index over the rows that have it: the few ever unknown, which the reconciler scans
(``services/dispatcher/reconcile.py``) and ``GET /v1/messages/reconciliation`` counts.
``deliveries.state`` is free text: ``unknown`` needs no constraint change.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "deliveries", sa.Column("unknown_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_deliveries_unknown",
        "deliveries",
        ["unknown_since"],
        postgresql_where=sa.text("unknown_since IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_deliveries_unknown",
        table_name="deliveries",
        postgresql_where=sa.text("unknown_since IS NOT NULL"),
    )
    op.drop_column("deliveries", "unknown_since")
