"""``winback simulate``: what would this customer get, and when? The answer of
``POST /v1/simulate`` as a table (or ``--json``), computed here with the configured playbooks,
content and guardrails. ``--customer`` reads the scheduler's database (the embedded one when no
``database.url`` is set, as ``winback migrate`` does); an inline ``--profile`` and ``--churn``
need no database. Exit codes: 0 answered, 2 a bad option (the field named), 4 no such
customer, 69 the database does not answer."""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # the command's modules load when it runs, not with every winback command
    from services.scheduler.simulate import SimulateIn, SimulationOut
    from shared.settings import Settings

EXIT_USAGE = 2
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 69


def add_parser(sub: Any) -> None:
    """Add ``simulate`` to the ``winback`` parser's subparsers."""
    p = sub.add_parser(
        "simulate",
        help="what would this customer get, and when? playbook, holdout, each step's time "
        "(UTC and local) and what the guardrails do then; nothing is written",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", metavar="ID", help="a known customer (reads the database)")
    who.add_argument(
        "--profile",
        metavar="JSON",
        help='an inline customer: {"timezone": "Europe/Helsinki", "engagement": "high", '
        '"mrr_minor": 2900, "currency": "EUR", "consent": {"email": true}, ...}',
    )
    p.add_argument(
        "--churn",
        metavar="JSON",
        help='the churn: {"kind": "subscription_cancelled", "reason": "price", '
        '"occurred_at": "2026-03-02T01:00:00Z", ...} (with --customer: instead of their last)',
    )
    p.add_argument("--from", dest="start", metavar="DATE", help="show steps due from this day")
    p.add_argument("--until", metavar="DATE", help="show steps due up to this day")
    p.add_argument(
        "--now",
        metavar="TIME",
        help="when the churn is recorded (default: a recorded churn's, else now)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def _json(text: str, option: str) -> Any:
    from services.scheduler.simulate import InvalidRequest

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(option, f"not valid JSON: {exc}") from None


def body_of(args: argparse.Namespace) -> SimulateIn:
    """The request the options describe.

    Raises:
        InvalidRequest: an option is not valid (named as the API names the field).
    """
    from pydantic import ValidationError

    from services.scheduler.simulate import InvalidRequest, SimulateIn

    body: dict[str, Any] = {}
    if args.customer is not None:
        body["customer_id"] = args.customer
    if args.profile is not None:
        body["profile"] = _json(args.profile, "--profile")
    if args.churn is not None:
        body["churn"] = _json(args.churn, "--churn")
    for option, value in (("from", args.start), ("until", args.until), ("now", args.now)):
        if value is not None:
            body[option] = value
    try:
        return SimulateIn.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "request"
        raise InvalidRequest(field, error["msg"]) from None


async def _answer(settings: Settings, body: SimulateIn) -> SimulationOut:
    from services.scheduler.bootstrap import load
    from services.scheduler.simulate import run_simulation
    from services.scheduler.views import policy
    from shared.db.engine import make_engine

    playbooks = load(settings)
    rules = policy(settings.scheduler)
    now = datetime.now(UTC)
    if body.customer_id is None:
        return await run_simulation(None, body, playbooks, rules, now)
    engine = make_engine(settings.database.url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return await run_simulation(conn, body, playbooks, rules, now)
    finally:
        await engine.dispose()


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``winback simulate ...``; the exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.scheduler.simulate import InvalidRequest, UnknownCustomer, render_table

    try:
        body = body_of(args)
        with ExitStack() as stack:
            if body.customer_id is not None and not settings.database.url:
                from shared.local.embedded import with_local_database

                settings = with_local_database(settings, stack)
            out = asyncio.run(_answer(settings, body))
    except InvalidRequest as exc:
        print(f"winback simulate: {exc.field}: {exc.reason}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownCustomer as exc:
        print(f"winback simulate: no customer {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OSError, SQLAlchemyError) as exc:
        where = _safe(settings.database.url)
        line = f"winback simulate: the database at {where} does not answer: {exc}"
        print(line.splitlines()[0][:500], file=sys.stderr)
        return EXIT_UNAVAILABLE
    sys.stdout.write(out.model_dump_json(indent=2) + "\n" if args.json else render_table(out))
    return 0


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(the configured database)"
