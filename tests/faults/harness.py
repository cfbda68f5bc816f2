"""The fault harness: the whole system as separate OS processes on a real broker and a real
PostgreSQL of its own, a stream of cancellations (and hostile records) produced over the run,
and crashes injected while it flows — then what came out, checked against what went in.

- Infrastructure it owns and may break: an embedded PostgreSQL (``pgserver``; crashed with
  ``pg_ctl stop -m immediate`` and started again on the same socket) and a KRaft broker
  (``LocalKafka``; its JVM SIGKILLed and started again on the same ports and data).
- Processes: ``winback ingest`` (two), ``winback scheduler``, ``winback dispatcher`` (the three
  with their outbox relay off) and ``winback relay``, configured by environment; the fake
  provider (``tests.faults.provider``) answers the dispatcher's SendGrid calls and counts
  requests per idempotency key.
- Workload: ``events`` ``subscription.cancelled`` events (reason ``too_expensive``, engagement
  high: the ``price_discount`` playbook), each customer in a timezone where *now* is inside
  the 09:00-20:00 send window, so the playbook's day-0 step is due at once; the hostile records
  (each with the dead-letter code it must get) interleaved at seeded positions. Produced at an
  even pace over ``produce_seconds``.
- Faults, at seeded random moments of the production window, one after another: ``kills``
  SIGKILLs of each process kind (ingest, scheduler, dispatcher, relay; each restarted at once),
  ``database_crashes`` PostgreSQL crashes and ``broker_kills`` broker SIGKILLs (each started
  again after a seeded outage of a few seconds). A process that exits on its own — during an
  outage too: start-up waits for the broker and the database — is a finding (recorded, and
  started again so the run goes on).
- Then it polls the database, the broker and the fake until everything is settled (or the
  timeout passes) and returns a ``Report``: what was lost, duplicated, missed, stuck or
  dead-lettered wrongly, the faults, and the figures.

Used by ``tests/faults/test_faults.py`` (a short run in the default suite),
``bench/fault_bench.py`` (a longer run beside a fault-free reference) and
``bench/pipeline_bench.py`` (no faults: ``System`` with a ``Setup`` of its own — the number of
ingest processes, the file or the fake HTTP provider, the relay apart or in the services, the
product's settings instead of the fault tuning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.model import OUTCOME_UNKNOWN_AFTER_CRASH
from services.dispatcher.reconcile import UNCONFIRMED
from services.scheduler.domain import Playbook, in_holdout, load_playbooks
from shared.db import migrate
from shared.db.engine import make_engine
from shared.local import postgres
from shared.local.kafka_broker import LocalKafka
from shared.messaging.kafka import KafkaTransport
from shared.settings import SchedulerSettings, TopicSettings
from tests.support import corpus
from tests.support.corpus import HostileRecord
from tests.support.procs import WinbackProcess, as_env
from tests.support.services import eventually

Say = Callable[[str], None]

SOURCE = "/faults/billing"
EVENT_TYPE = "com.example.subscription.cancelled"
PLAYBOOK = "price_discount"
KINDS = ("ingest", "scheduler", "dispatcher", "relay")
INFRA = ("postgres", "broker")
DLQ_CODE = "winback-dlq-error-code"
DLQ_REASON = "winback-dlq-error-reason"
DLQ_FIELD = "winback-dlq-error-field"
DLQ_PARTITION = "winback-dlq-source-partition"
DLQ_OFFSET = "winback-dlq-source-offset"
ROOT = Path(__file__).resolve().parents[2]
FINAL_STEP_STATES = {"sent", "failed", "suppressed", "skipped", "cancelled"}
HEADERS = [("content-type", b"application/cloudevents+json")]
BROKER_GRACE = 5.0  # seconds after the broker is back when an exit is still during its outage
MAX_IN_FLIGHT = 64  # the dispatcher's concurrent sends
FAULT_TUNING: dict[str, Any] = {
    "kafka": {
        "session_timeout_ms": 6000,  # a SIGKILLed member leaves its group in 6 s
        "poll_timeout_ms": 200,
    },
    "scheduler": {"poll_seconds": 0.2},
    "dispatcher": {
        # short timeouts, so a delivery left "sending" by a killed dispatcher is recovered
        # within the run (stale_sending_seconds must cover the longest send)
        "http": {"connect_timeout": 1, "read_timeout": 2},
        "retry": {
            "max_attempts": 2,
            "base_delay": 0.1,
            "max_delay": 1,
            "max_retry_after": 1,
            "round_delay_seconds": 1,
        },
        "stale_sending_seconds": 10,
        # a send the kill left unknown: the fake sends no webhooks and SendGrid has no key,
        # so nothing confirms it; it must end (failed, unconfirmed) within the run
        "unknown_reconcile_seconds": 10,
        "claim_batch": 50,
        "max_in_flight": MAX_IN_FLIGHT,
    },
}
"""The settings that let a crashed part recover within a fault run (``Setup.fault_tuning``)."""

# one zone per UTC offset, so some zone always has its local time mid-window
ZONES = (
    "Pacific/Honolulu",
    "America/Anchorage",
    "America/Los_Angeles",
    "America/Denver",
    "America/Chicago",
    "America/New_York",
    "America/Halifax",
    "America/Sao_Paulo",
    "Atlantic/South_Georgia",
    "Atlantic/Azores",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Helsinki",
    "Europe/Istanbul",
    "Asia/Dubai",
    "Asia/Karachi",
    "Asia/Dhaka",
    "Asia/Bangkok",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Brisbane",
    "Pacific/Noumea",
    "Pacific/Auckland",
    "Pacific/Kiritimati",
)


class HarnessError(RuntimeError):
    """The harness itself could not do its part (infrastructure, producing): not a finding."""


@dataclass(frozen=True)
class Setup:
    """How the system is put together; the defaults are the fault suite's."""

    ingest_workers: int = 2
    provider: Literal["http", "file"] = "http"  # the fake provider process, or files on disk
    provider_latency: float = 0.0  # seconds the fake provider waits before each answer
    relay_process: bool = True  # False: no ``winback relay``, each service relays its outbox
    # short timeouts, small batches and fast polls, so a crashed part recovers within a run;
    # False: the product's defaults
    fault_tuning: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)  # merged over the rest, last


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Nested settings ``base`` with ``over`` on top (mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Plan:
    events: int = 2000
    produce_seconds: float = 40.0
    kills: int = 1  # SIGKILLs per process kind
    database_crashes: int = 1
    broker_kills: int = 1
    seed: int = 1
    hostile: Sequence[HostileRecord] = ()  # tests.support.corpus.hostile_records()
    settle_timeout: float = 150.0
    partitions: int = 4


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # seconds after the production started
    outage: float  # seconds until the target was running again


@dataclass
class Exit:
    name: str
    code: int
    at: float
    log_tail: str
    broker_down: bool  # it ended while the broker was down (or just back)


@dataclass
class Report:
    plan: Plan
    events_in: int = 0
    hostile_in: int = 0
    produce_seconds: float = 0.0
    handled: int = 0  # valid events with their churn episode
    cases: int = 0
    expected_sends: int = 0
    sent: int = 0
    dead_letters: int = 0
    dead_letter_repeats: int = 0  # a record dead-lettered again after a crash (at least once)
    faults: list[Fault] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    settled: bool = False
    settle_seconds: float = 0.0  # from the last fault's recovery to all settled
    e2e_rate: float = 0.0  # sent messages per second, first produce → last send
    # findings: each must be empty for a clean run
    lost: list[str] = field(default_factory=list)  # event ids without an episode
    duplicate_episodes: list[str] = field(default_factory=list)
    missing_cases: list[str] = field(default_factory=list)
    wrong_playbook: list[str] = field(default_factory=list)
    holdout_mismatch: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)  # key → provider requests
    missed: list[str] = field(default_factory=list)
    sent_without_request: list[str] = field(default_factory=list)
    unexpected_requests: list[str] = field(default_factory=list)
    outcome_unknown: list[str] = field(default_factory=list)  # by design: see sender.py
    stuck_deliveries: dict[str, int] = field(default_factory=dict)
    unfinished_steps: dict[str, int] = field(default_factory=dict)
    unpublished_outbox: int = 0
    lag: dict[str, int] = field(default_factory=dict)
    dlq_missing: list[str] = field(default_factory=list)
    dlq_wrong: list[str] = field(default_factory=list)
    dlq_unexpected: list[str] = field(default_factory=list)

    def faults_by_kind(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults)

    def problems(self) -> list[str]:
        """Every finding, one line each; empty when the run was clean."""
        out: list[str] = []

        def add(name: str, items: Sequence[str] | dict[str, int] | int) -> None:
            if items:
                shown = (
                    items
                    if isinstance(items, int)
                    else list(items.items())[:10]
                    if isinstance(items, dict)
                    else list(items)[:10]
                )
                size = items if isinstance(items, int) else len(items)
                out.append(f"{name}: {size} — {shown}")

        if not self.settled:
            out.append(f"not settled within {self.plan.settle_timeout:g} s")
        add("lost events (no churn episode)", self.lost)
        add("events handled twice (duplicate episodes)", self.duplicate_episodes)
        add("customers without a case", self.missing_cases)
        add(f"cases not on {PLAYBOOK}", self.wrong_playbook)
        add("holdout differs from the pure assignment", self.holdout_mismatch)
        add("duplicate sends (provider requests per key > 1)", self.duplicates)
        add("missed steps (due, not sent)", self.missed)
        # a send in flight when the dispatcher died is "unknown", and with no webhook to
        # confirm it ends failed "unconfirmed", by design (never sent twice blindly to a
        # provider that cannot deduplicate): at most what was in flight
        in_flight = MAX_IN_FLIGHT * self.faults_by_kind()["dispatcher"]
        if len(self.outcome_unknown) > in_flight:
            add(
                f"outcome unknown after a crash, more than the {in_flight} in flight",
                self.outcome_unknown,
            )
        add("recorded sent without a provider request", self.sent_without_request)
        add("provider requests for no due step", self.unexpected_requests)
        add("deliveries stuck queued/sending/unknown", self.stuck_deliveries)
        add("day-0 steps not final", self.unfinished_steps)
        add("outbox rows unpublished", self.unpublished_outbox)
        add("consumer lag", self.lag)
        add("hostile records not dead-lettered", self.dlq_missing)
        add("dead letters with a wrong or missing code/reason", self.dlq_wrong)
        add("dead letters of records that are not hostile", self.dlq_unexpected)
        add(
            "processes that exited on their own",
            [
                f"{e.name} ({e.code}) at {e.at:.1f} s"
                + (" while the broker was down" if e.broker_down else "")
                for e in self.exits
            ],
        )
        return out

    def figures(self) -> list[str]:
        kinds = self.faults_by_kind()
        return [
            f"events in          {self.events_in:,} valid + {self.hostile_in} hostile over "
            f"{self.produce_seconds:.0f} s",
            f"events handled     {self.handled:,} ({self.cases:,} cases)",
            f"dead letters       {self.dead_letters} ({self.dead_letter_repeats} repeated "
            "after a crash)",
            f"day-0 sends        {self.sent:,} of {self.expected_sends:,} due "
            f"(outcome unknown after a crash: {len(self.outcome_unknown)})",
            "faults             "
            + (", ".join(f"{k} {kinds[k]}" for k in (*KINDS, *INFRA) if kinds[k]) or "none"),
            f"duplicates         {sum(n - 1 for n in self.duplicates.values())}",
            f"lost               {len(self.lost)}",
            f"missed             {len(self.missed)}",
            f"exits on their own {len(self.exits)}",
            f"settled            {'yes' if self.settled else 'NO'}, "
            f"{self.settle_seconds:.1f} s after the last fault",
            f"end-to-end rate    {self.e2e_rate:,.1f} messages/s (first event in → last send)",
        ]


# --- the workload ------------------------------------------------------------------------------


def zones_in_window(now: datetime, margin: float = 1.0) -> list[str]:
    """Zones where ``now`` is inside the default send window (09:00-20:00) with ``margin``
    hours to spare on each side (the run must stay inside it), the middle of it first."""
    defaults = SchedulerSettings()
    start, end = defaults.send_window_start_hour, defaults.send_window_end_hour
    middle = (start + end) / 2
    scored = []
    for name in ZONES:
        local = now.astimezone(ZoneInfo(name))
        hour = local.hour + local.minute / 60
        if start + margin <= hour <= end - margin:
            scored.append((abs(hour - middle), name))
    if not scored:
        raise HarnessError(f"no zone has {now.isoformat()} inside {start}:00-{end}:00")
    return [name for _, name in sorted(scored)]


def cancellation(run: str, i: int, zone: str) -> tuple[str, str, bytes]:
    """(event id, customer id, value) of one structured cancellation, timed now."""
    event_id, customer = f"{run}-{i}", f"cus-{run}-{i}"
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": EVENT_TYPE,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {
            "customer_id": customer,
            "reason": "too_expensive",
            "customer": {
                "email": f"{customer}@example.com",
                "name": "Aino",
                "locale": "en",
                "timezone": zone,
                "mrr_minor": 4900,
                "currency": "EUR",
                "engagement": "high",
            },
        },
    }
    return event_id, customer, orjson.dumps(event)


def due_now(playbook: Playbook) -> list[str]:
    """The playbook's steps due at the churn itself for every segment."""
    return [
        s.key
        for s in playbook.steps
        if s.offset == timedelta(0) and s.when is None and s.trigger is None
    ]


# --- the system ----------------------------------------------------------------------------------


class System:
    """PostgreSQL, the broker, the fake provider and the five ``winback`` processes."""

    def __init__(
        self, workdir: Path, partitions: int, say: Say, setup: Setup | None = None
    ) -> None:
        self.workdir = workdir
        self.setup = setup or Setup()
        self.partitions = partitions
        self.say = say
        self.topics = TopicSettings(partitions=partitions)
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg: Any = None
        self.db_url = ""
        self.broker: LocalKafka | None = None
        self.provider: asyncio.subprocess.Process | None = None
        self.provider_port = 0
        self.procs: list[WinbackProcess] = []
        self.engine: AsyncEngine | None = None
        self.killed: set[int] = set()  # pids we killed (their exits are not findings)
        self.broker_up = asyncio.Event()
        self.broker_back_at = 0.0

    @property
    def servers(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap_servers

    def group_topics(self) -> dict[str, list[str]]:
        t = self.topics
        return {
            "ingest": list(t.inbound),
            "ingest-erasure": [t.erasure],
            "scheduler": [t.domain, t.outcomes],
            "dispatcher": [t.dispatch, t.erasure],
        }

    async def start(self) -> None:
        started = time.monotonic()
        await self.start_infrastructure()
        self.start_processes()
        self.say(
            f"infrastructure and processes up in {time.monotonic() - started:.1f} s "
            f"(broker {self.servers}, database {self.db_url})"
        )

    async def start_infrastructure(self) -> None:
        """PostgreSQL, the broker, the topics and the provider; no ``winback`` process yet."""
        url, self.pg = await asyncio.to_thread(
            postgres.start_embedded, self.workdir / "pg", "delete"
        )
        self.db_url = url
        self.broker = await asyncio.to_thread(LocalKafka(self.workdir / "kafka", heap="512m").start)
        self.broker_up.set()
        await migrate.upgrade_async(self.db_url)
        t = self.topics
        await KafkaTransport(self.servers).ensure_topics(
            [*t.inbound, t.domain, t.dispatch, t.outcomes, t.dead_letter, t.erasure],
            self.partitions,
        )
        self.engine = make_engine(self.db_url, pool_size=2)
        if self.setup.provider == "http":
            await self._start_provider()

    def start_processes(self) -> None:
        """The ``winback`` processes (ingest x N, scheduler, dispatcher, relay)."""
        env = self.env()
        relay_apart = self.setup.relay_process
        service_env = {**env, "WINBACK_OUTBOX__RELAY_ENABLED": "false"} if relay_apart else env
        kinds = [(f"ingest-{i + 1}", "ingest") for i in range(self.setup.ingest_workers)]
        kinds += [("scheduler", "scheduler"), ("dispatcher", "dispatcher")]
        kinds += [("relay", "relay")] if relay_apart else []
        self.procs = [
            WinbackProcess(
                name, kind, env if kind == "relay" else service_env, self.logs, self.workdir
            )
            for name, kind in kinds
        ]
        for proc in self.procs:
            proc.start()

    async def stop_processes(self, timeout: float = 20) -> None:
        """SIGTERM every ``winback`` process (each finishes its batch), SIGKILL after
        ``timeout``."""
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.terminate()
        await asyncio.gather(*(asyncio.to_thread(p.stop, timeout) for p in self.procs))

    def env(self, overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The processes' environment: the settings, ``Setup.settings`` and ``overrides`` on
        top, as ``WINBACK_`` variables."""
        if self.setup.provider == "file":
            email: dict[str, Any] = {
                "kind": "file",
                "directory": str(self.workdir / "messages"),
                "from_address": "hello@acme.example",
            }
        else:
            email = {
                "kind": "sendgrid",
                "base_url": f"http://127.0.0.1:{self.provider_port}",
                "api_key": "SG.faults",
                "from_address": "hello@acme.example",
            }
        settings: dict[str, Any] = {
            "environment": "test",
            "log_level": "WARNING",
            "database": {"url": self.db_url, "pool_size": 4},
            "kafka": {"bootstrap_servers": self.servers},
            "topics": {"partitions": self.partitions},
            "http": {"ingest_port": 0, "scheduler_port": 0, "dispatcher_port": 0, "relay_port": 0},
            "dispatcher": {"email": {"primary": email}},
        }
        if self.setup.fault_tuning:
            settings = merged(settings, FAULT_TUNING)
        settings = merged(merged(settings, self.setup.settings), overrides or {})
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("WINBACK_") and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
        }
        return {**inherited, **as_env(settings)}

    async def _start_provider(self) -> None:
        self.provider = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.faults.provider",
            str(self.setup.provider_latency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=64 * 1024 * 1024,  # one stats line holds every idempotency key
        )
        assert self.provider.stdout is not None
        line = await asyncio.wait_for(self.provider.stdout.readline(), 30)
        if not line:
            raise HarnessError("the fake provider process did not start")
        self.provider_port = int(orjson.loads(line)["port"])

    async def provider_stats(self) -> dict[str, Any]:
        assert self.provider is not None
        assert self.provider.stdin is not None
        assert self.provider.stdout is not None
        self.provider.stdin.write(b"stats\n")
        await self.provider.stdin.drain()
        stats: dict[str, Any] = orjson.loads(await self.provider.stdout.readline())
        return stats

    def of_kind(self, kind: str) -> list[WinbackProcess]:
        return [p for p in self.procs if p.command == kind]

    async def stop(self) -> None:
        await self.stop_processes()
        if self.provider is not None:
            assert self.provider.stdin is not None
            self.provider.stdin.close()
            try:
                await asyncio.wait_for(self.provider.wait(), 10)
            except TimeoutError:
                self.provider.kill()
                await self.provider.wait()
        if self.engine is not None:
            await self.engine.dispose()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        if self.pg is not None:
            await asyncio.to_thread(self.pg.cleanup)

    # -- faults ---------------------------------------------------------------------------------
    def kill(self, proc: WinbackProcess) -> None:
        if proc.proc is not None:
            self.killed.add(proc.proc.pid)
        proc.kill()

    async def crash_database(self, outage: float) -> None:
        await asyncio.to_thread(postgres.crash, self.pg)
        await asyncio.sleep(outage)  # the outage's length, not a wait for a condition
        await asyncio.to_thread(postgres.restart, self.pg)

    async def kill_broker(self, outage: float) -> None:
        assert self.broker is not None
        self.broker_up.clear()
        await asyncio.to_thread(self.broker.kill)
        await asyncio.sleep(outage)  # the outage's length, not a wait for a condition
        await asyncio.to_thread(self.broker.restart)
        self.broker_up.set()
        self.broker_back_at = time.monotonic()

    # -- observing ------------------------------------------------------------------------------
    async def groups_ready(self) -> bool:
        """Every consumer group Stable with all its members."""
        ingest = self.setup.ingest_workers
        want = {"ingest": ingest, "ingest-erasure": ingest, "scheduler": 1, "dispatcher": 1}
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        try:
            await admin.start()
            seen: dict[str, int] = {}
            for group in want:  # one by one: aiokafka cannot decode a reply about several
                for response in await admin.describe_consumer_groups([group]):
                    for described in response.groups:
                        if described[2] == "Stable":
                            seen[described[1]] = len(described[5])
            return all(seen.get(g) == n for g, n in want.items())
        except Exception:
            return False
        finally:
            await admin.close()

    async def lag(self) -> dict[str, int] | None:
        """Records not yet committed, per group and topic partition with any; ``None`` when
        the broker does not answer."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.servers, enable_auto_commit=False)
        try:
            await admin.start()
            await consumer.start()
            out: dict[str, int] = {}
            for group, topics in self.group_topics().items():
                committed = await admin.list_consumer_group_offsets(group)
                tps = [TopicPartition(t, p) for t in topics for p in range(self.partitions)]
                ends = await consumer.end_offsets(tps)
                for tp in tps:
                    meta = committed.get(tp)
                    behind = ends[tp] - (
                        meta.offset if meta is not None and meta.offset >= 0 else 0
                    )
                    if behind:
                        out[f"{group} {tp.topic}[{tp.partition}]"] = behind
            return out
        except Exception:
            return None
        finally:
            await consumer.stop()
            await admin.close()


class DeadLetterReader:
    """Reads the dead-letter topic from the start, for the whole run (across the outage)."""

    def __init__(self, servers: str, topic: str, partitions: int) -> None:
        self.servers = servers
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.records: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        await self._consumer.start()
        self._consumer.assign(self.tps)
        await self._consumer.seek_to_beginning(*self.tps)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker is down: the consumer reconnects
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                self.records.extend(records)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Produced:
    events: dict[str, str] = field(default_factory=dict)  # event id → customer id
    hostile: dict[tuple[int, int], HostileRecord] = field(default_factory=dict)  # by position
    first_at: datetime | None = None
    seconds: float = 0.0


async def produce(system: System, plan: Plan, run: str, rng: random.Random) -> Produced:
    """The valid events and the hostile records, interleaved, at an even pace."""
    zones = zones_in_window(datetime.now(UTC))[:4]
    total = plan.events + len(plan.hostile)
    hostile_at = dict(
        zip(sorted(rng.sample(range(total), len(plan.hostile))), plan.hostile, strict=True)
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=system.servers,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_request_size=4 * 1024 * 1024,  # the broker, not the client, judges the size
        request_timeout_ms=120_000,
    )
    await producer.start()
    out = Produced(first_at=datetime.now(UTC))
    topic = system.topics.inbound[0]
    started = time.monotonic()
    valid: list[asyncio.Future[Any]] = []
    bad: list[tuple[HostileRecord, asyncio.Future[Any]]] = []
    try:
        i = 0
        for n in range(total):
            delay = started + n * plan.produce_seconds / total - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the pace of the workload
            if n in hostile_at:
                h = hostile_at[n]
                bad.append((h, await send_hostile(system, producer, topic, h)))
            else:
                event_id, customer, value = cancellation(run, i, zones[i % len(zones)])
                out.events[event_id] = customer
                valid.append(
                    await producer.send(topic, value, key=customer.encode(), headers=HEADERS)
                )
                i += 1
        results = await asyncio.gather(*valid, *(f for _, f in bad), return_exceptions=True)
    finally:
        await producer.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise HarnessError(f"{len(failed)} records could not be produced: {failed[:3]!r}")
    for (h, _), meta in zip(bad, results[len(valid) :], strict=True):
        assert not isinstance(meta, BaseException)
        out.hostile[(meta.partition, meta.offset)] = h
    out.seconds = time.monotonic() - started
    return out


async def send_hostile(
    system: System, producer: AIOKafkaProducer, topic: str, h: HostileRecord
) -> asyncio.Future[Any]:
    """Send one hostile record; one whose header names are not text goes in a record batch
    built by hand (``corpus._send_raw``), which has no retries of its own: it waits for the
    broker to be up and tries again if the broker dies under it."""
    if not h.raw_header_names:
        headers = [(str(name), value) for name, value in h.headers]
        future: asyncio.Future[Any] = await producer.send(
            topic, h.value, key=h.key, headers=headers or None
        )
        return future
    for attempt in range(5):
        await system.broker_up.wait()
        try:
            return await corpus._send_raw(producer, topic, h)
        except Exception:
            if attempt == 4:
                raise
            await asyncio.sleep(1)  # backoff before the next attempt
    raise AssertionError("unreachable")


def schedule(plan: Plan, rng: random.Random) -> list[tuple[float, str]]:
    """When each fault strikes (seconds into the production window), in order."""
    kinds = [k for k in KINDS for _ in range(plan.kills)]
    kinds += ["postgres"] * plan.database_crashes + ["broker"] * plan.broker_kills
    rng.shuffle(kinds)
    # one slot of the window's middle 90% per fault, a random moment within it
    slot = 0.9 * plan.produce_seconds / max(1, len(kinds))
    times = [(0.05 * plan.produce_seconds) + (k + rng.random()) * slot for k in range(len(kinds))]
    return list(zip(times, kinds, strict=True))


async def inject(
    system: System, faults: list[tuple[float, str]], rng: random.Random, say: Say
) -> list[Fault]:
    started = time.monotonic()
    done: list[Fault] = []
    for at, kind in faults:
        delay = started + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the fault schedule
        struck = time.monotonic() - started
        if kind in KINDS:
            proc = rng.choice(system.of_kind(kind))
            system.kill(proc)
            proc.start()  # restarted at once, as a supervisor would
            target = proc.name
        elif kind == "postgres":
            await system.crash_database(rng.uniform(1.0, 3.0))
            target = "postgresql"
        else:
            await system.kill_broker(rng.uniform(2.0, 5.0))
            target = "kafka broker"
        fault = Fault(kind, target, struck, time.monotonic() - started - struck)
        done.append(fault)
        back = f"back after {fault.outage:.1f} s" if kind in INFRA else "SIGKILL, started again"
        say(f"fault: {kind:<10} {target:<12} at {struck:5.1f} s, {back}")
    return done


async def supervise(system: System, exits: list[Exit], started: float, say: Say) -> None:
    """Start again any process that exited on its own, and record it: every such exit is a
    finding (a service started during an outage waits for the broker and the database)."""
    while True:
        for proc in system.procs:
            if proc.proc is None or proc.proc.pid in system.killed:
                continue
            code = proc.proc.poll()
            if code is not None:
                down = time.monotonic() - system.broker_back_at < BROKER_GRACE
                down = down or not system.broker_up.is_set()
                ended = Exit(proc.name, code, time.monotonic() - started, proc.log_tail(), down)
                exits.append(ended)
                why = " (the broker is down)" if ended.broker_down else ""
                say(f"process {proc.name} exited on its own with {code}{why}; starting it again")
                proc.start()
        await asyncio.sleep(0.5)  # how often the supervisor looks


@dataclass
class Snapshot:
    episodes: Counter[str]
    cases: dict[str, list[tuple[str, str, bool]]]  # customer → [(case id, playbook, holdout)]
    steps: dict[str, tuple[str, str | None]]  # case id → (state, reason) of the day-0 step
    deliveries: dict[str, tuple[str, str | None, datetime | None]]  # key → state, error, sent_at
    active_deliveries: dict[str, int]
    unpublished: int
    lag: dict[str, int] | None
    dead_letters: int

    def waiting_for(self, produced: Produced, expected_dead: int) -> list[str]:
        """What is not settled yet (empty: settled)."""
        episodes = sum(1 for e in produced.events if e in self.episodes)
        cases = sum(1 for c in produced.events.values() if c in self.cases)
        open_steps = sum(1 for s in self.steps.values() if s[0] not in FINAL_STEP_STATES)
        waiting = [
            f"episodes {episodes}/{len(produced.events)}"
            if episodes < len(produced.events)
            else "",
            f"cases {cases}/{len(produced.events)}" if cases < len(produced.events) else "",
            f"{open_steps} day-0 steps not final" if open_steps else "",
            f"deliveries {self.active_deliveries}" if self.active_deliveries else "",
            f"{self.unpublished} outbox rows unpublished" if self.unpublished else "",
            "lag unknown (broker)" if self.lag is None else f"lag {self.lag}" if self.lag else "",
            f"dead letters {self.dead_letters}/{expected_dead}"
            if self.dead_letters < expected_dead
            else "",
        ]
        return [w for w in waiting if w]


async def snapshot(
    system: System, dead: DeadLetterReader, step_keys: Sequence[str]
) -> Snapshot | None:
    assert system.engine is not None
    try:
        async with system.engine.connect() as conn:
            episodes: Counter[str] = Counter(
                dict(
                    (
                        await conn.execute(
                            text(
                                "SELECT source_event_id, count(*) FROM churn_episodes "
                                "WHERE source = :s GROUP BY 1"
                            ),
                            {"s": SOURCE},
                        )
                    ).all()
                )
            )
            cases: dict[str, list[tuple[str, str, bool]]] = {}
            for row in await conn.execute(
                text("SELECT customer_id, id, playbook, holdout FROM cases")
            ):
                cases.setdefault(row.customer_id, []).append((row.id, row.playbook, row.holdout))
            steps = {
                row.case_id: (row.state, row.state_reason)
                for row in await conn.execute(
                    text(
                        "SELECT case_id, state, state_reason FROM case_steps "
                        "WHERE step_key = ANY(:k)"
                    ),
                    {"k": list(step_keys)},
                )
            }
            deliveries = {
                row.idempotency_key: (row.state, row.error, row.sent_at)
                for row in await conn.execute(
                    text("SELECT idempotency_key, state, error, sent_at FROM deliveries")
                )
            }
            active: dict[str, int] = dict(
                (
                    await conn.execute(
                        text(
                            "SELECT state, count(*) FROM deliveries "
                            "WHERE state IN ('queued', 'sending', 'unknown') GROUP BY 1"
                        )
                    )
                ).all()
            )
            unpublished = int(
                await conn.scalar(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
                or 0
            )
    except Exception:  # the database is down or restarting
        return None
    return Snapshot(
        episodes,
        cases,
        steps,
        deliveries,
        active,
        unpublished,
        await system.lag(),
        len(dead.records),
    )


def header(record: Any, name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return bytes(value).decode(errors="replace")
    return None


def judge(
    report: Report, snap: Snapshot, produced: Produced, stats: dict[str, Any], dead: list[Any]
) -> None:
    """Fill the report's findings from the final snapshot, the fake's counts and the DLQ."""
    playbook = next(p for p in load_playbooks_cached() if p.name == PLAYBOOK)
    report.handled = sum(1 for e in produced.events if e in snap.episodes)
    report.lost = [e for e in produced.events if e not in snap.episodes]
    report.duplicate_episodes = [e for e, n in snap.episodes.items() if n > 1]
    requests: dict[str, int] = stats["requests"]
    expected_keys: set[str] = set()
    for customer in produced.events.values():
        cases = snap.cases.get(customer, [])
        if not cases:
            report.missing_cases.append(customer)
            continue
        report.cases += len(cases)
        case_id, playbook_name, holdout = cases[0]
        if len(cases) > 1 or playbook_name != PLAYBOOK:
            report.wrong_playbook.append(f"{customer}: {[c[1] for c in cases]}")
        if holdout != in_holdout(customer, playbook.name, playbook.holdout):
            report.holdout_mismatch.append(customer)
        if holdout:
            continue
        for key in due_now(playbook):
            idem = f"{case_id}:{key}"
            expected_keys.add(idem)
            report.expected_sends += 1
            step = snap.steps.get(case_id)
            delivery = snap.deliveries.get(idem)
            if (
                delivery is not None
                and delivery[0] == "failed"
                and delivery[1] in (OUTCOME_UNKNOWN_AFTER_CRASH, UNCONFIRMED)
            ):
                report.outcome_unknown.append(idem)
            elif step is None or step[0] != "sent" or delivery is None or delivery[0] != "sent":
                report.missed.append(f"{idem}: step {step}, delivery {delivery and delivery[:2]}")
            else:
                report.sent += 1
                if requests.get(idem, 0) == 0:
                    report.sent_without_request.append(idem)
    report.duplicates = {k: n for k, n in requests.items() if n > 1}
    report.unexpected_requests = [k for k in requests if k not in expected_keys]
    if stats["without_key"]:
        report.unexpected_requests.append(f"{stats['without_key']} requests without a key")
    report.stuck_deliveries = dict(snap.active_deliveries)
    report.unfinished_steps = dict(
        Counter(s[0] for s in snap.steps.values() if s[0] not in FINAL_STEP_STATES)
    )
    report.unpublished_outbox = snap.unpublished
    report.lag = snap.lag if snap.lag is not None else {"broker not answering": -1}
    sent_times = [d[2] for d in snap.deliveries.values() if d[0] == "sent" and d[2] is not None]
    if sent_times and produced.first_at is not None:
        span = (max(sent_times) - produced.first_at).total_seconds()
        report.e2e_rate = len(sent_times) / span if span > 0 else 0.0

    report.dead_letters = len(dead)
    seen: dict[tuple[int, int], Any] = {}
    for record in dead:
        partition, offset = header(record, DLQ_PARTITION), header(record, DLQ_OFFSET)
        try:
            position = (int(partition or ""), int(offset or ""))
        except ValueError:
            report.dlq_unexpected.append(f"no source position: {record.headers!r}"[:300])
            continue
        if position not in produced.hostile:
            report.dlq_unexpected.append(
                f"{position}: {header(record, DLQ_CODE)} {header(record, DLQ_REASON)}"
            )
            continue
        report.dead_letter_repeats += position in seen
        seen[position] = record
    for position, h in produced.hostile.items():
        record = seen.get(position)
        if record is None:
            report.dlq_missing.append(f"{h.name} at {position}")
            continue
        code, reason = header(record, DLQ_CODE), header(record, DLQ_REASON)
        field_name = header(record, DLQ_FIELD) or None
        if code != h.code or not reason or field_name != h.field:
            report.dlq_wrong.append(
                f"{h.name}: expected {h.code} {h.field}, got {code} {field_name} ({reason})"
            )


_PLAYBOOKS: list[Playbook] = []


def load_playbooks_cached() -> list[Playbook]:
    if not _PLAYBOOKS:
        _PLAYBOOKS.extend(load_playbooks(SchedulerSettings().playbooks_dir))
    return _PLAYBOOKS


async def run(plan: Plan, workdir: Path, say: Say = print) -> Report:
    """One fault run on infrastructure of its own under ``workdir``; returns the report."""
    playbook = next(p for p in load_playbooks_cached() if p.name == PLAYBOOK)
    step_keys = due_now(playbook)
    if not step_keys:
        raise HarnessError(f"{PLAYBOOK} has no step due at the churn: the workload needs one")
    run_id = uuid.uuid4().hex[:8]
    system = System(workdir, plan.partitions, say)
    # our own clients' reconnect noise while the broker is down is expected: not shown
    quiet = contextlib.ExitStack()
    aiokafka_log = logging.getLogger("aiokafka")
    quiet.callback(aiokafka_log.setLevel, aiokafka_log.level)
    aiokafka_log.setLevel(logging.CRITICAL)
    with quiet:
        return await _run(plan, say, system, run_id, step_keys)


async def _run(plan: Plan, say: Say, system: System, run_id: str, step_keys: list[str]) -> Report:
    load_rng, fault_rng = random.Random(plan.seed), random.Random(plan.seed + 1)
    report = Report(plan=plan)
    async with _running(system) as system:
        ready = await eventually(system.groups_ready, bool, timeout=120, interval=0.5)
        if not ready:
            raise HarnessError(
                "consumer groups not stable in 120 s:\n"
                + "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in system.procs)
            )
        dead = DeadLetterReader(system.servers, system.topics.dead_letter, plan.partitions)
        await dead.start()
        started = time.monotonic()
        supervisor = asyncio.create_task(supervise(system, report.exits, started, say))
        try:
            faults = asyncio.create_task(inject(system, schedule(plan, fault_rng), fault_rng, say))
            produced = await produce(system, plan, run_id, load_rng)
            report.faults = await faults
            recovered = time.monotonic()
            report.events_in, report.hostile_in = len(produced.events), len(produced.hostile)
            report.produce_seconds = produced.seconds
            say(
                f"produced {report.events_in} events + {report.hostile_in} hostile in "
                f"{produced.seconds:.1f} s; {len(report.faults)} faults; waiting to settle"
            )

            said = time.monotonic()

            async def probe() -> Snapshot | None:
                nonlocal said
                snap = await snapshot(system, dead, step_keys)
                left = ["database down"] if snap is None else snap.waiting_for(produced, expect)
                if left and time.monotonic() - said > 10:  # progress, every 10 s
                    said = time.monotonic()
                    say(f"settling: {time.monotonic() - recovered:.0f} s, waiting for {left}")
                return snap

            expect = len(produced.hostile)
            snap = await eventually(
                probe,
                lambda s: s is not None and not s.waiting_for(produced, expect),
                timeout=plan.settle_timeout,
                interval=1.0,
            )
            report.settled = snap is not None and not snap.waiting_for(produced, expect)
            report.settle_seconds = time.monotonic() - recovered
            if snap is None:
                snap = await eventually(probe, lambda s: s is not None, timeout=30)
            if snap is None:
                raise HarnessError("the database does not answer after the run")
            stats = await system.provider_stats()
            judge(report, snap, produced, stats, list(dead.records))
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            await dead.stop()
        if report.problems():
            for proc in system.procs:
                say(f"--- log tail of {proc.name} ({proc.starts} starts)\n{proc.log_tail(2000)}")
    return report


@contextlib.asynccontextmanager
async def _running(system: System) -> AsyncIterator[System]:
    try:
        await system.start()
        yield system
    finally:
        await system.stop()
