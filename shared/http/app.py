"""The FastAPI app every service starts from: /health, /ready, /metrics, problem+json, scoped
bearer keys, HTTP request metrics and an OpenAPI document with operation ids chosen by hand."""

from __future__ import annotations

import logging
import re
import types
import typing
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, SecretStr
from starlette.routing import BaseRoute

from shared.http.auth import SCHEME, install_keys, scope_sentence
from shared.http.metrics import RequestMetrics
from shared.http.problems import Problem, document_problems, install, invalid_field, problems
from shared.logging import throttled
from shared.settings import ApiKey

__all__ = ["create_app", "operation_id"]

ReadinessCheck = tuple[str, Callable[[], Awaitable[None]]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4"
"""The Prometheus text exposition format, as documented (served with ``; charset=utf-8``)."""
UNREACHABLE: Final = "unreachable"
log = logging.getLogger(__name__)
_not_ready = throttled(log)

TAGS: Final = {
    "events": "Lifecycle events in, as CloudEvents (the same as over Kafka).",
    "billing": "Billing systems' own webhooks (Stripe, Paddle, Chargebee), verified by their "
    "signatures.",
    "dead letters": "Records a consumer could not handle: list, look, send back after a fix.",
    "win-back status": "A customer's win-back state, the cases and their controls, GDPR erasure.",
    "playbooks": "The loaded playbooks and what they would do for a customer.",
    "reports": "Measured results: reactivation and lift over the holdout, engagement, cohorts.",
    "messages": "What was sent to a customer and what the provider said.",
    "content": "Message previews and test sends.",
    "webhooks": "Delivery providers' event webhooks, verified by their signatures.",
    "unsubscribe": "The unsubscribe link in every message (its token is the authentication).",
    "ops": "Probes and metrics.",
}
"""Each tag's description, in the document's ``tags`` (only the tags a service uses)."""


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: list[str]


def operation_id(route: BaseRoute) -> str:
    """A route's OpenAPI operation id: its function name in camelCase (``list_cases`` →
    ``listCases``); a route whose function name would not say what it does sets
    ``operation_id=`` itself, which FastAPI uses instead of this."""
    name = getattr(route, "name", None) or "operation"
    first, *rest = [part for part in re.split(r"[^0-9A-Za-z]+", name) if part]
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def create_app(
    title: str,
    checks: Sequence[ReadinessCheck],
    routers: Sequence[APIRouter] = (),
    lifespan: Callable[[FastAPI], AsyncIterator[None]] | Lifespan | None = None,
    version: str = "0.1.0",
    api_keys: Iterable[ApiKey | SecretStr | str] = (),
) -> FastAPI:
    """The service's app; ``api_keys`` are the bearer keys (and their scopes) that routes
    declaring ``require_scope`` accept."""
    app = FastAPI(
        title=title,
        version=version,
        lifespan=lifespan,  # type: ignore[arg-type]
        dependencies=[Depends(single_valued_query)],
        generate_unique_id_function=operation_id,
    )
    install(app)
    install_keys(app, api_keys)
    app.add_middleware(RequestMetrics)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # every error answer documented as problem+json with the one Problem schema
        if app.openapi_schema is None:
            document = document_problems(_hoist_defs(generate()))
            app.openapi_schema = _check_operation_ids(_document_tags(_document_scopes(document)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get(
        "/health",
        tags=["ops"],
        summary="Liveness: the process answers",
        operation_id="getHealth",
    )
    async def health() -> Health:
        return Health(status="ok")

    @app.get(
        "/ready",
        tags=["ops"],
        summary="Readiness: the database and Kafka are reachable and start-up is done",
        description="503 names each dependency that is not ready (`errors[].field`: "
        "`database`, `kafka`) with a fixed reason: `start-up is waiting for <dependency>`, "
        "`start-up failed on <dependency>` or `unreachable`. What went wrong goes to the "
        "service's log, not to the caller.",
        operation_id="getReadiness",
        responses=problems(503),
    )
    async def ready() -> Readiness:
        failures = []
        for name, check in checks:
            try:
                await check()
            except Exception as exc:
                reason = _public_reason(exc)
                _not_ready.warning(
                    "readiness check failed",
                    extra={"dependency": name, "reason": reason, "error": repr(exc)[:500]},
                )
                failures.append({"field": name, "reason": reason})
        if failures:
            raise Problem(
                503,
                "Not ready",
                "; ".join(f"{f['field']}: {f['reason']}" for f in failures),
                type="/problems/not-ready",
                errors=failures,
            )
        return Readiness(status="ready", checks=[name for name, _ in checks])

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics (text exposition format 0.0.4)",
        operation_id="getMetrics",
        response_class=Response,
        responses={
            200: {
                "description": "the metrics, in the Prometheus text format",
                "content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    for router in routers:
        app.include_router(router)
    return app


def _public_reason(exc: Exception) -> str:
    """What ``/ready`` may tell anyone about a failed check: a fixed text an exception carries
    for the purpose (``public_reason``: start-up waiting for or failed on the dependency),
    else ``unreachable``; never the exception's own text (addresses, user names)."""
    reason = getattr(exc, "public_reason", None)
    return reason if isinstance(reason, str) and reason else UNREACHABLE


def _document_scopes(document: dict[str, Any]) -> dict[str, Any]:
    """Each operation behind a scoped key says so in its description as well as in its
    security requirement (``{"HTTPBearer": ["read"]}``)."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for requirement in operation.get("security", []):
                for scope in requirement.get(SCHEME, []):
                    sentence = scope_sentence(scope)
                    text = operation.get("description", "")
                    if sentence not in text:
                        operation["description"] = f"{text}\n\n{sentence}".strip()
    return document


def _document_tags(document: dict[str, Any]) -> dict[str, Any]:
    used: list[str] = []
    for item in document.get("paths", {}).values():
        for operation in item.values():
            for tag in operation.get("tags", []) if isinstance(operation, dict) else []:
                if tag not in used:
                    used.append(tag)
    document["tags"] = [
        {"name": tag, "description": TAGS[tag]} if tag in TAGS else {"name": tag} for tag in used
    ]
    return document


def _check_operation_ids(document: dict[str, Any]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue
            where = f"{method.upper()} {path}"
            other = seen.setdefault(operation["operationId"], where)
            if other != where:
                raise ValueError(
                    f"operation id {operation['operationId']!r} is used by {other} and {where}"
                )
    return document


async def single_valued_query(request: Request) -> None:
    """A query parameter that takes one value, given twice, is a 422 naming it (FastAPI would
    quietly keep the last one)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    counts = Counter(key for key, _ in request.query_params.multi_items())
    for param in route.dependant.query_params:
        if counts[param.alias] > 1 and not _takes_many(param.field_info.annotation):
            raise invalid_field(param.alias, "given more than once")


def _takes_many(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _takes_many(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_many(arg) for arg in typing.get_args(annotation))
    return origin in (list, tuple, set, frozenset) or (
        isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
    )


def _hoist_defs(document: dict[str, Any]) -> dict[str, Any]:
    """Move the ``$defs`` of schemas a route wrote itself (``openapi_extra``) into
    ``components/schemas`` and point their ``#/$defs/`` references there: in an OpenAPI
    document ``#`` is the document, not the schema."""
    components: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            for name, schema in (node.pop("$defs", None) or {}).items():
                schema = walk(schema)
                if components.setdefault(name, schema) != schema:
                    raise ValueError(f"two different schemas are called {name!r}")
            return {
                key: value.replace("#/$defs/", "#/components/schemas/")
                if key == "$ref" and isinstance(value, str)
                else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    document["paths"] = walk(document.get("paths", {}))
    return document
