"""PgQueuer draining no-op jobs: the reference beside the scheduler's timer in
``bench/scheduler_bench.py`` (same PostgreSQL, same run).

Not imported by winback: ``bench.scheduler_bench`` runs this file with the Python of a virtual
environment of its own that has PgQueuer (``~/.cache/winback/pgqueuer-<version>``, made with
``uv`` on first use), so PgQueuer is never a dependency of the project.

It installs PgQueuer's tables in the given database, enqueues N jobs for one no-op
entrypoint (in batches of 10,000), then times one ``QueueManager`` draining them
(``batch_size`` jobs per dequeue, ``mode=drain``), and prints one JSON line:
``{"jobs": N, "seconds": S, "version": "1.6.0"}``.

Run: python bench/pgqueuer_reference.py DSN [--jobs 100000] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import timedelta
from importlib.metadata import version
from typing import Any

import asyncpg  # type: ignore[import-untyped,unused-ignore]
from pgqueuer import AsyncpgDriver, Queries, QueueManager  # type: ignore[import-not-found,unused-ignore]
from pgqueuer.types import QueueExecutionMode  # type: ignore[import-not-found,unused-ignore]


async def main(dsn: str, jobs: int, batch: int) -> None:
    setup = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(setup))
    await queries.install()
    for start in range(0, jobs, 10_000):
        n = min(10_000, jobs - start)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await setup.close()

    connection = await asyncpg.connect(dsn)
    manager = QueueManager(Queries(AsyncpgDriver(connection)))
    done = 0

    @manager.entrypoint("noop")  # type: ignore[misc,untyped-decorator,unused-ignore]
    async def noop(job: Any) -> None:
        nonlocal done
        done += 1

    started = time.perf_counter()
    await manager.run(
        dequeue_timeout=timedelta(seconds=0.5),
        batch_size=batch,
        mode=QueueExecutionMode.drain,
    )
    seconds = time.perf_counter() - started
    await connection.close()
    print(json.dumps({"jobs": done, "seconds": seconds, "version": version("pgqueuer")}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dsn")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    asyncio.run(main(args.dsn, args.jobs, args.batch))
