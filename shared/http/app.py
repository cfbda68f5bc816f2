"""The FastAPI app every service starts from: /health, /ready, /metrics, problem+json."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from shared.http.problems import Problem, install

ReadinessCheck = tuple[str, Callable[[], Awaitable[None]]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

_bearer = HTTPBearer(auto_error=False)


def create_app(
    title: str,
    checks: Sequence[ReadinessCheck],
    routers: Sequence[APIRouter] = (),
    lifespan: Callable[[FastAPI], AsyncIterator[None]] | Lifespan | None = None,
    version: str = "0.1.0",
) -> FastAPI:
    app = FastAPI(title=title, version=version, lifespan=lifespan)  # type: ignore[arg-type]
    install(app)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["ops"],
        summary="Readiness: the database and Kafka are reachable",
        responses={503: {"description": "a dependency is unreachable (problem+json)"}},
    )
    async def ready() -> Response:
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
        return JSONResponse({"status": "ready", "checks": [name for name, _ in checks]})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (text format)")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


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
