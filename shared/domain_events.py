"""Names of the events winback publishes between its own services (CloudEvent types).

Each one's data model, topic, producer and consumers: ``shared.contracts.registry``."""

from __future__ import annotations

PREFIX = "dev.winback"

# ingest → scheduler (topic: topics.domain), keyed by customer id (feature id for releases)
CHURN_RECORDED = f"{PREFIX}.churn.recorded"
CUSTOMER_RETURNED = f"{PREFIX}.customer.returned"
CUSTOMER_ACTIVITY = f"{PREFIX}.customer.activity"
CUSTOMER_UPDATED = f"{PREFIX}.customer.updated"
CONSENT_CHANGED = f"{PREFIX}.consent.changed"
FEATURE_RELEASED = f"{PREFIX}.feature.released"
FEEDBACK_RECEIVED = f"{PREFIX}.feedback.received"
ISSUE_RESOLVED = f"{PREFIX}.issue.resolved"
COMPETITOR_CHANGED = f"{PREFIX}.competitor.changed"
# scheduler → every service (topic: topics.erasure)
CUSTOMER_ERASED = f"{PREFIX}.customer.erased"

# scheduler → dispatcher (topic: topics.dispatch)
DISPATCH_REQUESTED = f"{PREFIX}.dispatch.requested"
# scheduler → everyone (topic: topics.outcomes)
CASE_WON_BACK = f"{PREFIX}.case.won_back"
CASE_OPENED = f"{PREFIX}.case.opened"
CASE_CLOSED = f"{PREFIX}.case.closed"
CASE_MIGRATED = f"{PREFIX}.case.migrated"

# dispatcher → everyone (topic: topics.outcomes)
MESSAGE_SENT = f"{PREFIX}.message.sent"
MESSAGE_FAILED = f"{PREFIX}.message.failed"
MESSAGE_SUPPRESSED = f"{PREFIX}.message.suppressed"
MESSAGE_DELIVERED = f"{PREFIX}.message.delivered"
MESSAGE_OPENED = f"{PREFIX}.message.opened"
MESSAGE_CLICKED = f"{PREFIX}.message.clicked"
MESSAGE_BOUNCED = f"{PREFIX}.message.bounced"
MESSAGE_COMPLAINED = f"{PREFIX}.message.complained"
MESSAGE_OUTCOMES = (
    MESSAGE_SENT,
    MESSAGE_FAILED,
    MESSAGE_SUPPRESSED,
    MESSAGE_DELIVERED,
    MESSAGE_OPENED,
    MESSAGE_CLICKED,
    MESSAGE_BOUNCED,
    MESSAGE_COMPLAINED,
)
"""Every ``message.*`` type: what happened to a message (the sender's, then the providers')."""
CUSTOMER_UNSUBSCRIBED = f"{PREFIX}.customer.unsubscribed"
