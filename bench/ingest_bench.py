"""Ingest benchmark on the real broker and the real database.

1. Produce N cancellation events (structured CloudEvents, distinct customers) to a topic.
2. Reference: a bare aiokafka consumer reads the whole topic (no decoding, no database).
3. Drain: the ingest service (decode, inbox, customers, episodes, outbox, offset commit, and
   the outbox relay publishing the domain events) consumes the same backlog; events/s.
4. Latency: with ingest running and idle, produce at a steady rate and measure, per event,
   the time from the producer's record timestamp to the commit of its transaction; p50/p99.

Run: .venv/bin/python -m bench.ingest_bench [--events 100000] [--rate 2000 --seconds 10]
Starts its own PostgreSQL (pgserver) and Kafka unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import func, select, text

from services.ingest.bootstrap import bootstrap
from shared.db import migrate
from shared.db.engine import make_engine, normalise_url
from shared.db.tables import churn_episodes
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.kafka import KafkaTransport
from shared.messaging.transport import Record
from shared.settings import load_settings

HEADERS = [("content-type", b"application/cloudevents+json")]


def event(i: int, run: str) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{run}-{i}",
            "source": "/bench/billing",
            "type": "com.example.subscription.cancelled",
            "time": datetime.now(UTC).isoformat(),
            "data": {
                "customer_id": f"cus_{run}_{i}",
                "reason": "too_expensive",
                "comment": "bench",
                "customer": {
                    "email": f"c{i}@example.com",
                    "timezone": "Europe/Helsinki",
                    "mrr_minor": 4900,
                    "currency": "EUR",
                    "engagement": "high",
                },
            },
        }
    )


async def produce(
    bootstrap_servers: str, topic: str, start: int, n: int, run: str, rate: float | None = None
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        futures = []
        t0 = time.perf_counter()
        for i in range(start, start + n):
            if rate is not None:
                due = t0 + (i - start) / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(
                await producer.send(topic, event(i, run), key=f"cus_{i}".encode(), headers=HEADERS)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def bare_read(bootstrap_servers: str, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    await consumer.start()
    seen = 0
    started: float | None = None
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            if started is None and batches:
                started = time.perf_counter()
            seen += sum(len(v) for v in batches.values())
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        await consumer.stop()
    return n / elapsed


class TimedRunner(ConsumerRunner):
    """Records produce→commit latency for each record after its transaction committed."""

    latencies: list[float]
    busy: float
    batches: int

    async def process(self, records: list[Record]) -> None:
        t = time.perf_counter()
        await super().process(records)
        self.busy += time.perf_counter() - t
        self.batches += 1
        now_ms = time.time() * 1000
        self.latencies.extend(now_ms - (r.timestamp_ms or now_ms) for r in records)


async def main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        db_url = os.environ.get("DATABASE_URL")
        if not db_url:
            from shared.local.postgres import start_embedded

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))
            db_url, server = start_embedded(Path(tmp), cleanup="delete")
            stack.callback(server.cleanup)
        db_url = normalise_url(db_url)
        servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not servers:
            from shared.local.kafka_broker import LocalKafka

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-"))
            broker = LocalKafka(Path(tmp), heap="1g").start()
            stack.callback(broker.stop)
            servers = broker.bootstrap_servers
        await run(args, db_url, servers)


async def run(args: argparse.Namespace, db_url: str, servers: str) -> None:
    await migrate.upgrade_async(db_url)
    runid = uuid.uuid4().hex[:6]
    settings = load_settings(
        database={"url": db_url},
        kafka={"bootstrap_servers": servers, "max_batch": args.batch},
        topics={
            "inbound": [f"bench-in-{runid}"],
            "domain": f"bench-domain-{runid}",
            "dead_letter": f"bench-dlq-{runid}",
            "partitions": args.partitions,
        },
    )
    topic = settings.topics.inbound[0]
    transport = KafkaTransport(servers)
    await transport.ensure_topics(
        [topic, settings.topics.domain, settings.topics.dead_letter], args.partitions
    )
    n = args.events
    t0 = time.perf_counter()
    await produce(servers, topic, 0, n, runid)
    produce_rate = n / (time.perf_counter() - t0)

    raw_rate = await bare_read(servers, topic, n)

    engine = make_engine(db_url, pool_size=5)
    service = bootstrap(settings, engine=engine)
    runner = TimedRunner(
        service.consumer.subscription,
        service.pipeline,
        max_batch=args.batch,
        poll_timeout_ms=100,
        linger_ms=settings.kafka.batch_linger_ms,
    )
    runner.latencies = []
    runner.busy = 0.0
    runner.batches = 0
    service.core.runtime.consumers[:] = [runner]

    async def count() -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(churn_episodes)) or 0)

    if args.no_relay:

        async def idle() -> None:
            return None

        service.core.runtime.relay.run = idle  # type: ignore[method-assign]
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    await service.core.runtime.start()
    started = time.perf_counter()
    while await count() < n:  # noqa: ASYNC110 - polling the database is the measurement
        await asyncio.sleep(0.05)
    drain_seconds = time.perf_counter() - started
    drain_rate = n / drain_seconds
    print(f"drain: {runner.batches} batches, {runner.busy:.1f} s inside process()")
    if args.profile:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)

    runner.latencies.clear()
    steady = int(args.rate * args.seconds)
    await produce(servers, topic, n, steady, runid, rate=args.rate)
    while await count() < n + steady:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    lat = sorted(runner.latencies)
    await service.core.runtime.stop()
    async with engine.connect() as conn:
        backlog = await conn.scalar(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
    await engine.dispose()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    print(f"events                      {n}")
    print(f"partitions / max batch      {args.partitions} / {args.batch}")
    print(f"produce rate                {produce_rate:,.0f} events/s")
    print(f"bare aiokafka read (ref)    {raw_rate:,.0f} events/s")
    print(
        f"ingest drain                {drain_rate:,.0f} events/s "
        f"({drain_seconds:.1f} s; {drain_rate / raw_rate:.1%} of the bare read rate)"
    )
    print(f"steady load                 {args.rate:,.0f} events/s for {args.seconds} s")
    print(
        f"produce→commit latency      p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, "
        f"max {lat[-1] if lat else float('nan'):.0f} ms (n={len(lat)})"
    )
    print(f"outbox rows left unpublished at stop: {backlog}")
    if lat:
        print(f"mean latency                {statistics.fmean(lat):.0f} ms")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--profile", action="store_true", help="cProfile the drain phase")
    p.add_argument("--no-relay", action="store_true", help="leave the outbox unpublished")
    return p.parse_args(argv)


def cli(argv: list[str] | None = None) -> Any:
    return asyncio.run(main(parse(argv)))


if __name__ == "__main__":
    cli()
