"""The dispatcher's Prometheus metrics (beside the shared consume/outbox ones)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.dispatcher.resilience import CircuitState

MESSAGES = Counter(
    "winback_dispatcher_messages_total",
    "Messages by channel, provider and outcome (sent, failed, suppressed, requeued, held; "
    "unknown: a crash mid-send left it to reconciliation)",
    ["channel", "provider", "outcome"],
)
PROVIDER_SECONDS = Histogram(
    "winback_dispatcher_provider_request_seconds",
    "Provider API call latency, by channel and provider",
    ["channel", "provider"],
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROVIDER_ERRORS = Counter(
    "winback_dispatcher_provider_errors_total",
    "Failed provider calls, by channel, provider and kind (transient, permanent, "
    "configuration, circuit_open)",
    ["channel", "provider", "kind"],
)
RETRIES = Counter(
    "winback_dispatcher_provider_retries_total",
    "Calls that repeated an earlier call for the same message to the same provider",
    ["channel", "provider"],
)
CIRCUIT_STATE = Gauge(
    "winback_dispatcher_circuit_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
    ["channel", "provider"],
)
WEBHOOK_SIGNATURE_FAILURES = Counter(
    "winback_dispatcher_webhook_signature_failures_total",
    "Webhook requests refused for a bad, missing or stale signature, by provider and reason",
    ["provider", "reason"],
)
WEBHOOK_EVENTS = Counter(
    "winback_dispatcher_webhook_events_total",
    "Provider webhook events, by provider and result (handled, duplicate, unmatched, ignored)",
    ["provider", "result"],
)
UNSUBSCRIBES = Counter(
    "winback_dispatcher_unsubscribes_total",
    "Unsubscribe requests, by method (one_click, page) and result (accepted, rejected)",
    ["method", "result"],
)
DELIVERIES = Gauge(
    "winback_dispatcher_deliveries",
    "Deliveries waiting (queued), handed to a provider (sending) or left unknown by a crash",
    ["state"],
)
DELIVERIES_UNKNOWN = Gauge(
    "winback_deliveries_unknown",
    "Deliveries whose send outcome a crash left unknown, waiting for reconciliation",
)
RECONCILED = Counter(
    "winback_reconciled_total",
    "Unknown deliveries settled, by outcome: webhook, resend, search (confirmed sent) or "
    "unconfirmed (failed when the window passed)",
    ["outcome"],
)

STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
