"""The FastAPI app every service starts from: /health, /ready, /metrics, problem+json."""

from __future__ import annotations

import hmac
import types
import typing
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, SecretStr

from shared.http.problems import Problem, document_problems, install, problems

ReadinessCheck = tuple[str, Callable[[], Awaitable[None]]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

_bearer = HTTPBearer(auto_error=False)


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: list[str]


def create_app(
    title: str,
    checks: Sequence[ReadinessCheck],
    routers: Sequence[APIRouter] = (),
    lifespan: Callable[[FastAPI], AsyncIterator[None]] | Lifespan | None = None,
    version: str = "0.1.0",
) -> FastAPI:
    app = FastAPI(
        title=title,
        version=version,
        lifespan=lifespan,  # type: ignore[arg-type]
        dependencies=[Depends(single_valued_query)],
    )
    install(app)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # every error answer documented as problem+json with the one Problem schema
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(_hoist_defs(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> Health:
        return Health(status="ok")

    @app.get(
        "/ready",
        tags=["ops"],
        summary="Readiness: the database and Kafka are reachable",
        responses=problems(503),
    )
    async def ready() -> Readiness:
        failures = []
        for name, check in checks:
            try:
                await check()
            except Exception as exc:
                failures.append({"field": name, "reason": f"{type(exc).__name__}: {exc}"[:300]})
        if failures:
            raise Problem(
                503,
                "Not ready",
                "; ".join(f"{f['field']}: {f['reason']}" for f in failures),
                errors=failures,
            )
        return Readiness(status="ready", checks=[name for name, _ in checks])

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics (text format)",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


async def single_valued_query(request: Request) -> None:
    """A query parameter that takes one value, given twice, is a 422 naming it (FastAPI would
    quietly keep the last one)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    counts = Counter(key for key, _ in request.query_params.multi_items())
    for param in route.dependant.query_params:
        if counts[param.alias] > 1 and not _takes_many(param.field_info.annotation):
            raise Problem(
                422,
                "Request is not valid",
                f"field {param.alias}: given more than once",
                type="/problems/validation",
                errors=[{"field": param.alias, "reason": "given more than once"}],
            )


def _takes_many(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _takes_many(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_many(arg) for arg in typing.get_args(annotation))
    return origin in (list, tuple, set, frozenset) or (
        isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
    )


def bearer_auth(keys: Sequence[SecretStr]) -> Callable[..., Awaitable[None]]:
    """A dependency checking ``Authorization: Bearer <key>`` in constant time."""
    secrets = [k.get_secret_value().encode() for k in keys]

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(
                401,
                "Unauthorized",
                "a bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = credentials.credentials.encode()
        ok = False
        for secret in secrets:
            ok |= hmac.compare_digest(given, secret)
        if not ok:
            raise Problem(403, "Forbidden", "the bearer token is not valid")

    return check


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
