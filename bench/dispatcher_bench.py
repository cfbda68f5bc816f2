"""Dispatcher benchmark on the real broker and the real database, against the fake provider.

1. Reference: bare httpx — clients like the dispatcher's (count, pool size, concurrency), no
   dispatcher — POSTing SendGrid-shaped requests to the fake provider (which answers after
   ``--latency``): the request rate the HTTP layer alone reaches on this machine, over our
   pooled transport and over httpx's default one.
2. Burst: N customers with open cases; with the dispatcher running and idle, N dispatch
   commands (structured CloudEvents, one step each) are produced to the dispatch topic as
   fast as possible. Measured: sends/s from the first command produced to the last delivery
   recorded ``sent`` (consume → delivery row → claim, re-check, render → provider call →
   record + outcome event in the outbox, relay publishing), command→send latency
   (``sent_at`` minus the command's ``requested_at``) p50/p99, and the peak RSS.
3. Steady load (``--rate`` commands/s for ``--seconds``): command→send latency p50/p99 when
   the dispatcher keeps up, and the peak RSS again (bounded: it does not grow with volume).
4. Exactly once: the fake counts the accepted requests per idempotency key.

The fake provider and the producer of the commands run in processes of their own, so their
CPU is not counted as the dispatcher's.

With ``--provider file`` email goes to the embedded file provider (one ``.eml`` per message
in a temporary folder) instead of the fake SendGrid: the same run then also measures the
reference for it, the same number of files of the same size written by a bare loop (open,
write, close, rename), and checks one file per idempotency key.

With ``--processes N`` (N > 1) the dispatcher runs as N ``winback dispatcher`` processes, as
it is deployed scaled out (one consumer group, claims with ``FOR UPDATE SKIP LOCKED``); their
CPU time and peak RSS are read from /proc.

Run: .venv/bin/python -m bench.dispatcher_bench [--commands 20000] [--latency 0.05]
     [--processes 1] [--rate 500 --seconds 10] [--in-flight 1024 --clients 4
     --connections 256] [--transport pooled|httpx] [--provider http|file] [--profile FILE]
Starts its own PostgreSQL (pgserver) and Kafka unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS
(a database used before is fine: only this run's rows are counted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import func, select, text

from services.dispatcher.bootstrap import CONSUMER, bootstrap
from services.dispatcher.channels import make_http_clients
from services.dispatcher.providers.base import post
from shared import domain_events as de
from shared.db import migrate
from shared.db.engine import make_engine, normalise_url
from shared.db.tables import deliveries
from shared.gc_tuning import tune_for_service
from shared.messaging.kafka import KafkaTransport
from shared.settings import Settings, load_settings
from tests.support.procs import as_env, peak_rss_mb, spawn_winback, stop_process
from tests.support.procs import cpu_seconds as process_cpu_seconds

HEADERS = [("content-type", b"application/cloudevents+json")]


# --- the fake provider, in a process of its own ---------------------------------------------


def fake_provider(conn: Connection, latency: float) -> None:
    from tests.fakes.provider_server import FakeProviderServer

    async def serve() -> None:
        async with FakeProviderServer(keep_bodies=False) as server:
            server.set_latency("sendgrid", latency)
            conn.send(server.port)
            loop = asyncio.get_running_loop()
            while (await loop.run_in_executor(None, conn.recv)) == "stats":
                keys = Counter(r.idempotency_key for r in server.accepted("sendgrid"))
                conn.send(
                    {
                        "requests": len(server.requests),
                        "accepted": sum(keys.values()),
                        "most_per_key": max(keys.values(), default=0),
                    }
                )
                server.reset()
                server.set_latency("sendgrid", latency)

    asyncio.run(serve())


# --- load ----------------------------------------------------------------------------------


def command(i: int, run: str) -> bytes:
    cid = f"cus_{run}_{i}"
    case = f"case-{run}-{i}"
    now = datetime.now(UTC)
    data = {
        "idempotency_key": f"{case}:d0_we_miss_you",
        "case_id": case,
        "step_id": i + 1,  # the contract: a step row id, from 1
        "step_key": "d0_we_miss_you",
        "playbook": "price_discount",
        "playbook_version": 1,
        "channel": "email",
        "template": "we_miss_you",
        "offer": None,
        "is_discount": False,
        "variant": "control",
        "valid_until": None,
        "customer": {
            "id": cid,
            "email": f"{cid}@example.com",
            "phone": None,
            "name": "Aino",
            "locale": "en",
            "timezone": "Europe/Helsinki",
            "plan": "pro",
            "crm_owner": "owner-1",
        },
        "reason": "price",
        "features": ["Dashboards"],
        "feature_description": None,
        "requested_at": now.isoformat(),
        # as the scheduler sends them: the re-check at send time parses both (the window
        # spans the whole day, with the grace covering its last minute, so nothing is held)
        "send_window": {"start": "00:00", "end": "23:59", "timezone": "Europe/Helsinki"},
        "expires_at": (now + timedelta(days=30)).isoformat(),
    }
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{run}-{i}",
            "source": "/bench/scheduler",
            "type": de.DISPATCH_REQUESTED,
            "time": now.isoformat(),
            "data": data,
        }
    )


async def send_commands(
    producer: AIOKafkaProducer, topic: str, start: int, n: int, run: str, rate: float | None
) -> None:
    futures = []
    t0 = time.perf_counter()
    for i in range(start, start + n):
        if rate is not None:
            delay = t0 + (i - start) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        futures.append(
            await producer.send(
                topic, command(i, run), key=f"cus_{run}_{i}".encode(), headers=HEADERS
            )
        )
    await asyncio.gather(*futures)


def producer_process(
    conn: Connection, servers: str, topic: str, start: int, n: int, run: str, rate: float | None
) -> None:
    """Connects, says ``ready``, waits for ``go``, produces, answers with the seconds taken."""

    async def main() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=servers, linger_ms=5, max_batch_size=512 * 1024
        )
        await producer.start()
        try:
            await producer.partitions_for(topic)  # metadata before the clock starts
            conn.send("ready")
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            t0 = time.perf_counter()
            await send_commands(producer, topic, start, n, run, rate)
            conn.send(time.perf_counter() - t0)
        finally:
            await producer.stop()

    asyncio.run(main())


class Producer:
    """The commands produced from a process of its own (its CPU is not the dispatcher's)."""

    def __init__(
        self, servers: str, topic: str, start: int, n: int, run: str, rate: float | None = None
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(
            target=producer_process,
            args=(theirs, servers, topic, start, n, run, rate),
            daemon=True,
        )
        self._proc.start()

    async def _recv(self) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._conn.recv)
        except EOFError:
            raise SystemExit(f"the producer exited with {self._proc.exitcode}") from None

    async def ready(self) -> Producer:
        if await self._recv() != "ready":
            raise SystemExit("the producer did not start")
        return self

    async def run(self) -> float:
        """Produce every command; the seconds from ``go`` until all were acknowledged."""
        self._conn.send("go")
        seconds = float(await self._recv())
        await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 30)
        return seconds


async def seed(db_url: str, run: str, n: int) -> None:
    """The rows the re-check reads: each customer in the scheduler's view, an open case."""
    engine = make_engine(db_url, pool_size=1)
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO scheduler_customers (id, email, name, locale, timezone, "
                "mrr_minor, currency, crm_owner, updated_at) "
                "SELECT 'cus_' || :run || '_' || i, 'cus_' || :run || '_' || i || '@example.com', "
                "'Aino', 'en', 'Europe/Helsinki', 4900, 'EUR', 'owner-1', :now "
                "FROM generate_series(0, :n - 1) AS i"
            ),
            {"run": run, "n": n, "now": now},
        )
        await conn.execute(
            text(
                "INSERT INTO cases (id, customer_id, episode_id, status, playbook, "
                "playbook_version, segment, episode, churned_at, opened_at, expires_at) "
                "SELECT 'case-' || :run || '-' || i, 'cus_' || :run || '_' || i, "
                "'ep-' || :run || '-' || i, 'open', 'price_discount', 1, "
                "'{\"labels\": [\"high_value\"]}'::jsonb, '{}'::jsonb, :now, :now, :later "
                "FROM generate_series(0, :n - 1) AS i"
            ),
            {"run": run, "n": n, "now": now, "later": now + timedelta(days=365)},
        )
    await engine.dispose()


async def bare_httpx(settings: Settings, port: int, n: int, transport: str) -> float:
    """Reference: clients like the dispatcher's (same count, pool size and concurrency) over
    ``transport``, POSTing straight to the fake through the adapters' ``post`` (the same
    request path, JSON encoding included, minus everything else the dispatcher does)."""
    http = settings.dispatcher.http.model_copy(update={"transport": transport})
    clients = make_http_clients(settings.dispatcher.model_copy(update={"http": http}))
    body = {
        "personalizations": [{"to": [{"email": "aino@example.com"}]}],
        "from": {"email": "hello@acme.example"},
        "subject": "We miss you",
        "content": [
            {"type": "text/plain", "value": "x" * 1200},
            {"type": "text/html", "value": "<p>" + "x" * 2400 + "</p>"},
        ],
        "custom_args": {"idempotency_key": "bench"},
    }
    url = f"http://127.0.0.1:{port}/v3/mail/send"
    gate = asyncio.Semaphore(settings.dispatcher.max_in_flight)

    async def one(i: int) -> None:
        async with gate:
            response = await post(
                clients[i % len(clients)],
                "sendgrid",
                url,
                json=body,
                headers={"Authorization": "Bearer SG.bench"},
            )
            assert response.status_code == 202

    try:
        await asyncio.gather(*(one(i) for i in range(min(n, 200))))  # warm the pools
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def bare_files(n: int, size: int) -> tuple[float, float]:
    """Reference for the file provider: ``n`` files of ``size`` bytes written by a bare loop
    as the provider writes each (temporary name, write, close, rename into place), in one
    thread. Returns (files/s, CPU ms per file)."""
    data = b"x" * size
    with tempfile.TemporaryDirectory(prefix="bench-files-") as tmp:
        folder = Path(tmp)
        started, cpu_started = time.perf_counter(), time.process_time()
        for i in range(n):
            temporary = folder / f".tmp-{i}.eml"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
            os.replace(temporary, folder / f"message-{i}.eml")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return n / seconds, cpu / n * 1000


def cpu_seconds() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def system_seconds(pid: int) -> float:
    """System CPU time of a running process, from /proc (the kernel's share of its time:
    socket and file system calls)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


async def latency(engine: Any, since_id: int) -> tuple[float, float, float]:
    """p50, p99 and max command→send latency (ms) of the deliveries after ``since_id``."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY s), max(s) "
                    "FROM (SELECT EXTRACT(EPOCH FROM sent_at - "
                    "CAST(command->>'requested_at' AS timestamptz)) * 1000 AS s "
                    "FROM deliveries WHERE state = 'sent' AND id > :id) AS t"
                ),
                {"id": since_id},
            )
        ).one()
    (p50, p99), worst = row[0] or (float("nan"), float("nan")), row[1]
    return float(p50), float(p99), float(worst or float("nan"))


def settings_overrides(
    args: argparse.Namespace, db_url: str, servers: str, port: int, runid: str, files: Path
) -> dict[str, Any]:
    sendgrid = {
        "kind": "sendgrid",
        "base_url": f"http://127.0.0.1:{port}",
        "api_key": "SG.bench",
        "from_address": "hello@acme.example",
    }
    files_provider = {
        "kind": "file",
        "directory": str(files),
        "from_address": "hello@acme.example",
        "from_name": "Acme",
    }
    return {
        "database": {"url": db_url, "pool_size": 10},
        "kafka": {"bootstrap_servers": servers, "max_batch": args.batch},
        "topics": {
            "dispatch": f"bench-dispatch-{runid}",
            "outcomes": f"bench-outcomes-{runid}",
            "erasure": f"bench-erasure-{runid}",
            "dead_letter": f"bench-dlq-{runid}",
            "partitions": args.partitions,
        },
        "dispatcher": {
            "email": {"primary": files_provider if args.provider == "file" else sendgrid},
            "max_in_flight": args.in_flight,
            "http": {
                "clients": args.clients,
                "max_connections": args.connections,
                "transport": args.transport,
            },
            "claim_batch": args.batch,
            "poll_seconds": 0.02,
        },
    }


# --- dispatcher processes (--processes N > 1) -----------------------------------------------


class Workers:
    """N ``winback dispatcher`` processes (one consumer group; claims with SKIP LOCKED; the
    outbox relay in each, one of them leading), with their CPU time and peak RSS from /proc."""

    def __init__(self, n: int, env: dict[str, str], logs: Path) -> None:
        self.logs = logs
        self.procs = [
            spawn_winback("dispatcher", env, logs / f"dispatcher-{i}.log") for i in range(n)
        ]

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                for log in sorted(self.logs.iterdir()):
                    print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
                raise SystemExit(f"a dispatcher process exited with {proc.returncode}")

    def cpu_seconds(self) -> tuple[float, float]:
        """(user + system, system) CPU seconds of the processes together."""
        return (
            sum(process_cpu_seconds(proc.pid) for proc in self.procs),
            sum(system_seconds(proc.pid) for proc in self.procs),
        )

    def rss_mb(self) -> list[float]:
        """Peak resident memory (VmHWM) of each process."""
        return [peak_rss_mb(proc.pid) for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            stop_process(proc)


# --- the run -------------------------------------------------------------------------------


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
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        fake = ctx.Process(target=fake_provider, args=(theirs, args.latency), daemon=True)
        fake.start()
        try:
            port = ours.recv()
            await run(args, db_url, servers, port, ours)
        finally:
            ours.send("stop")
            fake.join(10)


async def group_ready(servers: str, group: str, members: int, timeout: float = 120) -> None:
    """Wait until the consumer group is ``Stable`` with ``members`` members (so the burst is
    not measured across the workers' joins and the rebalances they cause)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the coordinator may not exist yet
                (response,) = await admin.describe_consumer_groups([group])
                for described in response.groups:
                    if described[2] == "Stable" and len(described[5]) == members:
                        return
            await asyncio.sleep(0.5)
        raise SystemExit(f"consumer group {group} not stable with {members} members in time")
    finally:
        await admin.close()


async def run(
    args: argparse.Namespace, db_url: str, servers: str, port: int, fake: Connection
) -> None:
    await migrate.upgrade_async(db_url)
    runid = uuid.uuid4().hex[:6]
    n = args.commands
    steady = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory(prefix="bench-messages-") as files:
        await measure(args, db_url, servers, port, fake, runid, n, steady, Path(files))


async def max_ids(engine: Any) -> tuple[int, int]:
    """The highest delivery and outbox ids so far: this run counts only the rows after them
    (the database may hold earlier runs')."""
    async with engine.connect() as conn:
        delivery = await conn.scalar(text("SELECT max(id) FROM deliveries"))
        outbox = await conn.scalar(text("SELECT max(id) FROM outbox"))
    return int(delivery or 0), int(outbox or 0)


async def measure(
    args: argparse.Namespace,
    db_url: str,
    servers: str,
    port: int,
    fake: Connection,
    runid: str,
    n: int,
    steady: int,
    files: Path,
) -> None:
    overrides = settings_overrides(args, db_url, servers, port, runid, files)
    settings = load_settings(**overrides)
    reference = await bare_httpx(settings, port, args.reference, args.transport)
    other = "httpx" if args.transport == "pooled" else "pooled"
    reference_other = await bare_httpx(settings, port, args.reference // 5, other)
    fake.send("stats")
    fake.recv()
    # the size of the bench's .eml (3.6 KB)
    file_reference = bare_files(n, 3600) if args.provider == "file" else None

    await seed(db_url, runid, n + steady)
    engine = make_engine(db_url, pool_size=2)
    first_delivery, first_outbox = await max_ids(engine)
    transport = KafkaTransport(servers)
    topics = settings.topics
    await transport.ensure_topics(
        [topics.dispatch, topics.outcomes, topics.erasure, topics.dead_letter], args.partitions
    )

    async def sent() -> int:
        async with engine.connect() as conn:
            return int(
                await conn.scalar(
                    select(func.count())
                    .select_from(deliveries)
                    .where(deliveries.c.state == "sent", deliveries.c.id > first_delivery)
                )
                or 0
            )

    service = None
    workers = None
    with ExitStack() as stack:
        if args.processes == 1:
            # a consumer group of its own: on a shared broker another "dispatcher" member
            # joining or leaving (a test session) would stop this one for each rebalance
            service = bootstrap(
                settings, engine=make_engine(db_url, pool_size=10), group=f"bench-{runid}"
            )
            await service.core.runtime.start()
            await service.core.runtime.wait_consuming()
            tune_for_service()  # the collector set as `winback dispatcher` sets it
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-logs-")))
            env = {
                **os.environ,
                **as_env(overrides),
                "WINBACK_HTTP__DISPATCHER_PORT": "0",
                "WINBACK_HTTP__RELAY_PORT": "0",
                "WINBACK_LOG_LEVEL": "WARNING",
            }
            workers = Workers(args.processes, env, logs)
            stack.callback(workers.stop)
            await group_ready(servers, CONSUMER, args.processes)

        def process_cpu() -> tuple[float, float]:
            return cpu_seconds() if workers is None else workers.cpu_seconds()

        def process_rss() -> list[float]:
            return [rss_mb()] if workers is None else workers.rss_mb()

        async def wait_sent(total: int) -> None:
            while await sent() < total:
                if workers is not None:
                    workers.check()
                await asyncio.sleep(0.05)

        rss_idle = process_rss()
        producer = await Producer(servers, topics.dispatch, 0, n, runid).ready()
        if args.profile and service is not None:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        print(f"burst: {n} commands (pid {os.getpid()})", file=sys.stderr, flush=True)
        started, cpu_started = time.perf_counter(), process_cpu()
        produced = await producer.run()
        await wait_sent(n)
        burst_seconds = time.perf_counter() - started
        cpu_ended = process_cpu()
        burst_cpu, burst_system = cpu_ended[0] - cpu_started[0], cpu_ended[1] - cpu_started[1]
        if args.profile and service is not None:
            import pstats

            prof.disable()
            prof.dump_stats(args.profile)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        burst_p50, burst_p99, burst_max = await latency(engine, first_delivery)
        rss_burst = process_rss()

        async with engine.connect() as conn:
            last_id = int(await conn.scalar(select(func.max(deliveries.c.id))) or 0)
        if steady:
            paced = await Producer(servers, topics.dispatch, n, steady, runid, args.rate).ready()
            await paced.run()
            await wait_sent(n + steady)
        steady_p50, steady_p99, steady_max = await latency(engine, last_id)
        rss_end = process_rss()
        await asyncio.sleep(1)  # let the relay publish the last outcome events
        if service is not None:
            await service.core.runtime.stop()
            await service.aclose()
            await service.core.engine.dispose()
    async with engine.connect() as conn:
        states: dict[str, int] = dict(
            (
                await conn.execute(
                    text("SELECT state, count(*) FROM deliveries WHERE id > :id GROUP BY state"),
                    {"id": first_delivery},
                )
            ).all()
        )
        unpublished = await conn.scalar(
            text("SELECT count(*) FROM outbox WHERE published_at IS NULL AND id > :id"),
            {"id": first_outbox},
        )
    await engine.dispose()
    fake.send("stats")
    stats = fake.recv()
    written = sorted((files / "email").glob("*.eml")) if args.provider == "file" else []
    temporary = list((files / "email").glob(".tmp-*")) if args.provider == "file" else []

    def mb(values: list[float]) -> str:
        return " + ".join(f"{v:,.0f}" for v in values) + " MB"

    rate = n / burst_seconds
    where = (
        "in the bench process (producer in a process of its own)"
        if workers is None
        else f"{args.processes} winback dispatcher processes"
    )
    print(f"commands (burst)              {n} (produced in {produced:.1f} s)")
    if args.provider == "file":
        print("provider                      file (one .eml per message)")
    else:
        answer = f"{args.latency * 1000:.0f} ms"
        print(f"provider                      fake SendGrid, answering after {answer}")
    print(f"dispatcher                    {where}")
    print(f"in flight / clients x conns   {args.in_flight} / {args.clients} x {args.connections}")
    print(
        f"bare httpx reference          {reference:,.0f} requests/s over the {args.transport} "
        f"transport, {reference_other:,.0f} over the {other} one (same clients, same fake)"
    )
    if file_reference is not None:
        print(
            f"bare file reference           {file_reference[0]:,.0f} files/s, "
            f"{file_reference[1]:.3f} ms CPU per file (temporary, write, rename; one thread)"
        )
    versus = (
        ""
        if args.provider == "file"
        else f"; {rate / reference:.0%} of the bare httpx rate over the same transport"
    )
    print(f"dispatcher burst              {rate:,.0f} sends/s ({burst_seconds:.1f} s{versus})")
    print(
        f"dispatcher CPU                {burst_cpu:.1f} s = {burst_cpu / burst_seconds:.0%} of "
        f"one core, {burst_cpu / n * 1000:.2f} ms per send ({burst_system:.1f} s of it in "
        "the kernel)"
    )
    print(
        f"burst command→send latency    p50 {burst_p50:,.0f} ms, p99 {burst_p99:,.0f} ms, "
        f"max {burst_max:,.0f} ms (includes waiting in the backlog)"
    )
    if steady:
        print(
            f"steady {args.rate:,.0f}/s for {args.seconds:.0f} s        "
            f"p50 {steady_p50:,.0f} ms, p99 {steady_p99:,.0f} ms, max {steady_max:,.0f} ms"
        )
    print(
        f"peak RSS per process          idle {mb(rss_idle)}, after burst {mb(rss_burst)}, "
        f"at end {mb(rss_end)}"
    )
    print(f"deliveries by state           {states}")
    if args.provider == "file":
        print(
            f"files written                 {len(written)} .eml for {n + steady} keys "
            f"(one per key), {len(temporary)} temporary files left"
        )
    else:
        print(
            f"provider requests             {stats['requests']} accepted {stats['accepted']}, "
            f"most per idempotency key {stats['most_per_key']}"
        )
    print(f"outbox rows unpublished       {unpublished}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--commands", type=int, default=20_000)
    p.add_argument("--latency", type=float, default=0.05, help="fake provider answer delay (s)")
    p.add_argument("--rate", type=float, default=500, help="steady phase commands/s (0: skip)")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--in-flight", type=int, default=1024, help="dispatcher.max_in_flight")
    p.add_argument("--clients", type=int, default=4, help="dispatcher.http.clients")
    p.add_argument("--connections", type=int, default=256, help="dispatcher.http.max_connections")
    p.add_argument("--transport", choices=["pooled", "httpx"], default="pooled")
    p.add_argument(
        "--provider",
        choices=["http", "file"],
        default="http",
        help="email through the fake SendGrid (http) or the embedded file provider (file)",
    )
    p.add_argument("--reference", type=int, default=10_000, help="bare httpx requests")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="dispatcher processes: 1 runs it in the bench process, N > 1 starts N "
        "`winback dispatcher` processes",
    )
    p.add_argument("--profile", metavar="FILE", help="cProfile the burst (--processes 1)")
    return p.parse_args(argv)


def cli(argv: list[str] | None = None) -> Any:
    return asyncio.run(main(parse(argv)))


if __name__ == "__main__":
    cli()
