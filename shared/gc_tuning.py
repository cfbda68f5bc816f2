"""The cyclic garbage collector, set for a long-running service process.

With CPython's defaults (a young collection every 700 net allocations, a full one every
100 young ones) a consumer handling batches of 1,000 events spent about a third of its CPU in
the collector: every batch allocates tens of thousands of objects that live until the batch
is done (records, events, payloads, rows), so young collections run many times per batch and
promote them, and each full collection walks everything the process built at start-up
(modules, settings, SQL statements, schemas) again. Almost all of a batch is freed by reference
counting when the batch ends; the collector is there for the few reference cycles.

``tune_for_service()``, called once a service is built and before it runs:
- collects what start-up left behind, then ``gc.freeze()``: the objects alive now are never
  walked again by a collection;
- raises the young threshold to ``YOUNG_THRESHOLD`` net allocations: a batch's objects are
  mostly freed before a collection comes.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_for_service(young: int = YOUNG_THRESHOLD) -> None:
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)
