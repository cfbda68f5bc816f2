"""Every table, declared once. Alembic migrations create them; a test checks that the
migrated schema equals this declaration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _tz(name: str, nullable: bool = True, **kw: object) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


# --- messaging: the inbox (dedupe by (consumer, source, id)) and the outbox -----------------
inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(100), nullable=False),
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    _tz("received_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("consumer", "source", "event_id"),
)
Index("ix_inbox_received_at", inbox.c.received_at)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("topic", String(249), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=True),
    Column("headers", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    _tz("created_at", nullable=False, server_default=func.now()),
    _tz("published_at"),
    # a row the broker refuses for good (or over its limits when written): never published,
    # never pruned, not backlog (``shared.messaging.outbox``)
    _tz("parked_at"),
    Column("park_reason", Text),
)
Index(
    "ix_outbox_unpublished",
    outbox.c.id,
    postgresql_where=outbox.c.published_at.is_(None) & outbox.c.parked_at.is_(None),
)
Index("ix_outbox_published_at", outbox.c.published_at)
Index("ix_outbox_parked", outbox.c.id, postgresql_where=outbox.c.parked_at.isnot(None))

# --- ingest: customers and churn episodes ------------------------------------------------------
customers = Table(
    "customers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("email", Text),
    Column("phone", String(20)),
    Column("name", Text),
    Column("locale", String(35)),
    Column("timezone", String(64)),
    Column("plan", String(200)),
    Column("mrr_minor", BigInteger),
    Column("currency", String(3)),
    _tz("customer_since"),
    Column("engagement", String(10)),
    Column("crm_owner", String(200)),
    Column("fiscal_year_start_month", SmallInteger),
    Column("status", String(20), nullable=False),
    Column("lifecycle", String(20), nullable=False),
    _tz("lifecycle_at", nullable=False),
    Column("activity", String(20), nullable=False),
    _tz("activity_at", nullable=False),
    Column("profile_times", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("consent", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("opted_out_all", Boolean, nullable=False, server_default=text("false")),
    _tz("erased_at"),  # customer.erased: later events never write the removed fields back
    _tz("created_at", nullable=False, server_default=func.now()),
    _tz("updated_at", nullable=False, server_default=func.now()),
)

churn_episodes = Table(
    "churn_episodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("customer_id", String(200), ForeignKey("customers.id"), nullable=False),
    Column("kind", String(30), nullable=False),
    Column("reason", String(30), nullable=False),
    Column("reason_raw", Text),
    Column("comment", Text),
    Column("feature", String(200)),
    Column("competitor", String(200)),
    _tz("occurred_at", nullable=False),
    Column("mrr_at_churn_minor", BigInteger),
    Column("currency", String(3)),
    Column("tenure_days", Integer),
    _tz("ended_at"),
    Column("end_reason", String(30)),
    Column("source", Text, nullable=False),
    Column("source_event_id", Text, nullable=False),
    _tz("recorded_at", nullable=False, server_default=func.now()),
)
Index("ix_churn_episodes_customer_id", churn_episodes.c.customer_id)
Index(
    "ix_churn_episodes_feature",
    churn_episodes.c.feature,
    postgresql_where=churn_episodes.c.feature.is_not(None),
)

# --- scheduler: its view of customers, win-back cases, step timers, win-backs ----------------
scheduler_customers = Table(
    "scheduler_customers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("email", Text),
    Column("phone", String(20)),
    Column("name", Text),
    Column("locale", String(35)),
    Column("timezone", String(64)),
    Column("plan", String(200)),
    Column("mrr_minor", BigInteger),
    Column("currency", String(3)),
    _tz("customer_since"),
    Column("engagement", String(10)),
    Column("crm_owner", String(200)),
    Column("fiscal_year_start_month", SmallInteger),
    Column("status", String(20)),
    Column("consent", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("opted_out_all", Boolean, nullable=False, server_default=text("false")),
    Column("suppressed_channels", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    _tz("last_won_back_at"),
    _tz("last_active_at"),  # latest customer.activity: re-onboarding watches for silence
    _tz("erased_at"),
    _tz("updated_at", nullable=False, server_default=func.now()),
)

# one row per customer who is not churned: a passive user once due_at passes without activity
inactivity_timers = Table(
    "inactivity_timers",
    metadata,
    Column("customer_id", String(200), primary_key=True),
    _tz("last_active_at", nullable=False),
    _tz("due_at", nullable=False),
    _tz("updated_at", nullable=False, server_default=func.now()),
)
Index("ix_inactivity_timers_due_at", inactivity_timers.c.due_at)

cases = Table(
    "cases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("customer_id", String(200), nullable=False),
    Column("episode_id", String(64), nullable=False, unique=True),
    Column("status", String(10), nullable=False),  # open, paused, closed
    # winback (opened on a churn) or reonboarding (opened on a return, timed from it)
    Column("purpose", String(20), nullable=False, server_default=text("'winback'")),
    Column("close_reason", String(30)),
    Column("playbook", String(100), nullable=False),
    Column("playbook_version", Integer, nullable=False),
    Column("segment", JSONB, nullable=False),
    Column("episode", JSONB, nullable=False),
    Column("feature_key", String(200)),
    Column("holdout", Boolean, nullable=False, server_default=text("false")),
    Column("is_rechurn", Boolean, nullable=False, server_default=text("false")),
    _tz("churned_at", nullable=False),
    _tz("opened_at", nullable=False),
    _tz("expires_at", nullable=False),
    _tz("closed_at"),
    _tz("returned_at"),
    _tz("updated_at", nullable=False, server_default=func.now()),
)
Index(
    "uq_cases_one_open_per_customer",
    cases.c.customer_id,
    unique=True,
    postgresql_where=cases.c.status.in_(["open", "paused"]),
)
Index("ix_cases_customer_id", cases.c.customer_id)
Index(
    "ix_cases_feature_key_open",
    cases.c.feature_key,
    postgresql_where=cases.c.status.in_(["open", "paused"]),
)
Index("ix_cases_status_opened_at", cases.c.status, cases.c.opened_at, cases.c.id)
Index(
    "ix_cases_expires_at_open",
    cases.c.expires_at,
    postgresql_where=cases.c.status.in_(["open", "paused"]),
)

case_steps = Table(
    "case_steps",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("case_id", String(36), ForeignKey("cases.id"), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("step_key", String(100), nullable=False),
    Column("channel", String(10), nullable=False),
    Column("template", String(100), nullable=False),
    Column("offer", String(100)),
    Column("is_discount", Boolean, nullable=False, server_default=text("false")),
    Column("discount_fallback_template", String(100)),
    Column("variant", String(100), nullable=False),
    Column("window", String(50), nullable=False),
    Column("on_cap", String(10), nullable=False),
    Column("holdout", Boolean, nullable=False, server_default=text("false")),
    Column("trigger", String(50)),
    Column("inactive_for", Interval),  # a monitoring step: goes only after this much silence
    # pending → dispatched → sent | failed | suppressed; or skipped / cancelled
    Column("state", String(12), nullable=False),
    Column("state_reason", Text),
    _tz("due_at", nullable=False),
    _tz("original_due_at", nullable=False),
    _tz("expires_at", nullable=False),
    _tz("fired_at"),
    Column("defer_count", Integer, nullable=False, server_default=text("0")),
    Column("context", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("outcome", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _tz("created_at", nullable=False, server_default=func.now()),
    _tz("updated_at", nullable=False, server_default=func.now()),
)
Index("uq_case_steps_case_id_step_key", case_steps.c.case_id, case_steps.c.step_key, unique=True)
Index(
    "ix_case_steps_due_pending",
    case_steps.c.due_at,
    postgresql_where=case_steps.c.state == "pending",
)
Index("ix_case_steps_customer_fired", case_steps.c.customer_id, case_steps.c.fired_at)

win_backs = Table(
    "win_backs",
    metadata,
    Column("case_id", String(36), ForeignKey("cases.id"), primary_key=True),
    Column("customer_id", String(200), nullable=False),
    Column("step_id", BigInteger),
    Column("step_key", String(100)),
    Column("channel", String(10)),
    Column("template", String(100)),
    Column("variant", String(100)),
    Column("crm_owner", String(200)),
    Column("playbook", String(100), nullable=False),
    Column("mrr_regained_minor", BigInteger),
    Column("currency", String(3)),
    Column("days_to_return", Integer, nullable=False),
    Column("holdout", Boolean, nullable=False),
    _tz("churned_at", nullable=False),
    _tz("returned_at", nullable=False),
)
Index("ix_win_backs_customer_id", win_backs.c.customer_id)

# --- dispatcher: one delivery per (case, step), and the suppression list ----------------------
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    Column("case_id", String(36), nullable=False),
    Column("step_key", String(100), nullable=False),
    Column("customer_id", String(200), nullable=False),
    Column("channel", String(10), nullable=False),
    Column("template", String(100), nullable=False),
    Column("variant", String(100)),
    Column("crm_owner", String(200)),
    # queued → sending → sent | failed | suppressed (a transient failure: back to queued);
    # sending → unknown (a crash mid-send) → sent (reconciled) | failed (unconfirmed)
    Column("state", String(12), nullable=False),
    Column("provider", String(30)),
    Column("provider_message_id", String(200)),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", Text),
    Column("subject", Text),
    Column("body", Text),
    Column("command", JSONB, nullable=False),
    _tz("created_at", nullable=False, server_default=func.now()),
    _tz("sent_at"),
    _tz("updated_at", nullable=False, server_default=func.now()),
    _tz("not_before"),  # a queued delivery waiting to retry is not claimed before this
    _tz("unknown_since"),  # migration 0008: when a crash mid-send left it unknown
)
Index("ix_deliveries_queued", deliveries.c.id, postgresql_where=deliveries.c.state == "queued")
Index("ix_deliveries_provider_message_id", deliveries.c.provider, deliveries.c.provider_message_id)
Index("ix_deliveries_customer_id", deliveries.c.customer_id)
Index(
    "ix_deliveries_unknown",
    deliveries.c.unknown_since,
    postgresql_where=deliveries.c.unknown_since.is_not(None),
)
Index(
    "ix_deliveries_sending",
    deliveries.c.updated_at,
    postgresql_where=deliveries.c.state == "sending",
)

# The message log (migration 0007): each send attempt's result and each provider event matched
# to a delivery, for GET /v1/customers/{id}/messages (services/dispatcher/queries/messages.py).
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "delivery_id", BigInteger, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False
    ),
    Column("attempt", Integer, nullable=False),
    Column("provider", String(30)),
    Column("provider_message_id", String(200)),
    # sent | requeued | failed: what the attempt left the delivery as
    Column("outcome", String(12), nullable=False),
    # accepted | retryable | rejected | unknown (the send's fate is not known: a crash mid-send)
    Column("response_class", String(12), nullable=False),
    Column("error", Text),
    _tz("finished_at", nullable=False),
)
Index("ix_delivery_attempts_delivery_id", delivery_attempts.c.delivery_id)

delivery_events = Table(
    "delivery_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "delivery_id", BigInteger, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False
    ),
    Column("provider", String(30), nullable=False),
    Column("event_id", Text, nullable=False),
    # delivered | opened | clicked | bounced | complained | failed | unsubscribed
    Column("kind", String(20), nullable=False),
    Column("reason", Text),
    _tz("occurred_at"),
    _tz("received_at", nullable=False),
    UniqueConstraint("delivery_id", "provider", "event_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("channel", String(10), nullable=False),
    Column("address_hash", String(64), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("customer_id", String(200)),
    _tz("created_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("channel", "address_hash"),
)
