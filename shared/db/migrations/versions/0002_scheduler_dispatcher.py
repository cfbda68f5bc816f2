"""Scheduler: customers view, cases, step timers, win-backs. Dispatcher: deliveries, suppressions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:38:14.408471
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("episode_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("close_reason", sa.String(length=30), nullable=True),
        sa.Column("playbook", sa.String(length=100), nullable=False),
        sa.Column("playbook_version", sa.Integer(), nullable=False),
        sa.Column("segment", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("episode", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("feature_key", sa.String(length=200), nullable=True),
        sa.Column("holdout", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("is_rechurn", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("churned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("returned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cases")),
        sa.UniqueConstraint("episode_id", name=op.f("uq_cases_episode_id")),
    )
    op.create_index("ix_cases_customer_id", "cases", ["customer_id"], unique=False)
    op.create_index(
        "ix_cases_expires_at_open",
        "cases",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.create_index(
        "ix_cases_feature_key_open",
        "cases",
        ["feature_key"],
        unique=False,
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.create_index(
        "ix_cases_status_opened_at", "cases", ["status", "opened_at", "id"], unique=False
    )
    op.create_index(
        "uq_cases_one_open_per_customer",
        "cases",
        ["customer_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("step_key", sa.String(length=100), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("template", sa.String(length=100), nullable=False),
        sa.Column("variant", sa.String(length=100), nullable=True),
        sa.Column("crm_owner", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("provider", sa.String(length=30), nullable=True),
        sa.Column("provider_message_id", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("command", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_deliveries_idempotency_key")),
    )
    op.create_index("ix_deliveries_customer_id", "deliveries", ["customer_id"], unique=False)
    op.create_index(
        "ix_deliveries_provider_message_id",
        "deliveries",
        ["provider", "provider_message_id"],
        unique=False,
    )
    op.create_index(
        "ix_deliveries_sending",
        "deliveries",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("state = 'sending'"),
    )
    op.create_table(
        "scheduler_customers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("phone", sa.String(length=20), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("plan", sa.String(length=200), nullable=True),
        sa.Column("mrr_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("customer_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("engagement", sa.String(length=10), nullable=True),
        sa.Column("crm_owner", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=True),
        sa.Column(
            "consent",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("opted_out_all", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "suppressed_channels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("last_won_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_customers")),
    )
    op.create_table(
        "suppressions",
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("address_hash", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("channel", "address_hash", name=op.f("pk_suppressions")),
    )
    op.create_table(
        "case_steps",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("step_key", sa.String(length=100), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("template", sa.String(length=100), nullable=False),
        sa.Column("offer", sa.String(length=100), nullable=True),
        sa.Column("is_discount", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("discount_fallback_template", sa.String(length=100), nullable=True),
        sa.Column("variant", sa.String(length=100), nullable=False),
        sa.Column("window", sa.String(length=50), nullable=False),
        sa.Column("on_cap", sa.String(length=10), nullable=False),
        sa.Column("holdout", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("trigger", sa.String(length=50), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("original_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("defer_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "context",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "outcome",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["case_id"], ["cases.id"], name=op.f("fk_case_steps_case_id_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_case_steps")),
    )
    op.create_index(
        "ix_case_steps_customer_fired", "case_steps", ["customer_id", "fired_at"], unique=False
    )
    op.create_index(
        "ix_case_steps_due_pending",
        "case_steps",
        ["due_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "uq_case_steps_case_id_step_key", "case_steps", ["case_id", "step_key"], unique=True
    )
    op.create_table(
        "win_backs",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("step_id", sa.BigInteger(), nullable=True),
        sa.Column("step_key", sa.String(length=100), nullable=True),
        sa.Column("channel", sa.String(length=10), nullable=True),
        sa.Column("template", sa.String(length=100), nullable=True),
        sa.Column("variant", sa.String(length=100), nullable=True),
        sa.Column("crm_owner", sa.String(length=200), nullable=True),
        sa.Column("playbook", sa.String(length=100), nullable=False),
        sa.Column("mrr_regained_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("days_to_return", sa.Integer(), nullable=False),
        sa.Column("holdout", sa.Boolean(), nullable=False),
        sa.Column("churned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("returned_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name=op.f("fk_win_backs_case_id_cases")),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_win_backs")),
    )
    op.create_index("ix_win_backs_customer_id", "win_backs", ["customer_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_win_backs_customer_id", table_name="win_backs")
    op.drop_table("win_backs")
    op.drop_index("uq_case_steps_case_id_step_key", table_name="case_steps")
    op.drop_index(
        "ix_case_steps_due_pending",
        table_name="case_steps",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_index("ix_case_steps_customer_fired", table_name="case_steps")
    op.drop_table("case_steps")
    op.drop_table("suppressions")
    op.drop_table("scheduler_customers")
    op.drop_index(
        "ix_deliveries_sending",
        table_name="deliveries",
        postgresql_where=sa.text("state = 'sending'"),
    )
    op.drop_index("ix_deliveries_provider_message_id", table_name="deliveries")
    op.drop_index("ix_deliveries_customer_id", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_index(
        "uq_cases_one_open_per_customer",
        table_name="cases",
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.drop_index("ix_cases_status_opened_at", table_name="cases")
    op.drop_index(
        "ix_cases_feature_key_open",
        table_name="cases",
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.drop_index(
        "ix_cases_expires_at_open",
        table_name="cases",
        postgresql_where=sa.text("status IN ('open', 'paused')"),
    )
    op.drop_index("ix_cases_customer_id", table_name="cases")
    op.drop_table("cases")
