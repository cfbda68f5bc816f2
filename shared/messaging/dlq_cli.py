"""``winback dlq list|show|redrive``: the dead-letter topic from a shell (``shared.messaging.dlq``;
the ingest service's ``/v1/dead-letters`` routes do the same over HTTP).

The broker is ``WINBACK_KAFKA__BOOTSTRAP_SERVERS``; without one, the in-process event bus file
of ``winback run`` (``.winback/bus.sqlite``) — which a running ``winback run`` holds, so then
ask its ingest API instead. The topic is ``WINBACK_TOPICS__DEAD_LETTER``.

Exit codes: 0 done; 1 a redrive left records unpublished (the broker refused them); 2 a
configuration that can never work, or a bad argument; 4 ``show``: no such dead letter; 69 the
broker (or the bus file) is not available.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson

from shared.errors import ConfigError, TransientError
from shared.messaging import dlq
from shared.messaging.transport import Transport
from shared.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 69

_AGO = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def when(text: str) -> datetime:
    """``2026-11-30T10:00:00Z`` (ISO 8601; no zone = UTC), ``2026-11-30``, or a time ago:
    ``30m``, ``6h``, ``7d``."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return datetime.now(UTC) - timedelta(**{_UNITS[ago[2]]: int(ago[1])})
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: ISO 8601 (2026-11-30T10:00:00Z) or ago (30m, 6h, 7d)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def add_parser(sub: Any) -> None:
    """Add ``dlq`` and its subcommands to the ``winback`` parser's subparsers."""
    d = sub.add_parser(
        "dlq",
        help="dead letters: list them, show one, redrive them to their source topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = d.add_subparsers(dest="dlq_command", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--code", action="append", default=[], help="error code (repeatable)")
        p.add_argument(
            "--source-topic", action="append", default=[], help="topic it came from (repeatable)"
        )
        p.add_argument(
            "--consumer", action="append", default=[], help="consumer that dead-lettered it"
        )
        p.add_argument("--since", type=when, help="dead-lettered at or after: ISO time or 6h, 7d")
        p.add_argument("--until", type=when, help="dead-lettered before: ISO time or 30m")
        p.add_argument("--json", action="store_true", help="JSON instead of a table")

    ls = commands.add_parser("list", help="list dead letters, newest first")
    filters(ls)
    ls.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    show = commands.add_parser("show", help="one dead letter: headers, reason and value")
    show.add_argument("id", help="<dead-letter topic>:<partition>:<offset>, as list shows")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    rd = commands.add_parser(
        "redrive",
        help="publish dead letters' original records again to their source topics",
        description="Each matching dead letter's key, value and original headers go back to "
        "its source topic (with winback-redrive-of: <id>); the consumers' inboxes drop what "
        "they already handled. Records stored truncated cannot be redriven; a dead letter "
        "whose earlier redrive failed again is superseded by the newer one.",
    )
    filters(rd)
    rd.add_argument("--id", action="append", default=[], help="only this dead letter (repeatable)")
    rd.add_argument("--dry-run", action="store_true", help="say what would go, publish nothing")


@contextmanager
def transport_for(settings: Settings) -> Iterator[Transport]:
    if settings.kafka.bootstrap_servers:
        from shared.messaging.kafka import KafkaTransport

        yield KafkaTransport(
            settings.kafka.bootstrap_servers,
            settings.kafka.client_id,
            max_record_bytes=settings.kafka.max_record_bytes,
        )
        return
    from shared.messaging.memory import BusFileInUse, MemoryBus

    path = Path(settings.kafka.data_dir).with_name("bus.sqlite")
    if not path.exists():
        raise ConfigError(
            "kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS) is empty and there is "
            f"no event bus file {path}: nothing to read"
        )
    try:
        bus = MemoryBus(path, max_record_bytes=settings.kafka.max_record_bytes)
    except BusFileInUse:
        raise _Unavailable(
            f"the event bus file {path} is held by a running `winback run`; ask its ingest "
            "API instead: GET http://127.0.0.1:8081/v1/dead-letters"
        ) from None
    try:
        yield bus
    finally:
        bus.close()


class _Unavailable(Exception):
    pass


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``winback dlq ...``; the exit code."""
    topic = settings.topics.dead_letter
    try:
        with transport_for(settings) as transport:
            return asyncio.run(_run(transport, topic, args))
    except (_Unavailable, TransientError) as exc:
        print(f"winback: {exc}"[:500], file=sys.stderr)
        return EXIT_UNAVAILABLE
    except dlq.BadId as exc:
        print(f"winback: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def _run(transport: Transport, topic: str, args: argparse.Namespace) -> int:
    reader = dlq.reader_for(transport)
    out = sys.stdout
    if args.dlq_command == "show":
        letter = await dlq.show(reader, topic, args.id)
        if letter is None:
            print(f"winback: no dead letter {args.id} on {topic}", file=sys.stderr)
            return EXIT_NOT_FOUND
        if args.json:
            out.write(dlq.detail(letter).model_dump_json(indent=2) + "\n")
        else:
            _print_detail(dlq.detail(letter), out)
        return 0
    filters = dlq.filters_of(
        args.code,
        args.source_topic,
        args.consumer,
        getattr(args, "id", ()),
        args.since,
        args.until,
    )
    if args.dlq_command == "list":
        found = await dlq.scan(reader, topic, filters)
        shown = found[: args.limit] if args.limit > 0 else found
        if args.json:
            rows = [dlq.summary(letter).model_dump(mode="json") for letter in shown]
            out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            _print_table([dlq.summary(letter) for letter in shown], out)
            more = f" ({len(found) - len(shown)} more: --limit)" if len(shown) < len(found) else ""
            out.flush()
            print(f"{len(shown)} dead letters on {topic}{more}", file=sys.stderr)
        return 0
    progress = None if args.dry_run else _progress_to(sys.stderr)
    report = await dlq.redrive_with(
        transport, topic, filters, dry_run=args.dry_run, progress=progress
    )
    model = dlq.report_model(report)
    sys.stderr.flush()
    if args.json:
        out.write(model.model_dump_json(indent=2) + "\n")
    else:
        for result in model.results:
            if result.status == "redriven" or result.status == "would_redrive":
                print(f"{result.id}: {result.status.replace('_', ' ')} to {result.source_topic}")
            else:
                print(f"{result.id}: {result.status.replace('_', ' ')}: {result.detail}")
        verb = "would redrive" if model.dry_run else "redriven"
        count = model.would_redrive if model.dry_run else model.redriven
        print(
            f"{verb} {count}, not redrivable {model.not_redrivable}, superseded "
            f"{model.superseded}, failed {model.failed}"
        )
    return EXIT_FAILED if model.failed else 0


def _progress_to(stream: TextIO) -> dlq.Progress:
    """A bar on a terminal; otherwise a count line per chunk."""
    tty = stream.isatty()

    def show(done: int, total: int) -> None:
        if tty:
            width = 30
            filled = width * done // max(total, 1)
            end = "\n" if done >= total else ""
            stream.write(
                f"\rredriving [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}"
            )
        else:
            stream.write(f"redriving: {done}/{total} published\n")
        stream.flush()

    return show


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(rows: list[dlq.DeadLetterSummary], out: TextIO) -> None:
    header = ("ID", "DEAD-LETTERED (UTC)", "CODE", "FIELD", "SOURCE", "CONSUMER", "NOTE", "REASON")
    table = [header]
    for r in rows:
        at = (
            r.dead_lettered_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            if r.dead_lettered_at
            else "-"
        )
        note = (
            "truncated"
            if r.truncated
            else f"superseded by {r.superseded_by}"
            if r.superseded_by
            else "redrive"
            if r.redrive_of
            else ""
        )
        source = f"{r.source.topic}:{r.source.partition}:{r.source.offset}"
        table.append(
            (
                r.id,
                at,
                r.error_code,
                _cut(r.error_field or "", 24),
                source,
                r.consumer,
                note,
                _cut(r.error_reason, 60),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def _print_detail(d: dlq.DeadLetterDetail, out: TextIO) -> None:
    lines = [
        f"id:              {d.id}",
        f"dead-lettered:   {d.dead_lettered_at.isoformat() if d.dead_lettered_at else '-'}",
        f"error:           {d.error_code}" + (f" (field {d.error_field})" if d.error_field else ""),
        f"reason:          {d.error_reason}",
        f"source:          {d.source.topic} partition {d.source.partition} "
        f"offset {d.source.offset}",
        f"consumer:        {d.consumer}",
        f"redrivable:      {'yes' if d.redrivable else 'no: ' + (d.not_redrivable_reason or '')}",
    ]
    if d.superseded_by:
        lines.append(f"superseded by:   {d.superseded_by}")
    if d.redrive_of:
        lines.append(f"redrive of:      {d.redrive_of}")
    lines.append("headers:")
    for h in d.headers:
        value = h.value if h.value is not None else f"(not text; base64) {h.value_base64}"
        lines.append(f"  {h.name}: {_cut(value, 200)}")
    key = d.key if d.key is not None else (f"(base64) {d.key_base64}" if d.key_base64 else "-")
    lines.append(f"key:             {key}")
    lines.append(f"value ({d.value_bytes} bytes):")
    if d.value is not None:
        lines.append(d.value)
    elif d.value_base64 is not None:
        lines.append(f"(not UTF-8; base64) {d.value_base64}")
    else:
        lines.append("(none)")
    out.write("\n".join(lines) + "\n")
