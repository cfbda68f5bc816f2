"""End-to-end benchmark: churn event in → day-0 message out, every service its own process.

The fault suite's system (``tests/faults/harness.py``: ``System``, no faults, the product's
settings): an embedded PostgreSQL and a KRaft broker of its own, ``winback ingest`` x W,
``winback scheduler``, ``winback dispatcher`` and ``winback relay`` as separate processes
configured by environment, email through the file provider (``--provider file``, the
default: ``.eml`` files on disk) or through the fake SendGrid API in a process of its own
(``--provider http``). Every event is a ``subscription.cancelled`` of a new customer in a
timezone where now is inside the send window, so the ``price_discount`` playbook's day-0
email is due at once (5% of customers are its holdout: a case, no message).

1. Reference, same run, same infrastructure: ingest alone (W ``winback ingest`` and one
   ``winback relay``, a database of its own) drains N such events produced beforehand; the
   rate is N over the span between the first and the last committed episode (as
   ``bench/ingest_bench.py``).
2. Burst: N events produced as fast as the producer goes; sustained events/s = N over the span
   from the first event's time to the last message sent.
3. Steady: for each of ``--rates`` (default 100 and 500 events/s), ``--seconds`` of events at
   that rate, after the system has drained what came before; event→message p50/p90/p99.

For each phase: the time per stage from database timestamps — event (its CloudEvent ``time``,
stamped when produced) → ingested (``churn_episodes.recorded_at``, the ingest transaction) →
case opened (``cases.opened_at``) → step fired (``case_steps.fired_at``) → delivery row
(``deliveries.created_at``) → sent (``deliveries.sent_at``: the file written or the provider's
answer); CPU seconds per event per service (``/proc``, the processes' own time; PostgreSQL with
its backends, the broker, the fake provider for reference); and peak RSS per service after the
burst and at the end. Ends with the issue's targets, met or not.

Run: .venv/bin/python -m bench.pipeline_bench [--events 20000 --rates 100,500 --seconds 20
     --provider file|http --provider-latency 0 --ingest-workers 2 --partitions 6
     --relay-in-services --no-reference --setting scheduler.poll_seconds=0.2 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text

from bench.ingest_bench import wait_for
from shared.db import migrate
from shared.db.engine import make_engine, with_database
from shared.messaging.kafka import KafkaTransport
from tests.faults.harness import (
    FINAL_STEP_STATES,
    HEADERS,
    PLAYBOOK,
    SOURCE,
    Setup,
    System,
    cancellation,
    due_now,
    load_playbooks_cached,
    zones_in_window,
)
from tests.support.procs import WinbackProcess, cpu_seconds, peak_rss_mb, tree_cpu_seconds
from tests.support.services import eventually

STAGES = ("ingested", "case opened", "step fired", "delivery row", "sent")
SERVICES = ("ingest", "scheduler", "dispatcher", "relay")
INFRA = ("postgresql", "kafka", "provider")
QUANTILES = (50, 90, 99)
# the targets (issue 11)
TARGET_RATE = 1000.0
TARGET_SHARE = 0.25
TARGET_P99 = {100.0: 1.0, 500.0: 2.0}
TARGET_RSS_MB = 200.0


def say(line: str) -> None:
    print(f"  {line}", flush=True)


def load() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.0f}"


# --- measuring ------------------------------------------------------------------------------


def service_of(name: str) -> str:
    return name.rsplit("-", 1)[0] if name.startswith("ingest-") else name


def cpu_now(system: System) -> dict[str, float]:
    """CPU seconds so far per service (ingest processes summed) and per infrastructure part."""
    out: dict[str, float] = {}
    for proc in system.procs:
        if proc.proc is not None and proc.running:
            key = service_of(proc.name)
            out[key] = out.get(key, 0.0) + cpu_seconds(proc.proc.pid)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        pid = int((Path(system.pg.pgdata) / "postmaster.pid").read_text().split()[0])
        out["postgresql"] = tree_cpu_seconds(pid)
    if system.broker is not None and system.broker.process is not None:
        out["kafka"] = cpu_seconds(system.broker.process.pid)
    if system.provider is not None and system.provider.returncode is None:
        out["provider"] = cpu_seconds(system.provider.pid)
    return out


def rss_now(system: System) -> dict[str, float]:
    """Peak RSS so far per process (MB)."""
    return {
        proc.name: peak_rss_mb(proc.proc.pid)
        for proc in system.procs
        if proc.proc is not None and proc.running
    }


@dataclass
class Row:
    occurred: datetime
    recorded: datetime
    opened: datetime
    fired: datetime | None
    created: datetime | None
    sent: datetime | None
    holdout: bool

    def stages(self) -> list[float] | None:
        """Seconds spent in each stage (from the one before), for a message that went."""
        points = [self.occurred, self.recorded, self.opened, self.fired, self.created, self.sent]
        if any(p is None for p in points):
            return None
        times = [p for p in points if p is not None]
        return [(b - a).total_seconds() for a, b in pairwise(times)]


@dataclass
class Phase:
    name: str
    events: int
    rate: float | None  # None: a burst
    produce_seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # seconds over the phase
    settled: bool = False
    wall: float = 0.0

    @property
    def sent(self) -> list[Row]:
        return [r for r in self.rows if r.sent is not None]

    @property
    def expected(self) -> int:
        return sum(1 for r in self.rows if not r.holdout)

    @property
    def span(self) -> float:
        """First event's time → last message sent, seconds."""
        sent = self.sent
        if not sent or not self.rows:
            return float("nan")
        last = max(r.sent for r in sent if r.sent is not None)
        return (last - min(r.occurred for r in self.rows)).total_seconds()

    @property
    def sustained(self) -> float:
        return self.events / self.span if self.span > 0 else float("nan")

    def latencies(self) -> list[float]:
        return [(r.sent - r.occurred).total_seconds() for r in self.rows if r.sent is not None]


# --- the workload -----------------------------------------------------------------------------


async def produce(
    servers: str, topic: str, run: str, n: int, rate: float | None, zones: Sequence[str]
) -> float:
    """``n`` cancellations (each stamped with its produce time), at ``rate`` per second or as
    fast as the producer goes; returns the seconds it took."""
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    started = time.monotonic()
    try:
        futures = []
        for i in range(n):
            if rate is not None:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # the pace of the workload
            _, customer, value = cancellation(run, i, zones[i % len(zones)])
            futures.append(
                await producer.send(topic, value, key=customer.encode(), headers=HEADERS)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - started


# --- the reference: ingest alone ----------------------------------------------------------------


@dataclass
class Reference:
    events: int
    rate: float
    seconds: float


async def ingest_alone(
    system: System, n: int, workers: int, zones: Sequence[str], timeout: float
) -> Reference:
    """W ingest processes and a relay drain ``n`` events produced beforehand, on a database
    and topics of their own (same PostgreSQL, same broker)."""
    assert system.engine is not None
    name = "winback_ingest_alone"
    async with system.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = with_database(system.db_url, name)
    await migrate.upgrade_async(url)
    topics: dict[str, Any] = {
        "inbound": "alone.billing",
        "domain": "alone.customer-events",
        "dead_letter": "alone.dead-letter",
        "erasure": "alone.erasure",
        "partitions": system.partitions,
    }
    await KafkaTransport(system.servers).ensure_topics(
        [topics["inbound"], topics["domain"], topics["dead_letter"], topics["erasure"]],
        system.partitions,
    )
    run = f"{uuid.uuid4().hex[:6]}-alone"
    seconds = await produce(system.servers, topics["inbound"], run, n, None, zones)
    say(f"ingest alone: {n:,} events produced in {seconds:.1f} s; draining")
    env = system.env({"database": {"url": url}, "topics": topics})
    procs = [
        WinbackProcess(
            f"alone-ingest-{i + 1}",
            "ingest",
            {**env, "WINBACK_OUTBOX__RELAY_ENABLED": "false"},
            system.logs,
            system.workdir,
        )
        for i in range(workers)
    ]
    procs.append(WinbackProcess("alone-relay", "relay", env, system.logs, system.workdir))
    engine = make_engine(url, pool_size=1)
    try:
        for proc in procs:
            proc.start()
        popens = [p.proc for p in procs if p.proc is not None]
        await wait_for(engine, run, n, popens, timeout)
        async with engine.connect() as conn:
            span = float(
                await conn.scalar(
                    text(
                        "SELECT extract(epoch FROM max(recorded_at) - min(recorded_at)) "
                        "FROM churn_episodes WHERE source_event_id LIKE :p"
                    ),
                    {"p": f"{run}-%"},
                )
                or 0.0
            )
    finally:
        for proc in procs:
            if proc.running and proc.proc is not None:
                proc.proc.terminate()
        await asyncio.gather(*(asyncio.to_thread(p.stop, 20) for p in procs))
        await engine.dispose()
    return Reference(n, n / span if span > 0 else float("nan"), span)


# --- a phase of the pipeline --------------------------------------------------------------------


@dataclass
class Progress:
    episodes: int
    cases: int
    open_steps: int
    active: int
    sent: int

    def done(self, n: int) -> bool:
        return self.episodes >= n and self.cases >= n and not self.open_steps and not self.active


async def progress(system: System, run: str, keys: Sequence[str]) -> Progress:
    assert system.engine is not None
    customers = f"cus-{run}-%"
    async with system.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT "
                    "(SELECT count(*) FROM churn_episodes WHERE source = :src "
                    " AND customer_id LIKE :c) AS episodes, "
                    "(SELECT count(*) FROM cases WHERE customer_id LIKE :c) AS cases, "
                    "(SELECT count(*) FROM case_steps WHERE customer_id LIKE :c "
                    " AND step_key = ANY(:k) AND NOT state = ANY(:final)) AS open_steps, "
                    "(SELECT count(*) FROM deliveries WHERE customer_id LIKE :c "
                    " AND state IN ('queued', 'sending')) AS active, "
                    "(SELECT count(*) FROM deliveries WHERE customer_id LIKE :c "
                    " AND state = 'sent') AS sent"
                ),
                {"src": SOURCE, "c": customers, "k": list(keys), "final": list(FINAL_STEP_STATES)},
            )
        ).one()
    return Progress(row.episodes, row.cases, row.open_steps, row.active, row.sent)


async def rows_of(system: System, run: str, keys: Sequence[str]) -> list[Row]:
    assert system.engine is not None
    async with system.engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT e.occurred_at, e.recorded_at, c.opened_at, s.fired_at, d.created_at, "
                "d.sent_at, c.holdout "
                "FROM churn_episodes e "
                "JOIN cases c ON c.customer_id = e.customer_id "
                "JOIN case_steps s ON s.case_id = c.id AND s.step_key = ANY(:k) "
                "LEFT JOIN deliveries d ON d.idempotency_key = c.id || ':' || s.step_key "
                "AND d.state = 'sent' "
                "WHERE e.source = :src AND e.customer_id LIKE :c"
            ),
            {"src": SOURCE, "c": f"cus-{run}-%", "k": list(keys)},
        )
        return [Row(*r) for r in result.all()]


async def phase(
    system: System,
    name: str,
    n: int,
    rate: float | None,
    keys: Sequence[str],
    zones: Sequence[str],
    timeout: float,
) -> Phase:
    out = Phase(name, n, rate)
    run = f"{uuid.uuid4().hex[:6]}-{name.replace(' ', '').replace('/', '')}"
    before = cpu_now(system)
    started = time.monotonic()
    out.produce_seconds = await produce(
        system.servers, system.topics.inbound[0], run, n, rate, zones
    )
    said = time.monotonic()

    async def probe() -> Progress:
        nonlocal said
        seen = await progress(system, run, keys)
        if time.monotonic() - said > 10:  # progress, every 10 s
            said = time.monotonic()
            say(
                f"{name}: {time.monotonic() - started:.0f} s, episodes {seen.episodes:,}, "
                f"cases {seen.cases:,}, sent {seen.sent:,}, day-0 steps not final "
                f"{seen.open_steps:,}, deliveries queued/sending {seen.active:,}"
            )
        return seen

    last = await eventually(probe, lambda p: p.done(n), timeout=timeout, interval=0.5)
    out.wall = time.monotonic() - started
    out.settled = last.done(n)
    after = cpu_now(system)
    out.cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    out.rows = await rows_of(system, run, keys)
    return out


# --- printing ----------------------------------------------------------------------------------


def print_phase(p: Phase, reference: Reference | None) -> None:
    what = "burst" if p.rate is None else f"steady {p.rate:g}/s"
    sent = p.sent
    print(f"== {p.name}: {p.events:,} events ({what}), produced in {p.produce_seconds:.1f} s")
    if not p.settled:
        print(f"  NOT SETTLED within the timeout ({p.wall:.0f} s)")
    print(
        f"  messages           {len(sent):,} of {p.expected:,} due "
        f"({len(p.rows) - p.expected:,} holdout cases, no message)"
    )
    share = (
        f", {p.sustained / reference.rate:.0%} of ingest alone"
        if reference is not None and reference.rate == reference.rate
        else ""
    )
    print(
        f"  sustained          {p.sustained:,.0f} events/s ({len(sent) / p.span:,.0f} messages/s), "
        f"first event → last message {p.span:.1f} s{share}"
    )
    latencies = p.latencies()
    print(
        "  event → message    "
        + ", ".join(f"p{q} {ms(pct(latencies, q))} ms" for q in QUANTILES)
        + f", max {ms(max(latencies, default=float('nan')))} ms"
    )
    stages = [s for r in sent if (s := r.stages()) is not None]
    print(
        f"  {'stage (from the one before)':<30}" + "".join(f"{f'p{q} ms':>10}" for q in QUANTILES)
    )
    for i, stage in enumerate(STAGES):
        values = [s[i] for s in stages]
        print(f"    {stage:<28}" + "".join(f"{ms(pct(values, q)):>10}" for q in QUANTILES))


def print_cpu(
    phases: Sequence[Phase], rss_burst: Mapping[str, float], rss_end: Mapping[str, float]
) -> None:
    print("== CPU ms per event (process CPU time over the phase / its events)")
    print(f"  {'':<14}" + "".join(f"{p.name:>14}" for p in phases))
    for service in (*SERVICES, *INFRA):
        if not any(service in p.cpu for p in phases):
            continue
        cells = [
            f"{p.cpu[service] * 1000 / p.events:>14.2f}" if service in p.cpu else f"{'-':>14}"
            for p in phases
        ]
        suffix = "  (reference)" if service in INFRA else ""
        print(f"  {service:<14}" + "".join(cells) + suffix)
    print("== peak RSS MB per process (VmHWM): after the burst, at the end")
    for name, mb in rss_end.items():
        print(f"  {name:<14}{rss_burst.get(name, float('nan')):>8.0f}{mb:>8.0f}")


def print_targets(
    burst: Phase | None,
    steady: Sequence[Phase],
    reference: Reference | None,
    rss_burst: Mapping[str, float],
) -> None:
    def line(ok: bool, what: str) -> None:
        print(f"  [{'met' if ok else 'NOT met'}] {what}")

    print("== targets (issue 11)")
    if burst is not None:
        line(
            burst.sustained >= TARGET_RATE,
            f"sustained ≥ {TARGET_RATE:,.0f} events/s: {burst.sustained:,.0f}",
        )
        if reference is not None:
            share = burst.sustained / reference.rate
            line(
                share >= TARGET_SHARE,
                f"sustained ≥ {TARGET_SHARE:.0%} of ingest alone "
                f"({reference.rate:,.0f}/s): {share:.0%}",
            )
    for p in steady:
        limit = TARGET_P99.get(p.rate or 0.0)
        if limit is not None:
            p99 = pct(p.latencies(), 99)
            line(p99 < limit, f"p99 event → message < {limit:g} s at {p.rate:g}/s: {p99:.2f} s")
    if rss_burst:
        worst = max(rss_burst.items(), key=lambda kv: kv[1])
        line(
            worst[1] < TARGET_RSS_MB,
            f"peak RSS < {TARGET_RSS_MB:.0f} MB per service after "
            f"the burst: largest {worst[0]} {worst[1]:.0f} MB",
        )


# --- the run -------------------------------------------------------------------------------------


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``a.b=c`` items as nested settings ``{"a": {"b": "c"}}``."""
    out: dict[str, Any] = {}
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--setting {item!r}: expected section.name=value")
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    # a fresh topic's first produce may meet a leader not elected yet: retried, not news
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    playbook = next(p for p in load_playbooks_cached() if p.name == PLAYBOOK)
    keys = due_now(playbook)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    setup = Setup(
        ingest_workers=args.ingest_workers,
        provider=args.provider,
        provider_latency=args.provider_latency,
        relay_process=not args.relay_in_services,
        fault_tuning=False,
        settings=parse_settings(args.setting),
    )
    relay = "relay in the services" if args.relay_in_services else "relay"
    print(
        f"pipeline: ingest x{args.ingest_workers}, scheduler, dispatcher, {relay} as processes; "
        f"{args.provider} provider"
        + (f" ({args.provider_latency * 1000:g} ms per answer)" if args.provider == "http" else "")
        + f"; {args.partitions} partitions; {args.events:,} events burst, then "
        + ", ".join(f"{r:g}/s" for r in rates)
        + f" for {args.seconds:g} s each"
        + (f"; settings {args.setting}" if args.setting else ""),
        flush=True,
    )
    print(f"machine: {load()} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="winback-pipeline-bench-") as tmp:
        system = System(Path(tmp), args.partitions, say, setup)
        try:
            return await measure(system, args, keys, rates)
        finally:
            await system.stop()


async def measure(
    system: System, args: argparse.Namespace, keys: Sequence[str], rates: Sequence[float]
) -> int:
    started = time.monotonic()
    await system.start_infrastructure()
    say(f"infrastructure up in {time.monotonic() - started:.1f} s")
    zones = zones_in_window(datetime.now(UTC))[:4]
    reference = None
    if not args.no_reference:
        reference = await ingest_alone(
            system, args.events, args.ingest_workers, zones, args.timeout
        )
        say(f"ingest alone: {reference.rate:,.0f} events/s ({reference.seconds:.1f} s)")
    system.start_processes()
    if not await eventually(system.groups_ready, bool, timeout=120, interval=0.5):
        print_logs(system)
        raise SystemExit("consumer groups not stable in 120 s")
    say(f"processes up; {load()}")
    phases: list[Phase] = []
    failed = False
    burst = await phase(system, "burst", args.events, None, keys, zones, args.timeout)
    phases.append(burst)
    rss_burst = rss_now(system)
    failed |= not burst.settled
    steady: list[Phase] = []
    for rate in rates:
        if failed:
            break
        p = await phase(
            system, f"{rate:g}/s", round(rate * args.seconds), rate, keys, zones, args.timeout
        )
        steady.append(p)
        phases.append(p)
        failed |= not p.settled
    rss_end = rss_now(system)
    files = len(list((system.workdir / "messages" / "email").glob("*.eml")))
    duplicates = 0
    if system.provider is not None:
        stats = await system.provider_stats()
        duplicates = sum(n - 1 for n in stats["requests"].values() if n > 1)
    print(f"machine: {load()} at the end")
    if reference is not None:
        print(
            f"== reference: ingest alone drained {reference.events:,} events at "
            f"{reference.rate:,.0f} events/s ({reference.seconds:.1f} s; ingest x"
            f"{args.ingest_workers} + relay, nothing else running)"
        )
    for p in phases:
        print_phase(p, reference if p is burst else None)
    print_cpu(phases, rss_burst, rss_end)
    sent = sum(len(p.sent) for p in phases)
    if args.provider == "file":
        print(f"== messages: {sent:,} sent, {files:,} .eml files written")
    else:
        print(f"== messages: {sent:,} sent, {duplicates} duplicate provider requests")
    print_targets(burst, steady, reference, rss_burst)
    if failed:
        print_logs(system)
    return 1 if failed else 0


def print_logs(system: System) -> None:
    for proc in system.procs:
        print(f"--- log tail of {proc.name}\n{proc.log_tail(2000)}")


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="events in the burst")
    p.add_argument("--rates", default="100,500", help="steady rates, events/s (comma list)")
    p.add_argument("--seconds", type=float, default=20, help="seconds at each steady rate")
    p.add_argument("--provider", choices=("file", "http"), default="file")
    p.add_argument(
        "--provider-latency", type=float, default=0.0, help="seconds the fake HTTP API waits"
    )
    p.add_argument("--ingest-workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument(
        "--relay-in-services",
        action="store_true",
        help="no relay process: each service relays its own outbox",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the ingest-alone drain")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        help="a setting over the product's defaults, e.g. scheduler.poll_seconds=0.2",
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds per phase to settle")
    sys.exit(asyncio.run(main(p.parse_args(argv))))


if __name__ == "__main__":
    cli()
