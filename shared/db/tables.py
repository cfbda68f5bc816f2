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
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
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
)
Index(
    "ix_outbox_unpublished",
    outbox.c.id,
    postgresql_where=outbox.c.published_at.is_(None),
)
Index("ix_outbox_published_at", outbox.c.published_at)

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
    Column("status", String(20), nullable=False),
    Column("lifecycle", String(20), nullable=False),
    _tz("lifecycle_at", nullable=False),
    Column("activity", String(20), nullable=False),
    _tz("activity_at", nullable=False),
    Column("profile_times", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("consent", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("opted_out_all", Boolean, nullable=False, server_default=text("false")),
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
