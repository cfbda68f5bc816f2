"""Ingest's pure customer fold over realistic batches: every event of a batch applied in arrival
order, as ``IngestHandler.handle`` does (``in_place``: one ``Draft`` per customer changed by
``apply_to``), and through ``apply`` on frozen states (``frozen``: a new ``CustomerState`` per
event, as the handler did before). No broker, no database: CPU time of the fold alone.

Batches (1,000 events each, validated payloads built once beforehand):
- ``cancellations``: one ``subscription.cancelled`` per customer with a profile of five fields
  (what ``bench.ingest_bench`` produces);
- ``mixed``: 200 customers, a seeded mix of cancellations, activity, inactivity, profile
  updates, reactivations, trial expiries and consent withdrawals, event times shuffled within
  a month (stale events included), starting from stored states for half of the customers.

Run: .venv/bin/python -m bench.ingest_fold_bench [--rounds 200] [--profile]
``--profile`` prints the functions with the most self time (cProfile) for each batch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from services.ingest import events as ev
from services.ingest.customer import CustomerState, Draft, OpenEpisode, apply, apply_to
from shared.contracts.inbound import INBOUND

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PROFILE = {
    "email": "someone@example.com",
    "timezone": "Europe/Helsinki",
    "mrr_minor": 4900,
    "currency": "EUR",
    "engagement": "high",
}
Batch = list[tuple[str, ev.Inbound]]


def inbound(name: str, at: datetime, data: dict[str, Any]) -> ev.Inbound:
    payload = INBOUND[name].model_validate(data)
    return ev.Inbound(name=name, payload=payload, occurred_at=at)


def cancellations(n: int = 1000) -> tuple[Batch, dict[str, CustomerState]]:
    batch = [
        (
            f"e{i}",
            inbound(
                "subscription.cancelled",
                T0 + timedelta(seconds=i),
                {
                    "customer_id": f"cus_{i}",
                    "reason": "too_expensive",
                    "comment": "bench",
                    "customer": {**PROFILE, "email": f"c{i}@example.com"},
                },
            ),
        )
        for i in range(n)
    ]
    return batch, {}


def mixed(n: int = 1000, customers: int = 200, seed: int = 7) -> tuple[Batch, dict[str, Any]]:
    rng = random.Random(seed)
    kinds = [
        ("user.active", 30),
        ("customer.updated", 15),
        ("subscription.cancelled", 15),
        ("user.inactive", 10),
        ("subscription.reactivated", 10),
        ("trial.expired", 5),
        ("consent.withdrawn", 5),
    ]
    names = [k for k, w in kinds for _ in range(w)]
    batch: Batch = []
    for i in range(n):
        name = rng.choice(names)
        cid = f"cus_{rng.randrange(customers)}"
        at = T0 + timedelta(minutes=rng.randrange(60 * 24 * 30))
        data: dict[str, Any] = {"customer_id": cid}
        if rng.random() < 0.5:
            data["customer"] = {
                "plan": rng.choice(["basic", "pro", "team"]),
                "mrr_minor": rng.randrange(1000, 90000),
                "locale": "fi-FI",
            }
        if name in ("subscription.cancelled", "trial.expired"):
            data["reason"] = rng.choice(["too_expensive", "missing_features", "we left", "other"])
        elif name == "subscription.reactivated":
            data["mrr_minor"] = rng.randrange(1000, 90000)
        elif name == "consent.withdrawn":
            data["channel"] = rng.choice(["email", "sms", "all"])
        batch.append((f"e{i}", inbound(name, at, data)))
    stored: dict[str, CustomerState] = {}
    for c in range(0, customers, 2):
        cid = f"cus_{c}"
        stored[cid] = CustomerState(
            id=cid,
            profile={**PROFILE, "plan": "pro"},
            profile_times=dict.fromkeys([*PROFILE, "plan"], T0),
            lifecycle="churned" if c % 4 == 0 else "active",
            lifecycle_at=T0 + timedelta(days=5),
            activity="active",
            activity_at=T0 + timedelta(days=4),
            open_episodes=(
                (OpenEpisode(f"ep{c}", "subscription_cancelled", T0 + timedelta(days=5)),)
                if c % 4 == 0
                else ()
            ),
        )
    return batch, stored


def frozen(batch: Batch, stored: dict[str, CustomerState]) -> int:
    """The fold over frozen states (``apply``: a new ``CustomerState`` per event); returns the
    number of effects and changed customers."""
    states: dict[str, CustomerState] = dict(stored)
    seen = 0
    for event_id, item in batch:
        cid = getattr(item.payload, "customer_id", None)
        effects = apply(states.get(cid) if cid else None, item, "/bench", event_id)
        if cid is not None and effects.state is not None:
            states[cid] = effects.state
        seen += len(effects.emit) + len(effects.ended) + (effects.new_episode is not None)
    changed = [s for cid, s in states.items() if stored.get(cid) != s]
    return seen + len(changed)


def in_place(batch: Batch, stored: dict[str, CustomerState]) -> int:
    """What ``IngestHandler.handle`` does between loading and saving: one ``Draft`` per
    customer, changed in place (``apply_to``)."""
    drafts: dict[str, Draft] = {}
    seen = 0
    for event_id, item in batch:
        cid = getattr(item.payload, "customer_id", None)
        if cid is None:
            effects = apply(None, item, "/bench", event_id)
        else:
            draft = drafts.get(cid)
            if draft is None:
                state = stored.get(cid)
                draft = drafts[cid] = Draft(state) if state is not None else Draft.new(cid)
            effects = apply_to(draft, item, "/bench", event_id)
        seen += len(effects.emit) + len(effects.ended) + (effects.new_episode is not None)
    changed = [d for cid, d in drafts.items() if d.differs_from(stored.get(cid))]
    return seen + len(changed)


Fold = Callable[[Batch, dict[str, CustomerState]], int]


def measure(
    make: Callable[[], tuple[Batch, dict[str, Any]]], fold: Fold, rounds: int, profile: bool
) -> None:
    batch, stored = make()
    fold(batch, stored)  # warm up
    best = float("inf")
    total = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        fold(batch, stored)
        spent = time.perf_counter() - t0
        best = min(best, spent)
        total += spent
    n = len(batch)
    print(
        f"{make.__name__:<14} {fold.__name__:<9} {n} events: best {best / n * 1e6:6.1f} µs/event, "
        f"mean {total / rounds / n * 1e6:6.1f} µs/event over {rounds} rounds"
    )
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(max(1, rounds // 10)):
            fold(batch, stored)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    for make in (cancellations, mixed):
        for fold in (in_place, frozen):
            measure(make, fold, args.rounds, args.profile)


if __name__ == "__main__":
    cli()
