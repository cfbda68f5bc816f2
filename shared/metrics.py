"""Prometheus metrics shared by every service (each service adds its own beside these)."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, Info


def package_version() -> str:
    """The installed winback package's version (``0+unknown`` when run from sources that
    were never installed)."""
    try:
        return metadata.version("winback")
    except metadata.PackageNotFoundError:
        return "0+unknown"


BUILD_INFO = Info(
    "winback_build",
    "The running build: winback's version and the Python it runs on (always 1)",
)
BUILD_INFO.info(
    {
        "version": package_version(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }
)

EVENTS = Counter(
    "winback_events_consumed_total",
    "Events consumed, by consumer, event type and result (handled, duplicate)",
    ["consumer", "type", "result"],
)
DEAD_LETTERS = Counter(
    "winback_dead_letters_total",
    "Records sent to the dead-letter topic, by consumer and error code",
    ["consumer", "code"],
)
BATCH_SECONDS = Histogram(
    "winback_batch_handling_seconds",
    "Time to run one consume→transact→emit transaction",
    ["consumer"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "winback_consumer_lag_records",
    "Records between the consumer position and the end of the partition",
    ["consumer", "topic", "partition"],
)
OUTBOX_BACKLOG = Gauge(
    "winback_outbox_backlog", "Outbox rows waiting to be published (parked rows not counted)"
)
OUTBOX_OLDEST_AGE = Gauge(
    "winback_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row"
)
OUTBOX_PUBLISHED = Counter("winback_outbox_published_total", "Outbox rows published", ["topic"])
OUTBOX_PARKED = Counter(
    "winback_outbox_parked_total",
    "Outbox rows parked — never to be published as they are: refused by the broker for good "
    "or over its limits when written — by topic and reason (record_too_large, invalid_topic, "
    "invalid_record)",
    ["topic", "reason"],
)
OUTBOX_PARKED_ROWS = Gauge(
    "winback_outbox_parked_rows", "Outbox rows parked (parked_at set), waiting for an operator"
)
HTTP_EVENTS = Counter("winback_http_events_total", "Events posted over HTTP, by result", ["result"])
RETENTION_PRUNED = Counter(
    "winback_retention_pruned_rows_total",
    "Rows deleted by the retention job, by table (inbox, outbox)",
    ["table"],
)
RETRIES = Counter(
    "winback_retries_total",
    "Attempts retried after a failure worth retrying (shared.retry), by operation",
    ["operation"],
)
UNIT_OF_WORK_SECONDS = Histogram(
    "winback_unit_of_work_seconds",
    "Time from begin to commit (or rollback) of one unit of work, by unit",
    ["unit"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UNITS_OF_WORK = Counter(
    "winback_units_of_work_total",
    "Units of work ended, by unit and outcome: committed, rolled_back (an exception), "
    "transient (rolled back by a failure worth retrying)",
    ["unit", "outcome"],
)
