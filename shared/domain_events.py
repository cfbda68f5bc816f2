"""Names of the events winback publishes between its own services (CloudEvent types)."""

from __future__ import annotations

PREFIX = "dev.winback"

# ingest → scheduler (topic: topics.domain), keyed by customer id (feature id for releases)
CHURN_RECORDED = f"{PREFIX}.churn.recorded"
CUSTOMER_RETURNED = f"{PREFIX}.customer.returned"
CUSTOMER_ACTIVITY = f"{PREFIX}.customer.activity"
CUSTOMER_UPDATED = f"{PREFIX}.customer.updated"
CONSENT_CHANGED = f"{PREFIX}.consent.changed"
FEATURE_RELEASED = f"{PREFIX}.feature.released"
CUSTOMER_ERASED = f"{PREFIX}.customer.erased"

# scheduler → dispatcher (topic: topics.dispatch)
DISPATCH_REQUESTED = f"{PREFIX}.dispatch.requested"
CASE_WON_BACK = f"{PREFIX}.case.won_back"
CASE_OPENED = f"{PREFIX}.case.opened"
CASE_CLOSED = f"{PREFIX}.case.closed"
CASE_MIGRATED = f"{PREFIX}.case.migrated"

# dispatcher → everyone (topic: topics.outcomes)
MESSAGE_SENT = f"{PREFIX}.message.sent"
MESSAGE_FAILED = f"{PREFIX}.message.failed"
MESSAGE_SUPPRESSED = f"{PREFIX}.message.suppressed"
CUSTOMER_UNSUBSCRIBED = f"{PREFIX}.customer.unsubscribed"
