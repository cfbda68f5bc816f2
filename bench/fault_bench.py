"""Fault benchmark: the fault suite's harness (``tests/faults/harness.py``) at a larger size,
beside a reference measured in the same run.

1. Reference: the same workload with no faults — N cancellations (plus the hostile-record
   corpus) produced at an even pace over ``--seconds`` to the whole system running as
   separate processes (two ingest, scheduler, dispatcher, relay) on a broker and a PostgreSQL
   of its own, the dispatcher sending to the fake provider (its own process).
2. Faults: the same again (fresh infrastructure) with ``--kills`` SIGKILLs of each process
   kind, ``--database-crashes`` PostgreSQL crashes (``pg_ctl stop -m immediate``) and
   ``--broker-kills`` broker SIGKILLs at seeded random moments, each restarted.

Printed for each: events in, events handled, dead letters, faults per kind, duplicates, lost,
missed, time to settle after the last fault, and the end-to-end rate (messages sent per
second from the first event in to the last send), the fault run's rate beside the
reference's. Exits non-zero if the fault run found anything (lost, duplicate, missed, stuck).

Run: .venv/bin/python -m bench.fault_bench [--events 10000 --seconds 120 --kills 2 --seed 1]
     [--no-hostile] [--no-reference]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.harness import Plan, Report, run
from tests.support.corpus import hostile_records


def say(line: str) -> None:
    print(f"  {line}", flush=True)


async def one(plan: Plan, title: str) -> Report:
    print(f"== {title}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="winback-fault-bench-") as tmp:
        report = await run(plan, Path(tmp), say)
    for line in report.figures():
        print(f"  {line}")
    for fault in report.faults:
        print(f"    {fault.kind:<10} {fault.target:<12} at {fault.at:6.1f} s")
    problems = report.problems()
    print("  findings           " + ("none" if not problems else ""))
    for problem in problems:
        print(f"    {problem}")
    print(f"  wall time          {time.monotonic() - started:.0f} s", flush=True)
    return report


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    hostile = [] if args.no_hostile else hostile_records()
    seconds = args.seconds if args.seconds is not None else max(10.0, args.events / 80)
    base = Plan(
        events=args.events,
        produce_seconds=seconds,
        kills=0,
        database_crashes=0,
        broker_kills=0,
        seed=args.seed,
        hostile=hostile,
        settle_timeout=args.settle_timeout,
        partitions=args.partitions,
    )
    print(
        f"{args.events:,} cancellations + {len(hostile)} hostile records over {seconds:g} s "
        f"({(args.events + len(hostile)) / seconds:,.0f} records/s), seed {args.seed}"
    )
    reference = None if args.no_reference else await one(base, "reference: no faults")
    faulty = Plan(
        events=base.events,
        produce_seconds=base.produce_seconds,
        kills=args.kills,
        database_crashes=args.database_crashes,
        broker_kills=args.broker_kills,
        seed=base.seed,
        hostile=base.hostile,
        settle_timeout=base.settle_timeout,
        partitions=base.partitions,
    )
    report = await one(faulty, "faults")
    if reference is not None:
        ratio = report.e2e_rate / reference.e2e_rate if reference.e2e_rate else float("nan")
        print(
            f"== end-to-end rate: {report.e2e_rate:,.1f} messages/s with faults, "
            f"{reference.e2e_rate:,.1f} without ({ratio:.0%}); settled "
            f"{report.settle_seconds:.1f} s after the last fault "
            f"({reference.settle_seconds:.1f} s after the last event without faults)"
        )
    return 1 if report.problems() or (reference and reference.problems()) else 0


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument(
        "--seconds", type=float, default=None, help="production window (default events/80)"
    )
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per process kind")
    p.add_argument("--database-crashes", type=int, default=1)
    p.add_argument("--broker-kills", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--settle-timeout", type=float, default=600)
    p.add_argument("--no-hostile", action="store_true", help="valid events only")
    p.add_argument("--no-reference", action="store_true", help="skip the fault-free run")
    sys.exit(asyncio.run(main(p.parse_args(argv))))


if __name__ == "__main__":
    cli()
