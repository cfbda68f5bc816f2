"""Ingest benchmark on the real broker and the real database.

1. Produce N cancellation events (structured CloudEvents, distinct customers; each event's
   ``time`` is its produce time) to a topic with P partitions.
2. Reference: a bare aiokafka consumer reads the whole topic (no decoding, no database).
3. Drain: W ``winback ingest`` processes (one consumer group; the outbox relay off) and one
   ``winback relay`` process (publishing the domain events) consume the backlog. The rate is
   N over the span between the first and the last committed episode (so process start-up and
   the group join are not counted).
4. Latency: with the workers idle, produce at a steady rate for S seconds; the time from
   produce (event time) to the insert inside the committing transaction, per event: p50/p99.

Run: .venv/bin/python -m bench.ingest_bench [--events 100000 --workers 2 --rate 2000]
Starts its own PostgreSQL (pgserver) and Kafka unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import migrate
from shared.db.engine import make_engine, normalise_url
from shared.messaging.kafka import KafkaTransport
from tests.support.procs import spawn_winback, stop_process

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
    servers: str, topic: str, start: int, n: int, run: str, rate: float | None = None
) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = []
        for i in range(start, start + n):
            if rate is not None:
                delay = t0 + (i - start) / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(
                await producer.send(topic, event(i, run), key=f"cus_{i}".encode(), headers=HEADERS)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n / (time.perf_counter() - t0)


async def bare_read(servers: str, topic: str, partitions: int, n: int) -> float:
    """The reference: read every record once with a bare consumer (no group, no work)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        enable_auto_commit=False,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        t0 = time.perf_counter()
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
            seen += sum(len(v) for v in batches.values())
        return n / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


async def count(engine: AsyncEngine, run: str) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text("SELECT count(*) FROM churn_episodes WHERE source_event_id LIKE :p"),
                {"p": f"{run}-%"},
            )
            or 0
        )


async def wait_for(
    engine: AsyncEngine, run: str, n: int, procs: list[subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while await count(engine, run) < n:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a worker exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"not drained in {timeout} s")
        await asyncio.sleep(0.2)


def spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_winback(command, env, log)


async def run(args: argparse.Namespace, db_url: str, servers: str, logs: Path) -> None:
    await migrate.upgrade_async(db_url)
    runid = uuid.uuid4().hex[:6]
    topic, domain = f"bench-in-{runid}", f"bench-domain-{runid}"
    transport = KafkaTransport(servers)
    await transport.ensure_topics(
        [topic, domain, f"bench-dlq-{runid}", f"bench-erasure-{runid}"], args.partitions
    )
    n = args.events
    produce_rate = await produce(servers, topic, 0, n, runid)
    raw_rate = await bare_read(servers, topic, args.partitions, n)

    env = {
        **os.environ,
        "WINBACK_DATABASE__URL": db_url,
        "WINBACK_DATABASE__POOL_SIZE": "4",
        "WINBACK_KAFKA__BOOTSTRAP_SERVERS": servers,
        "WINBACK_KAFKA__MAX_BATCH": str(args.batch),
        "WINBACK_TOPICS__INBOUND": topic,
        "WINBACK_TOPICS__DOMAIN": domain,
        "WINBACK_TOPICS__DEAD_LETTER": f"bench-dlq-{runid}",
        "WINBACK_TOPICS__ERASURE": f"bench-erasure-{runid}",
        "WINBACK_TOPICS__PARTITIONS": str(args.partitions),
        "WINBACK_HTTP__INGEST_PORT": "0",
        "WINBACK_HTTP__RELAY_PORT": "0",
        "WINBACK_LOG_LEVEL": "WARNING",
    }
    engine = make_engine(db_url, pool_size=2)
    procs = [
        spawn("ingest", {**env, "WINBACK_OUTBOX__RELAY_ENABLED": "false"}, logs / f"ingest-{i}.log")
        for i in range(args.workers)
    ]
    procs.append(spawn("relay", env, logs / "relay.log"))
    try:
        await wait_for(engine, runid, n, procs, timeout=900)
        async with engine.connect() as conn:
            span = (
                await conn.execute(
                    text(
                        "SELECT extract(epoch FROM max(recorded_at) - min(recorded_at)) AS s "
                        "FROM churn_episodes WHERE source_event_id LIKE :p"
                    ),
                    {"p": f"{runid}-%"},
                )
            ).one()
        drain_rate = n / float(span.s)

        steady = int(args.rate * args.seconds)
        await produce(servers, topic, n, steady, runid, rate=args.rate)
        await wait_for(engine, runid, n + steady, procs, timeout=300)
        async with engine.connect() as conn:
            lat = (
                await conn.execute(
                    text(
                        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, "
                        "percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99, max(ms) AS max "
                        "FROM (SELECT extract(epoch FROM recorded_at - occurred_at) * 1000 AS ms "
                        "FROM churn_episodes WHERE source_event_id LIKE :p "
                        "AND split_part(source_event_id, '-', 2)::int >= :n) AS t"
                    ),
                    {"p": f"{runid}-%", "n": n},
                )
            ).one()
            await asyncio.sleep(2)
            backlog = await conn.scalar(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            stop_process(p)
        await engine.dispose()

    print(
        f"events                      {n:,} on {args.partitions} partitions, max batch {args.batch}"
    )
    print(f"produce rate                {produce_rate:,.0f} events/s")
    print(f"bare aiokafka read (ref)    {raw_rate:,.0f} events/s")
    print(
        f"ingest drain                {drain_rate:,.0f} events/s with {args.workers} "
        f"consumer process(es) + 1 relay process ({drain_rate / raw_rate:.1%} of the bare "
        f"read rate)"
    )
    print(f"steady load                 {args.rate:,.0f} events/s for {args.seconds:g} s")
    print(
        f"produce→commit latency      p50 {lat.p50:.0f} ms, p99 {lat.p99:.0f} ms, "
        f"max {lat.max:.0f} ms"
    )
    print(f"outbox rows unpublished 2 s after the steady load: {backlog}")


def print_logs(logs: Path) -> None:
    for log in sorted(logs.iterdir()):
        print(f"--- {log.name}\n{log.read_text()[-3000:]}")


async def main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-logs-")))
        db_url = os.environ.get("DATABASE_URL")
        if not db_url:
            from shared.local.postgres import start_embedded

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))
            db_url, server = start_embedded(Path(tmp), cleanup="delete")
            stack.callback(server.cleanup)
        servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not servers:
            from shared.local.kafka_broker import LocalKafka

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-"))
            broker = LocalKafka(Path(tmp), heap="1g").start()
            stack.callback(broker.stop)
            servers = broker.bootstrap_servers
        try:
            await run(args, normalise_url(db_url), servers, logs)
        except SystemExit:
            print_logs(logs)
            raise


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--workers", type=int, default=3, help="ingest consumer processes")
    p.add_argument("--rate", type=float, default=2000, help="steady-load events/s")
    p.add_argument("--seconds", type=float, default=10, help="steady-load duration")
    asyncio.run(main(p.parse_args(argv)))


if __name__ == "__main__":
    cli()
