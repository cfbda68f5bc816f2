"""The fault suite: the whole system as separate processes on a broker and a PostgreSQL of its
own, a few thousand cancellations with the hostile-record corpus interleaved, and SIGKILLs of
every process kind, a PostgreSQL crash and a broker SIGKILL while it flows (see
``harness.py``). Nothing may be lost, sent twice, missed, stuck or left unpublished; every
hostile record is dead-lettered with its code, field and reason; every group catches up.

The fault moments are seeded: ``FAULT_SEED=<n>`` replays a run (the seed is printed).
``bench/fault_bench.py`` runs a longer version beside a fault-free reference.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Plan, Report, run
from tests.support.corpus import hostile_records

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SEED = int(os.environ.get("FAULT_SEED", "20261130"))
POISON = ("time_year_0001_plus_0100", "value_near_broker_limit")
"""The two records of issue 9 that stopped the system: a time out of range (ingest crash
loop) and a ~1 MB value (its dead-letter copy blocked every outbox row after it)."""


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Not ``tmp_path``: every pytest session starting on the machine makes
    /tmp/pytest-of-<user> private again, and the embedded PostgreSQL (run as the ``pgserver``
    user when we are root) must keep reaching its data directory."""
    with tempfile.TemporaryDirectory(prefix="winback-faults-") as tmp:
        yield Path(tmp)


def say(line: str) -> None:
    print(line, flush=True)


def check(report: Report) -> None:
    print("\n".join(report.figures()))
    for fault in report.faults:
        print(f"  {fault.kind:<10} {fault.target:<12} at {fault.at:5.1f} s")
    problems = report.problems()
    assert not problems, "the fault run found:\n  " + "\n  ".join(problems)


@pytest.mark.timeout(480)
async def test_crashes_of_every_part_lose_duplicate_and_miss_nothing(workdir: Path) -> None:
    hostile = hostile_records()
    assert set(POISON) <= {h.name for h in hostile}
    plan = Plan(
        events=2000,
        produce_seconds=40,
        kills=1,
        database_crashes=1,
        broker_kills=1,
        seed=SEED,
        hostile=hostile,
        settle_timeout=150,
    )
    say(f"fault run: seed {SEED}, {plan.events} events, {len(hostile)} hostile records")
    report = await run(plan, workdir, say)

    kinds = report.faults_by_kind()
    assert [kinds[k] for k in ("ingest", "scheduler", "dispatcher", "relay")] == [1, 1, 1, 1]
    assert (kinds["postgres"], kinds["broker"]) == (1, 1)
    assert report.events_in == plan.events
    assert report.hostile_in == len(hostile)
    check(report)
    assert report.sent + len(report.outcome_unknown) == report.expected_sends > 0
