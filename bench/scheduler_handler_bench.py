"""Scheduler handler benchmark on the real database: CPU per churn event.

N ``churn.recorded`` events (one new customer each, reasons in turn, the day-0 step due now)
go through the real ``SchedulerHandler`` as the consumer runs it: decoded with the contracts,
then one ``Pipeline.transact`` per batch of B (inbox claim, handler, outbox write; default
500). Printed: events/s, this process's CPU ms per event (decode, transaction), statements per
batch and how many were compiled rather than taken from SQLAlchemy's compiled cache. Two
references in the same run, on the same database:

- bare rows: the rows the handler wrote (customers, cases, steps, inbox, outbox), B events'
  worth per transaction, written with COPY into tables like them — the floor;
- claim-and-emit: the step timer firing the day-0 steps the handler made (as
  ``bench.scheduler_bench`` measures it).

The machine's load average is printed before and after: on a busy machine the figures move.

Run: .venv/bin/python -m bench.scheduler_handler_bench [--events 20000 --batch 500]
Starts its own PostgreSQL (pgserver) unless DATABASE_URL is set (then a database of its own on
that server, dropped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import default
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.scheduler_bench import drop_database
from services.scheduler.domain import OFFERS, TEMPLATE_NAMES, load_playbooks
from services.scheduler.handler import SchedulerHandler
from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared import domain_events as de
from shared.clock import FrozenClock
from shared.cloudevents import CloudEvent
from shared.contracts import examples
from shared.db import migrate
from shared.db.engine import make_engine, normalise_url, with_database
from shared.messaging.pipeline import Incoming, Pipeline
from shared.settings import SchedulerSettings

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday, 10:00 in Helsinki: inside the window
REASONS = ("price", "budget", "missing_feature", "poor_experience", "competitor", "unknown")
SOURCE = "/winback/scheduler"
TABLES = ("scheduler_customers", "cases", "case_steps", "inbox", "outbox")


def churns(n: int) -> list[CloudEvent]:
    """``n`` churn events as ingest publishes them, one new customer each."""
    out = []
    base = examples.PUBLISHED["churn.recorded"]
    for i in range(n):
        cid = f"cus_{i:07d}"
        data = {
            "customer": {**examples.SNAPSHOT, "id": cid, "email": f"{cid}@example.com"},
            "episode": {
                **base["episode"],
                "id": uuid.uuid5(uuid.NAMESPACE_URL, f"bench|{i}").hex,
                "reason": REASONS[i % len(REASONS)],
                "occurred_at": (NOW - timedelta(minutes=1)).isoformat(),
            },
            "superseded": [],
        }
        out.append(
            CloudEvent(
                id=str(uuid.uuid4()),
                source="/winback/ingest",
                type=de.CHURN_RECORDED,
                time=NOW,
                subject=cid,
                data=data,
            )
        )
    return out


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def statements(engine: AsyncEngine, pipe: Pipeline, batch: Sequence[Incoming[Any]]) -> str:
    """One batch with every statement counted, and whether it was compiled for it."""
    seen: list[Any] = []

    def executed(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: Any) -> None:
        seen.append(context.cache_hit)

    event.listen(engine.sync_engine, "before_cursor_execute", executed)
    try:
        await pipe.transact(batch)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", executed)
    compiled = sum(1 for hit in seen if hit != default.CACHE_HIT)
    return f"{len(seen)} statements per batch, {compiled} of them compiled (not cached)"


async def bare_rows(engine: AsyncEngine, events: Sequence[CloudEvent], batch: int) -> float:
    """COPY what the handler wrote for ``events`` into empty tables like its own, ``batch``
    events' worth per transaction; the CPU seconds it took (wall time is returned by the
    caller's clock)."""
    owner = {e.subject: n // batch for n, e in enumerate(events)}
    by_event = {e.id: owner[e.subject] for e in events}
    key_of = {
        "scheduler_customers": lambda r: owner.get(r["id"]),
        "cases": lambda r: owner.get(r["customer_id"]),
        "case_steps": lambda r: owner.get(r["customer_id"]),
        "inbox": lambda r: by_event.get(r["event_id"]),
        "outbox": lambda r: owner.get((r["key"] or b"").decode()),
    }
    rows: dict[str, list[list[Any]]] = {}
    columns: dict[str, list[str]] = {}
    async with engine.connect() as conn:
        driver: Any = (await conn.get_raw_connection()).driver_connection
        for table in TABLES:
            await driver.execute(f"DROP TABLE IF EXISTS bare_{table}")
            await driver.execute(f"CREATE TABLE bare_{table} (LIKE {table} INCLUDING ALL)")
            records = await driver.fetch(f"SELECT * FROM {table}")
            columns[table] = list(records[0].keys()) if records else []
            groups: list[list[Any]] = [[] for _ in range(len(events) // batch + 1)]
            for r in records:
                group = key_of[table](r)
                if group is not None:
                    groups[group].append(
                        tuple(
                            orjson.dumps(v).decode() if isinstance(v, dict | list) else v
                            for v in r.values()
                        )
                    )
            rows[table] = groups
        await conn.commit()
    cpu = time.process_time()
    for group in range(len(events) // batch + 1):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))  # the transaction the copies run in
            driver = (await conn.get_raw_connection()).driver_connection
            for table in TABLES:
                if rows[table][group]:
                    await driver.copy_records_to_table(
                        f"bare_{table}", records=rows[table][group], columns=columns[table]
                    )
    return time.process_time() - cpu


async def run(args: argparse.Namespace, url: str) -> None:
    await migrate.upgrade_async(url)
    engine = make_engine(url, pool_size=4)
    clock = FrozenClock(NOW)
    playbooks = load_playbooks(
        SchedulerSettings().playbooks_dir, templates=TEMPLATE_NAMES, offers=OFFERS
    )
    handler = SchedulerHandler(playbooks, "bench.outcomes")
    pipe = Pipeline(engine, "scheduler", handler, clock, "bench.dlq", SOURCE)
    load_before = os.getloadavg()

    events = churns(args.events + 2 * args.batch)
    cpu = time.process_time()
    items = [pipe.decode_payload(e, (e.subject or "").encode(), None) for e in events]
    decode_cpu = (time.process_time() - cpu) / len(items)
    warm, probe, timed = (
        items[: args.batch],
        items[args.batch : 2 * args.batch],
        items[2 * args.batch :],
    )
    await pipe.transact(warm)  # connections, prepared statements, caches
    cached = await statements(engine, pipe, probe)

    wall, cpu = time.perf_counter(), time.process_time()
    for batch in chunks(timed, args.batch):
        result = await pipe.transact(batch)
        assert result.handled == len(batch), result
    handler_wall, handler_cpu = time.perf_counter() - wall, time.process_time() - cpu
    async with engine.connect() as conn:
        opened = await conn.scalar(text("SELECT count(*) FROM cases"))
        steps = await conn.scalar(text("SELECT count(*) FROM case_steps"))
        due = await conn.scalar(
            text("SELECT count(*) FROM case_steps WHERE state = 'pending' AND due_at <= :now"),
            {"now": NOW},
        )

    timed_events = events[2 * args.batch :]
    wall = time.perf_counter()
    bare_cpu = await bare_rows(engine, timed_events, args.batch)
    bare_wall = time.perf_counter() - wall

    firer = StepFirer(
        engine,
        clock,
        policy(SchedulerSettings()),
        "bench.dispatch",
        SOURCE,
        batch_size=args.batch,
    )
    fired = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while (fire := await firer.fire_once()).claimed:
        fired += fire.dispatched
    fire_wall, fire_cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    await engine.dispose()

    n = len(timed)
    print(f"load average (1, 5, 15 min)  before {_load(load_before)}, after {_load(load_after)}")
    print(
        f"handler, churn → case       {n:,} events in batches of {args.batch}: "
        f"{n / handler_wall:,.0f} events/s; CPU {1000 * handler_cpu / n:.3f} ms/event in the "
        f"transaction + {1000 * decode_cpu:.3f} ms/event decoding = "
        f"{1000 * (handler_cpu / n + decode_cpu):.3f} ms/event"
    )
    print(
        f"  rows                      {opened:,} cases, {steps:,} steps ({due:,} due now); {cached}"
    )
    print(
        f"bare rows (COPY)            the same rows, {args.batch} events per transaction: "
        f"{n / bare_wall:,.0f} events/s; CPU {1000 * bare_cpu / n:.3f} ms/event"
    )
    if fired:
        print(
            f"claim-and-emit              {fired:,} day-0 steps: {fired / fire_wall:,.0f} "
            f"steps/s; CPU {1000 * fire_cpu / fired:.3f} ms/step"
        )


def _load(average: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in average)


async def main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        server_url = os.environ.get("DATABASE_URL")
        if not server_url:
            from shared.local.postgres import start_embedded

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))
            url, server = start_embedded(Path(tmp), cleanup="delete")
            stack.callback(server.cleanup)
            await run(args, normalise_url(url))
            return
        server_url = normalise_url(server_url)
        name = f"winback_bench_{uuid.uuid4().hex[:6]}"
        admin = make_engine(server_url, pool_size=1)
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        await admin.dispose()
        url = with_database(server_url, name)
        try:
            await run(args, url)
        finally:
            await drop_database(server_url, url)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="timed churn events")
    p.add_argument("--batch", type=int, default=500)
    asyncio.run(main(p.parse_args(argv)))


if __name__ == "__main__":
    cli()
