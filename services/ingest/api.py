"""POST /v1/events: the same CloudEvents over HTTP, for billing systems that cannot produce
to Kafka. Structured (one event or a JSON array batch) or binary (``ce-`` headers) mode.
All-or-nothing: one bad event rejects the request with a problem+json naming it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.ingest.openapi import request_body
from services.ingest.openapi_examples import with_examples
from shared import metrics
from shared.cloudevents import from_json_dict, loads
from shared.errors import InvalidEvent
from shared.http.auth import require_scope
from shared.http.problems import Problem
from shared.messaging.pipeline import Incoming, Pipeline

log = logging.getLogger(__name__)


class Accepted(BaseModel):
    accepted: int
    duplicates: int


def _binary_event(request: Request, body: bytes) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        name[3:].lower(): value
        for name, value in request.headers.items()
        if name.lower().startswith("ce-")
    }
    content_type = request.headers.get("content-type")
    if content_type:
        attrs["datacontenttype"] = content_type
    if body:
        attrs["data"] = loads(body)
    return attrs


def router(
    pipeline: Pipeline,
    max_bytes: int,
    batch_limit: int,
    type_prefix: str = "com.example",
) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["events"], dependencies=[require_scope("ingest")])

    @api.post(
        "/events",
        status_code=202,
        response_model=Accepted,
        summary="Submit one CloudEvent or a batch (JSON array); 202 once stored",
        operation_id="postEvents",
        responses={
            # 401/403 (API key, scope ingest) and 503 are added by document_problems
            413: {"description": "request too large (problem+json)"},
            422: {"description": "an event is not valid; the field is named (problem+json)"},
        },
        openapi_extra=with_examples(request_body(type_prefix, batch_limit), type_prefix),
    )
    async def post_events(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > max_bytes * min(batch_limit, 64):
            raise Problem(413, "Request too large", f"{len(body)} bytes")
        try:
            if "ce-specversion" in request.headers:
                raw: list[Any] = [_binary_event(request, body)]
                prefix = ""
            else:
                parsed = loads(body)
                raw = parsed if isinstance(parsed, list) else [parsed]
                prefix = "" if not isinstance(parsed, list) else "[]"
        except InvalidEvent as exc:
            metrics.HTTP_EVENTS.labels("rejected").inc()
            raise _problem(exc, "body") from None
        if not raw:
            raise Problem(422, "Empty batch", "the batch holds no events")
        if len(raw) > batch_limit:
            raise Problem(413, "Batch too large", f"at most {batch_limit} events per request")
        items: list[Incoming[Any]] = []
        for index, obj in enumerate(raw):
            where = f"[{index}]" if prefix else ""
            try:
                size = len(str(obj))
                if size > max_bytes:
                    raise InvalidEvent("oversize", f"event is over {max_bytes} bytes")
                event = from_json_dict(obj)
                items.append(pipeline.decode_payload(event, None, None))
            except InvalidEvent as exc:
                metrics.HTTP_EVENTS.labels("rejected").inc()
                raise _problem(exc, where) from None
            except Exception as exc:
                # a bug meeting input it did not expect: still the client's event at fault
                log.warning(
                    "an event failed decoding unexpectedly",
                    extra={"error_type": type(exc).__name__, "field": where or "body"},
                )
                metrics.HTTP_EVENTS.labels("rejected").inc()
                error = InvalidEvent("decode_error", f"{type(exc).__name__}: {exc}")
                raise _problem(error, where) from None
        result = await pipeline.transact_reliably(items)
        metrics.HTTP_EVENTS.labels("accepted").inc(len(items))
        return JSONResponse(
            {"accepted": result.handled, "duplicates": result.duplicates}, status_code=202
        )

    return api


def _problem(exc: InvalidEvent, where: str) -> Problem:
    field = f"{where}.{exc.field}" if where and exc.field else (exc.field or where or "body")
    field = field.lstrip(".")
    return Problem(
        422,
        "Invalid event",
        f"{field}: {exc.reason}",
        type=f"/problems/{exc.code.replace('_', '-')}",
        errors=[{"field": field, "reason": exc.reason, "code": exc.code}],
    )
