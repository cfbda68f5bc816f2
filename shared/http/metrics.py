"""HTTP request metrics of every service, as a pure ASGI middleware (no per-request objects
beyond a closure; ``BaseHTTPMiddleware`` would wrap each request in a task and streams).

``winback_http_requests_total{method,route,status}`` and
``winback_http_request_duration_seconds{method,route}`` (a histogram), by route template
(``/v1/customers/{customer_id}/winback``, never the raw path: one series per route, not per
customer). Nothing is excluded — probes and ``/metrics`` count too. A request no route matches
is counted with ``route="<unmatched>"``; a method outside the standard ones with
``method="OTHER"`` (a client cannot make new series)."""

from __future__ import annotations

import time
from typing import Any, Final

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED: Final = "<unmatched>"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "winback_http_requests_total",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "winback_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def route_of(scope: Scope) -> str:
    """The template of the route that took the request (Starlette puts it in the scope),
    ``<unmatched>`` when none did."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class RequestMetrics:
    """Counts every HTTP request and times it; a request whose handler raised before it
    answered counts as a 500 (what the server error middleware outside this one sends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            route = route_of(scope)
            REQUESTS.labels(method, route, str(status)).inc()
            DURATION.labels(method, route).observe(time.perf_counter() - start)
