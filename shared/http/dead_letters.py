"""``/v1/dead-letters``: the dead-letter topic for operators' tools, over
``shared.messaging.dlq`` (the ``winback dlq`` command does the same from a shell).

- ``GET /v1/dead-letters``: filtered by error code, source topic, consumer and time, newest
  first;
- ``GET /v1/dead-letters/{id}``: one, with its headers, reason and value;
- ``POST /v1/dead-letters/redrive``: publish the originals again to their source topics
  (``dry_run`` first to see what would go).

Reads start from the topic's beginning with a reader that joins no group and commits nothing.
Mounted on ingest (``services/ingest/bootstrap.py``); every service dead-letters to the same
topic, so one service shows them all.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, params
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from shared.errors import TransientError
from shared.http.problems import Problem, problems
from shared.http.types import IsoDateTime
from shared.messaging import dlq
from shared.messaging.transport import Transport

MAX_LIST = 1000


def _string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string")  # not a Unix time
    return value


BodyTime = Annotated[IsoDateTime, BeforeValidator(_string)]
ID_PATTERN = r"^[A-Za-z0-9._-]{1,249}:[0-9]{1,10}:[0-9]{1,19}$"


class DeadLetterList(BaseModel):
    dead_letters: list[dlq.DeadLetterSummary] = Field(description="newest first")
    matched: int = Field(description="how many match the filters (more than listed past limit)")


class DeadLetterFilters(BaseModel):
    """Which dead letters; an empty list means any."""

    model_config = ConfigDict(extra="forbid")

    codes: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=100, description="error codes, e.g. malformed_json"
    )
    source_topics: list[Annotated[str, Field(max_length=249)]] = Field(
        default_factory=list, max_length=100
    )
    consumers: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=100
    )
    ids: list[Annotated[str, Field(max_length=300)]] = Field(
        default_factory=list, max_length=10_000, description="dead-letter ids"
    )
    since: BodyTime | None = Field(default=None, description="dead-lettered at or after")
    until: BodyTime | None = Field(default=None, description="dead-lettered before")


class RedriveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filters: DeadLetterFilters = Field(default_factory=DeadLetterFilters)
    dry_run: bool = Field(
        default=False, strict=True, description="say what would be redriven, publish nothing"
    )


def _unavailable(exc: Exception) -> Problem:
    return Problem(503, "Broker unavailable", f"the dead-letter topic cannot be read: {exc}"[:300])


def _dependency(guard: Any) -> Any:
    return guard if isinstance(guard, params.Depends) else Depends(guard)


def router(transport: Transport, topic: str, read: Any, operate: Any) -> APIRouter:
    """``read`` guards the listing and ``operate`` the redrive: API-key dependencies (a
    ``Depends``/``Security`` such as ``require_scope("operate")``, or a callable)."""
    api = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])
    read, operate = _dependency(read), _dependency(operate)
    reader = dlq.reader_for(transport)

    @api.get(
        "",
        operation_id="listDeadLetters",
        summary="List dead letters, newest first",
        dependencies=[read],
        responses=problems(422, 503),
    )
    async def list_dead_letters(
        code: Annotated[list[str] | None, Query(description="error code (repeatable)")] = None,
        source_topic: Annotated[
            list[str] | None, Query(description="topic it came from (repeatable)")
        ] = None,
        consumer: Annotated[
            list[str] | None, Query(description="consumer that dead-lettered it (repeatable)")
        ] = None,
        since: Annotated[IsoDateTime | None, Query(description="dead-lettered at or after")] = None,
        until: Annotated[IsoDateTime | None, Query(description="dead-lettered before")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    ) -> DeadLetterList:
        filters = dlq.filters_of(code or (), source_topic or (), consumer or (), (), since, until)
        try:
            found = await dlq.scan(reader, topic, filters)
        except TransientError as exc:
            raise _unavailable(exc) from None
        return DeadLetterList(
            dead_letters=[dlq.summary(letter) for letter in found[:limit]], matched=len(found)
        )

    @api.api_route("/redrive", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def redrive_other_methods() -> None:
        # without it GET /redrive would be read as the dead letter called "redrive"
        raise Problem(405, "Method Not Allowed", headers={"Allow": "POST"})

    @api.get(
        "/{letter_id}",
        operation_id="getDeadLetter",
        summary="One dead letter: headers, reason and value",
        dependencies=[read],
        responses=problems(404, 422, 503, _404="no such dead letter"),
    )
    async def get_dead_letter(
        letter_id: Annotated[
            str,
            Path(
                max_length=300,
                pattern=ID_PATTERN,
                description="<dead-letter topic>:<partition>:<offset>",
            ),
        ],
    ) -> dlq.DeadLetterDetail:
        try:
            letter = await dlq.show(reader, topic, letter_id)
        except dlq.BadId:
            letter = None  # of the form, but past any partition or offset there can be
        except TransientError as exc:
            raise _unavailable(exc) from None
        if letter is None:
            raise Problem(404, "Not found", f"no dead letter {letter_id[:300]!r} on {topic}")
        return dlq.detail(letter)

    @api.post(
        "/redrive",
        operation_id="redriveDeadLetters",
        summary="Publish dead letters' original records again to their source topics",
        description="Each matching dead letter's key, value and original headers go back to "
        "the topic it came from, with `winback-redrive-of: <id>`; the consumers' inboxes drop "
        "what they already handled. A dead letter stored truncated is not redriven "
        "(`not_redrivable`); one whose earlier redrive failed again is `superseded` by the "
        "newer dead letter. `dry_run` publishes nothing.",
        dependencies=[operate],
        responses=problems(422, 503),
    )
    async def redrive_dead_letters(body: RedriveRequest) -> dlq.RedriveReportModel:
        f = body.filters
        filters = dlq.filters_of(f.codes, f.source_topics, f.consumers, f.ids, f.since, f.until)
        try:
            report = await dlq.redrive_with(transport, topic, filters, dry_run=body.dry_run)
        except TransientError as exc:
            raise _unavailable(exc) from None
        return dlq.report_model(report)

    return api
