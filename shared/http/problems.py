"""RFC 9457 problem+json answers for every error an API returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.errors import TransientError
from shared.logging import throttled
from shared.retry import is_transient

log = logging.getLogger(__name__)
_unreachable = throttled(log)
PROBLEM = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"


class FieldError(BaseModel):
    """One thing wrong with the request: where (a dotted path: ``data.customer.phone``,
    ``[1].data.customer_id``, a parameter's name) and why."""

    model_config = ConfigDict(extra="allow")

    field: str
    reason: str
    code: str | None = Field(default=None, description="machine-readable reason, when there is one")


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: the body of every error answer (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(description="a URI reference naming the kind of problem; about:blank if none")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str | None = None
    instance: str | None = Field(default=None, description="the request path")
    errors: list[FieldError] | None = Field(
        default=None, description="each field that is wrong, when the request is not valid"
    )


# what each error status means wherever it is not described more precisely
DESCRIPTIONS: dict[int, str] = {
    400: "not the expected payload shape",
    401: "no API key, or one this service does not know (or a missing or bad signature)",
    403: "the API key lacks the scope this operation needs; the scope is named",
    404: "not found",
    405: "method not allowed",
    409: "conflicts with the resource's state",
    413: "request too large",
    415: "unsupported content type",
    422: "a parameter or the body is not valid; the field is named",
    503: "a dependency (database, broker) is unreachable; try again (Retry-After)",
}


def problems(*statuses: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status answered with a problem. A description given as
    ``_404="no such case"`` replaces the standard one."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        text = described.get(f"_{status}", DESCRIPTIONS.get(status, "error"))
        out[status] = {"description": f"{text} (problem+json)"}
    return out


# paths that touch no database or broker: they never answer 503
NO_DEPENDENCIES = frozenset({"/health", "/metrics"})


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document say what the API really answers on errors: every 4xx/5xx
    response is ``application/problem+json`` with the one ``Problem`` schema (FastAPI's own 422
    ``HTTPValidationError`` goes), an operation behind the bearer token documents 401 and
    403, and every operation but the probes that need nothing documents 503 (a dependency
    unreachable). Idempotent."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    content = {PROBLEM: {"schema": {"$ref": PROBLEM_REF}}}
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if path not in NO_DEPENDENCIES:
                responses.setdefault("503", {"description": f"{DESCRIPTIONS[503]} (problem+json)"})
            if "requestBody" in operation:
                responses.setdefault("400", {"description": "the body cannot be parsed"})
            if any("HTTPBearer" in requirement for requirement in operation.get("security", [])):
                for auth in (401, 403):
                    responses.setdefault(
                        str(auth), {"description": f"{DESCRIPTIONS[auth]} (problem+json)"}
                    )
            for status, response in responses.items():
                if status[:1] in ("4", "5"):
                    response["content"] = dict(content)
                    if response.get("description") == "Validation Error":
                        response["description"] = f"{DESCRIPTIONS[422]} (problem+json)"
    text = repr(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}'" not in text:
            components.pop(unused, None)
    return schema


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        type: str = "about:blank",
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.errors = errors
        self.headers = headers


def invalid_field(field: str, reason: str) -> Problem:
    """The 422 problem+json naming one field of the request (the shape request validation
    answers with)."""
    return Problem(
        422,
        "Request is not valid",
        f"field {field}: {reason}",
        type="/problems/validation",
        errors=[{"field": field, "reason": reason}],
    )


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": problem.type, "title": problem.title, "status": problem.status}
    if problem.detail:
        body["detail"] = problem.detail
    if instance:
        body["instance"] = instance
    if problem.errors:
        body["errors"] = problem.errors
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM, headers=problem.headers
    )


def _pointer(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


def install(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"field": _pointer(tuple(e["loc"])), "reason": e["msg"]} for e in exc.errors()]
        first = errors[0]["field"] if errors else "request"
        return problem_response(
            Problem(
                422,
                "Request is not valid",
                f"field {first}: {errors[0]['reason']}" if errors else None,
                type="/problems/validation",
                errors=errors,
            ),
            request.url.path,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route on the path; say every method it has
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(
            Problem(exc.status_code, str(exc.detail), headers=headers), request.url.path
        )

    async def on_unreachable(request: Request, exc: Exception) -> JSONResponse:
        # a database or broker outage while answering: 503 (try again), not a 500; anything
        # else is a bug and goes on to the server error handler
        if not is_transient(exc):
            raise exc
        _unreachable.warning(
            "a request failed: a dependency is unreachable",
            extra={"path": request.url.path, "error": repr(exc)[:500]},
        )
        return problem_response(
            Problem(
                503,
                "Service unavailable",
                "a dependency is unreachable; try again",
                type="/problems/unavailable",
                headers={"Retry-After": "1"},
            ),
            request.url.path,
        )

    app.add_exception_handler(Problem, on_problem)
    for transient in (DBAPIError, OSError, TransientError):
        app.add_exception_handler(transient, on_unreachable)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
