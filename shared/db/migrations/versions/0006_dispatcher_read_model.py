"""The scheduler's published read model for the dispatcher: two views, so the dispatcher reads
a documented contract instead of the scheduler's tables.

``dispatcher_case_status`` (one row per case: its status and segment) and
``dispatcher_customer_status`` (one row per customer the scheduler knows: erasure, opt-out,
consent, suppressed channels and the contact profile) are what the dispatcher re-checks right
before a send (``services/dispatcher/store.py``: the claim query, contact points) and the
unsubscribe page's language (``services/dispatcher/unsubscribe.py``). They are
read at send time, not carried in the dispatch command, because they change after the command
was sent: a case paused or cancelled, a customer erased, opted out or withdrawing consent must
stop a queued message. The scheduler owns the views: a migration that changes ``cases`` or
``scheduler_customers`` keeps their columns (names and meaning) or replaces them in the same
revision. Plain views over one table each: the planner inlines them (no extra cost).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CASE_STATUS = """
CREATE VIEW dispatcher_case_status AS
SELECT id AS case_id, customer_id, status, segment
FROM cases
"""

CUSTOMER_STATUS = """
CREATE VIEW dispatcher_customer_status AS
SELECT id AS customer_id,
       erased_at IS NOT NULL AS erased,
       opted_out_all,
       consent,
       suppressed_channels,
       name, email, phone, locale, timezone, mrr_minor, currency
FROM scheduler_customers
"""


def upgrade() -> None:
    op.execute(CASE_STATUS)
    op.execute(CUSTOMER_STATUS)
    op.execute(
        "COMMENT ON VIEW dispatcher_case_status IS "
        "'The scheduler''s published read model: case status for the dispatcher''s re-check'"
    )
    op.execute(
        "COMMENT ON VIEW dispatcher_customer_status IS "
        "'The scheduler''s published read model: customer state and contact for the dispatcher'"
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS dispatcher_customer_status")
    op.execute("DROP VIEW IF EXISTS dispatcher_case_status")
