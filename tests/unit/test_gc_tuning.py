"""The collector settings a service process runs with (in a child process: the test session's
own collector stays as it is)."""

from __future__ import annotations

import subprocess
import sys

import orjson

CHILD = """
import gc, orjson
from shared.gc_tuning import YOUNG_THRESHOLD, tune_for_service
before = gc.get_threshold()
built = [{"n": i} for i in range(1000)]  # what a service builds at start-up
tune_for_service()
print(orjson.dumps({
    "before": before,
    "after": gc.get_threshold(),
    "young": YOUNG_THRESHOLD,
    "frozen": gc.get_freeze_count(),
    "tracked": len(gc.get_objects()),
}).decode())
"""


def test_a_service_freezes_what_start_up_built_and_collects_young_objects_less_often() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, check=True, timeout=60
    ).stdout
    seen = orjson.loads(out)
    assert seen["after"] == [seen["young"], *seen["before"][1:]]
    assert seen["after"][0] > seen["before"][0]
    assert seen["frozen"] > 1000  # start-up objects, the 1,000 built above among them
    assert seen["tracked"] < seen["frozen"]  # collections no longer walk them
