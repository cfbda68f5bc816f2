"""Scheduler timer benchmark on the real database.

Fills the tables with N pending steps (default 1,000,000; 5 per case), D of them due now
(default 100,000, one per case), then runs the step timer (claim with FOR UPDATE SKIP LOCKED,
guardrails, dispatch command into the outbox, state update — one transaction per batch) until
nothing is due: claim-and-emit steps/s. The same is measured first on a small table (10,000
rows) so the claim rate on the big table can be compared with it (it should stay flat).

The reference, in the same run on the same PostgreSQL: PgQueuer 1.6 (one consumer, batch as
``--batch``) draining as many no-op jobs as there are due steps (``bench/pgqueuer_reference.py``,
run with the Python of a virtual environment of its own made with ``uv`` on first use in
``~/.cache/winback/pgqueuer-1.6.0``: PgQueuer is not a dependency of winback).
``--no-pgqueuer`` skips it.

Run: .venv/bin/python -m bench.scheduler_bench [--steps 1000000 --due 100000 --batch 500]
     [--no-pgqueuer]
Starts its own PostgreSQL (pgserver) unless DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler.timers import StepFirer
from services.scheduler.views import policy
from shared.clock import FrozenClock
from shared.db import migrate
from shared.db.engine import make_engine, normalise_url, with_database
from shared.settings import SchedulerSettings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PGQUEUER = "1.6.0"
SEGMENT = (
    '{"lifecycle": "churned_customer", "reason": "budget", "value_tier": "medium", '
    '"engagement": "high", "tenure": "established", "is_rechurn": false}'
)


async def fill(engine: AsyncEngine, steps: int, due: int, per_case: int = 5) -> None:
    """Cases, customers and steps made by the database itself (generate_series)."""
    n_cases = steps // per_case
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "TRUNCATE case_steps, win_backs, cases, scheduler_customers, "
                "outbox RESTART IDENTITY CASCADE"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO scheduler_customers "
                "(id, email, timezone, locale, engagement, consent) "
                "SELECT 'c' || i, 'c' || i || '@example.com', 'UTC', 'en', 'high', "
                "'{\"email\": true}'::jsonb FROM generate_series(1, :n) AS i"
            ),
            {"n": n_cases},
        )
        await conn.execute(
            text(
                "INSERT INTO cases (id, customer_id, episode_id, status, playbook, "
                "playbook_version, segment, episode, churned_at, opened_at, expires_at) "
                "SELECT 'case' || i, 'c' || i, 'ep' || i, 'open', 'budget', 1, "
                "CAST(:segment AS jsonb), jsonb_build_object('id', 'ep' || i, 'kind', "
                "'subscription_cancelled', 'reason', 'budget', 'occurred_at', "
                "CAST(:churn AS text)), "
                ":churned, :churned, :expires FROM generate_series(1, :n) AS i"
            ),
            {
                "n": n_cases,
                "segment": SEGMENT,
                "churn": (NOW - timedelta(days=30)).isoformat(),
                "churned": NOW - timedelta(days=30),
                "expires": NOW + timedelta(days=300),
            },
        )
        # step k of case i: the first step of the first `due` cases is due now, every other
        # step is spread over the coming months
        await conn.execute(
            text(
                "INSERT INTO case_steps (case_id, customer_id, step_key, channel, template, "
                'variant, "window", on_cap, state, due_at, original_due_at, expires_at) '
                "SELECT 'case' || i, 'c' || i, 's' || k, 'email', 'check_in', 'default', "
                "'email_series', 'defer', 'pending', "
                "CASE WHEN k = 1 AND i <= :due "
                "THEN CAST(:now AS timestamptz) - interval '1 minute' "
                "ELSE CAST(:now AS timestamptz) + (k * interval '20 days') "
                "+ (i % 1000) * interval '1 minute' END, "
                ":now, :expires FROM generate_series(1, :n) AS i, generate_series(1, :per) AS k"
            ),
            {
                "n": n_cases,
                "per": per_case,
                "due": due,
                "now": NOW,
                "expires": NOW + timedelta(days=300),
            },
        )
    # as in a live system, where rows arrive over time and autovacuum keeps up: settle the
    # freshly bulk-loaded pages (visibility map, hint bits, statistics) before measuring
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM (ANALYZE) case_steps, cases, scheduler_customers"))


async def fire_all(engine: AsyncEngine, batch: int, limit: int | None = None) -> tuple[int, float]:
    settings = SchedulerSettings()
    firer = StepFirer(
        engine,
        FrozenClock(NOW),
        policy(settings),
        "bench.dispatch",
        "/bench/scheduler",
        batch_size=batch,
    )
    fired = 0
    started = time.perf_counter()
    while limit is None or fired < limit:
        result = await firer.fire_once()
        if not result.claimed:
            break
        fired += result.dispatched
    return fired, time.perf_counter() - started


async def explain(engine: AsyncEngine, batch: int) -> str:
    from services.scheduler.timers import _CLAIM

    async with engine.connect() as conn:
        rows = await conn.execute(text("EXPLAIN " + str(_CLAIM)), {"now": NOW, "n": batch})
        plan = "\n".join(r[0] for r in rows)
        await conn.rollback()
    return plan


async def claim_only(engine: AsyncEngine, batch: int, rounds: int) -> float:
    """The claim query alone (then rolled back): claims per second."""
    from services.scheduler.timers import _CLAIM

    started = time.perf_counter()
    for _ in range(rounds):
        async with engine.connect() as conn:
            rows = (await conn.execute(_CLAIM, {"now": NOW, "n": batch})).all()
            assert rows
            await conn.rollback()
    return rounds * batch / (time.perf_counter() - started)


def pgqueuer_python() -> Path:
    """The Python of a virtual environment with PgQueuer, made with ``uv`` on first use."""
    cache = Path(
        os.environ.get("WINBACK_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "winback"
    )
    venv = cache / f"pgqueuer-{PGQUEUER}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        uv = shutil.which("uv")
        if uv is None:
            raise SystemExit("the PgQueuer reference needs `uv` (pip install uv), or --no-pgqueuer")
        print(f"installing PgQueuer {PGQUEUER} into {venv}", file=sys.stderr, flush=True)
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        subprocess.run(
            [
                uv,
                "pip",
                "install",
                "-q",
                "--python",
                str(python),
                f"pgqueuer=={PGQUEUER}",
                "asyncpg",
            ],
            check=True,
        )
        (venv / ".complete").touch()
    return python


async def pgqueuer_drain(url: str, jobs: int, batch: int) -> tuple[int, float]:
    """PgQueuer draining ``jobs`` no-op jobs in the database of ``url``: (jobs, seconds)."""
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    script = Path(__file__).with_name("pgqueuer_reference.py")
    proc = await asyncio.create_subprocess_exec(
        str(pgqueuer_python()),
        str(script),
        dsn,
        "--jobs",
        str(jobs),
        "--batch",
        str(batch),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the PgQueuer reference exited with {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return int(result["jobs"]), float(result["seconds"])


async def run(args: argparse.Namespace, url: str) -> None:
    await migrate.upgrade_async(url)
    engine = make_engine(url, pool_size=4)
    sample = min(args.sample, args.due, 5_000)

    small = 10_000
    await fill(engine, small, sample, per_case=2)
    await claim_only(engine, args.batch, 10)  # warm-up: connections, plans, caches
    await fire_all(engine, args.batch, args.batch * 2)
    await fill(engine, small, sample, per_case=2)
    small_claim = await claim_only(engine, args.batch, 20)
    small_fired, small_s = await fire_all(engine, args.batch, sample)

    t0 = time.perf_counter()
    await fill(engine, args.steps, args.due)
    fill_s = time.perf_counter() - t0
    await claim_only(engine, args.batch, 2)
    if args.explain:
        print(await explain(engine, args.batch))
    big_claim = await claim_only(engine, args.batch, 20)
    big_fired_sample, big_sample_s = await fire_all(engine, args.batch, sample)
    rest_fired, rest_s = await fire_all(engine, args.batch)
    total_fired = big_fired_sample + rest_fired
    total_s = big_sample_s + rest_s
    async with engine.connect() as conn:
        outbox_rows = await conn.scalar(text("SELECT count(*) FROM outbox"))
        doubled = await conn.scalar(
            text(
                "SELECT count(*) FROM (SELECT value FROM outbox GROUP BY value "
                "HAVING count(*) > 1) d"
            )
        )
    await engine.dispose()
    reference = await pgqueuer_drain(url, total_fired, args.batch) if args.pgqueuer else None

    small_rate = small_fired / small_s
    big_rate = big_fired_sample / big_sample_s
    print(
        f"table sizes                 10,000 rows vs {args.steps:,} rows "
        f"(filled in {fill_s:.0f} s), batch {args.batch}"
    )
    print(
        f"claim query alone           {small_claim:,.0f} rows/s (10k table) vs "
        f"{big_claim:,.0f} rows/s ({args.steps:,} table): ratio {big_claim / small_claim:.2f}"
    )
    print(
        f"claim-and-emit, first {sample:,}  {small_rate:,.0f} steps/s (10k table) vs "
        f"{big_rate:,.0f} steps/s ({args.steps:,} table): ratio {big_rate / small_rate:.2f}"
    )
    print(
        f"claim-and-emit, all due     {total_fired:,} steps in {total_s:.1f} s = "
        f"{total_fired / total_s:,.0f} steps/s"
    )
    print(f"dispatch commands in outbox {outbox_rows:,} (duplicates: {doubled})")
    if reference is not None:
        jobs, seconds = reference
        ours = total_fired / total_s
        print(
            f"reference: PgQueuer {PGQUEUER}   {jobs:,} no-op jobs drained in {seconds:.1f} s = "
            f"{jobs / seconds:,.0f} jobs/s (one consumer, batch {args.batch}); "
            f"winback / PgQueuer = {ours / (jobs / seconds):.2f}"
        )


async def main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        url = os.environ.get("DATABASE_URL")
        if not url:
            from shared.local.postgres import start_embedded

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))
            url, server = start_embedded(Path(tmp), cleanup="delete")
            stack.callback(server.cleanup)
        else:
            # a database of its own, so the bench never truncates real data
            url = normalise_url(url)
            name = f"winback_bench_{uuid.uuid4().hex[:6]}"
            admin = make_engine(url, pool_size=1)
            async with admin.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
            await admin.dispose()
            url = with_database(url, name)
        try:
            await run(args, normalise_url(url))
        finally:
            if os.environ.get("DATABASE_URL"):
                await drop_database(os.environ["DATABASE_URL"], url)


async def drop_database(server_url: str, url: str) -> None:
    """Drop the bench's own database (``url``) on the server of ``server_url``."""
    name = url.partition("?")[0].rsplit("/", 1)[1]
    admin = make_engine(server_url, pool_size=1)
    try:
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--due", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--explain", action="store_true", help="print the claim query's plan")
    p.add_argument(
        "--no-pgqueuer",
        dest="pgqueuer",
        action="store_false",
        help="skip the PgQueuer reference",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=5_000,
        help="due steps fired to compare the small and the big table",
    )
    asyncio.run(main(p.parse_args(argv)))


if __name__ == "__main__":
    cli()
