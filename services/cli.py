"""The ``winback`` command: start a service (or all of them), run migrations, publish a test
event.

Exit codes: 0 done; 1 a failure while working (one line on stderr); 2 a configuration or an
argument that can never work (one line per problem on stderr); 69 the database or the broker
did not answer (sysexits' EX_UNAVAILABLE; one line on stderr); 130 interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from services.ingest.billing import backfill_cli
from services.scheduler import simulate_cli
from services.scheduler.domain.errors import PlaybookError
from shared import logging as winback_logging
from shared.clock import AcceleratedClock, Clock
from shared.errors import ConfigError
from shared.gc_tuning import tune_for_service
from shared.messaging import dlq_cli
from shared.messaging.transport import Transport
from shared.retry import is_transient
from shared.runtime import Runtime
from shared.settings import Settings, load_settings

SERVICES = ("ingest", "scheduler", "dispatcher")
log = logging.getLogger("winback")


EXIT_FAILED = 1
"""A failure while working (the broker refused a test event): one line on stderr."""
EXIT_CONFIG = 2
"""A configuration or an argument that can never work (``ConfigError``, ``UsageError``): one
line per problem on stderr."""
EXIT_UNAVAILABLE = 69
"""The database (``winback migrate``: within ``--wait``) or the broker
(``publish-test-event``) did not answer: one line on stderr (sysexits' EX_UNAVAILABLE)."""


class UsageError(Exception):
    """An argument that can never work (bad JSON to ``--data``): exit code 2, one line."""


def version() -> str:
    """The installed package's version (``winback --version``, ``winback_build_info``)."""
    from shared.metrics import package_version

    return package_version()


def _unavailable(what: str, where: str, exc: BaseException, within: float | None = None) -> None:
    """One line on stderr and exit code ``EXIT_UNAVAILABLE``."""
    wait = f" within {within:g} s" if within else ""
    error = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    line = f"winback: {what} did not answer{wait} ({where}): {error}"
    print(" ".join(line.split())[:500], file=sys.stderr)
    raise SystemExit(EXIT_UNAVAILABLE) from None


@dataclass
class Service:
    name: str
    app: Any
    runtime: Runtime
    port: int


def _service_for(
    name: str, settings: Settings, transport: Transport | None = None, clock: Clock | None = None
) -> Service:
    port: int = getattr(settings.http, f"{name}_port")
    if name == "ingest":
        from services.ingest.bootstrap import bootstrap as ingest

        svc = ingest(settings, transport=transport, clock=clock)
        return Service(name, svc.app, svc.core.runtime, port)
    if name == "scheduler":
        from services.scheduler.bootstrap import bootstrap as scheduler

        sch = scheduler(settings, transport=transport, clock=clock)
        return Service(name, sch.app, sch.core.runtime, port)
    if name == "dispatcher":
        from services.dispatcher.bootstrap import bootstrap as dispatcher

        dsp = dispatcher(settings, transport=transport, clock=clock)
        return Service(name, dsp.app, dsp.core.runtime, port)
    if name == "relay":
        from services.relay import bootstrap as relay

        core, app = relay(settings, transport=transport, clock=clock)
        return Service(name, app, core.runtime, port)
    raise SystemExit(f"unknown service {name!r}")


async def _serve(services: list[Service], host: str, demo: Any = None) -> None:
    """Serve every service's app until SIGINT/SIGTERM. Each runtime starts in the background
    (``Runtime.lifespan``): the HTTP servers answer their probes while start-up waits for the
    database and the broker, and a signal ends the waiting at once. A start-up that fails for
    good stops every server; its failure is raised (a ``ConfigError``: exit code 2)."""
    import uvicorn

    class Server(uvicorn.Server):
        """Several servers share one loop: the signal handling is ours, not each server's."""

        service = ""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().serve(sockets)
            except SystemExit:
                # uvicorn exits when it cannot listen (it logged why: the port taken, say)
                where = f"{self.config.host}:{self.config.port}"
                setting = f"WINBACK_HTTP__{self.service.upper()}_PORT"
                failures.append(
                    (self.service, OSError(f"cannot listen on {where} (see the log; {setting})"))
                )
                _exit()

    servers = []
    for s in services:
        server = Server(
            uvicorn.Config(s.app, host=host, port=s.port, log_config=None, lifespan="on")
        )
        server.service = s.name
        servers.append(server)
    loop = asyncio.get_running_loop()
    failures: list[tuple[str, BaseException]] = []

    def _exit() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit)
    for service in services:

        def failed(exc: BaseException, name: str = service.name) -> None:
            failures.append((name, exc))
            _exit()

        service.runtime.on_failure = failed

    async def feed() -> None:
        # once every consumer has joined its group (start-up may wait for the broker)
        await asyncio.gather(*(s.runtime.wait_consuming(timeout=None) for s in services))
        await demo.run()

    def fed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _exit()  # and the error is raised below

    tasks = [asyncio.create_task(s.serve()) for s in servers]
    feeder = asyncio.create_task(feed()) if demo is not None else None
    if feeder is not None:
        feeder.add_done_callback(fed)
    await asyncio.gather(*tasks)
    if feeder is not None:
        if not feeder.done():
            feeder.cancel()
        await asyncio.wait([feeder])
        if not feeder.cancelled():
            feeder.result()
    if failures:
        name, exc = failures[0]
        if isinstance(exc, ConfigError):
            raise exc
        raise SystemExit(f"winback: {name}: start-up failed: {type(exc).__name__}: {exc}")


def wait_for_database(url: str, seconds: float | None) -> None:
    """Return once the database at ``url`` answers, retrying by the start-up policy (one log
    line per interval) for at most ``seconds`` (``None``: until it answers; ``0``: one try).
    Still unreachable then: one line on stderr and exit code ``EXIT_UNAVAILABLE``; a server
    that refuses us (credentials, no such database): ``ConfigError``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from shared.db.engine import make_engine, normalise_url
    from shared.runtime import STARTUP, database_answers

    try:
        where = make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError as exc:
        raise ConfigError(f"database.url (WINBACK_DATABASE__URL): {exc}") from None

    async def answers() -> None:
        engine = make_engine(url, pool_size=1)
        stopping = asyncio.Event()
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, stopping.set)
        try:
            await STARTUP.call(
                lambda: database_answers(engine),
                "reaching the database",
                logging.getLogger("winback.migrate"),
                stopping,
            )
        finally:
            await engine.dispose()

    try:
        asyncio.run(answers())
    except ConfigError:
        raise
    except Exception as exc:
        _unavailable("the database", where, exc, seconds)


def _safe_url(url: str) -> str:
    """``url`` without its password, for a message."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from shared.db.engine import normalise_url

    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "database.url"


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from alembic.util.exc import CommandError

    from shared.db import migrate

    with ExitStack() as stack:
        if not settings.database.url:
            from shared.local.embedded import with_local_database

            settings = with_local_database(settings, stack)
        wait_for_database(settings.database.url, args.wait)
        try:
            if args.down:
                migrate.downgrade(settings.database.url, args.down)
            else:
                migrate.upgrade(settings.database.url, "head")
        except CommandError as exc:  # alembic's: no such revision
            raise UsageError(f"migrate: {exc}") from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            # it answered the check and went away while migrating
            _unavailable("the database", _safe_url(settings.database.url), exc)
    print("migrations done")


def _local_broker(settings: Settings, stack: ExitStack) -> Settings:
    """``--local-kafka``: the local broker started, or one line on stderr and exit code
    ``EXIT_UNAVAILABLE`` (no Java, no jars, the broker exited) pointing at its log."""
    from shared.local.embedded import with_local_broker
    from shared.local.kafka_broker import BrokerStartError

    try:
        return with_local_broker(settings, stack)
    except BrokerStartError as exc:
        first = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        log_path = Path(settings.kafka.data_dir) / "broker.log"
        where = f" (its log: {log_path})" if log_path.exists() else ""
        print(f"winback: --local-kafka: {first}{where}", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE) from None


def cmd_service(settings: Settings, args: argparse.Namespace) -> None:
    from shared.db import migrate

    names = SERVICES if args.command == "run" else (args.command,)
    transport: Transport | None = None
    clock: Clock | None = None
    demo = None
    with ExitStack() as stack:
        if args.command == "run":
            from shared.local.embedded import with_local_database

            settings = with_local_database(settings, stack)
            if not settings.kafka.bootstrap_servers and args.local_kafka:
                settings = _local_broker(settings, stack)
            if not settings.kafka.bootstrap_servers:
                from shared.messaging.memory import MemoryBus

                path = Path(settings.kafka.data_dir).with_name("bus.sqlite")
                path.parent.mkdir(parents=True, exist_ok=True)
                bus = MemoryBus(path=path, max_record_bytes=settings.kafka.max_record_bytes)
                stack.callback(bus.close)
                transport = bus
                log.info("event bus: in-process (no Kafka configured), kept in %s", path)
            if args.demo:
                clock = AcceleratedClock(factor=args.speed)
        if args.command == "run" or args.migrate:
            wait_for_database(settings.database.url, None)  # as the services do: until it answers
            migrate.upgrade(settings.database.url)
        services = [_service_for(n, settings, transport, clock) for n in names]
        if args.command == "run" and args.demo:
            from services.demo import DemoFeeder
            from shared.messaging.kafka import KafkaTransport

            feeder_transport = transport or KafkaTransport(settings.kafka.bootstrap_servers)
            assert isinstance(clock, AcceleratedClock)
            demo = DemoFeeder(
                feeder_transport,
                settings.topics.inbound[0],
                clock,
                settings.ingest.event_type_prefix,
            )
            log.info(
                "demo: clock runs %gx (1 s = %.1f h); events are on their way",
                args.speed,
                args.speed / 3600,
            )
        for service in services:
            log.info(
                "%s: http://%s:%d  (docs at /docs)", service.name, settings.http.host, service.port
            )
        tune_for_service()  # built: what exists now lives as long as the process
        asyncio.run(_serve(services, settings.http.host, demo))


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{option}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: must be a JSON object ({{...}}), not {type(value).__name__}")
    return value


def cmd_publish(settings: Settings, args: argparse.Namespace) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    data: dict[str, Any] = {"customer_id": args.customer}
    if args.data:
        data.update(_json_object(args.data, "--data"))
    if not settings.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS) is empty")
    event = {
        "specversion": "1.0",
        "id": args.id or str(uuid.uuid4()),
        "source": args.source,
        "type": f"{settings.ingest.event_type_prefix}.{args.type}",
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
        try:
            await producer.start()
            await producer.send_and_wait(
                args.topic or settings.topics.inbound[0],
                orjson.dumps(event),
                key=args.customer.encode(),
                headers=[("content-type", b"application/cloudevents+json")],
            )
        finally:
            await producer.stop()

    # the outcome is this command's one line: not aiokafka's log of each connection attempt
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        asyncio.run(send())
    except (KafkaConnectionError, KafkaTimeoutError, OSError) as exc:
        _unavailable("the broker", settings.kafka.bootstrap_servers, exc)
    except KafkaError as exc:
        line = f"winback: the broker refused the event: {type(exc).__name__}: {exc}"
        print(line[:500], file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    print(orjson.dumps(event).decode())


def cmd_asyncapi(settings: Settings, args: argparse.Namespace) -> None:
    from shared.contracts.asyncapi import document, to_yaml

    sys.stdout.write(to_yaml(document(settings.topics, settings.ingest.event_type_prefix)))


def cmd_validate(settings: Settings, args: argparse.Namespace) -> None:
    from services.validate import validate

    report = validate(
        args.playbooks or settings.scheduler.playbooks_dir, args.content or settings.content_dir
    )
    for problem in report.problems:
        print(problem)
    if not report.ok:
        print(f"winback validate: {len(report.problems)} problem(s)", file=sys.stderr)
        raise SystemExit(1)
    print(report.summary())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="winback", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"winback {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "migrate",
        help="apply the database migrations (or --down REV); exit code 69 if the database "
        "does not answer (within --wait), 2 if the configuration is wrong",
    )
    m.add_argument("--down", help="downgrade to this revision (e.g. base)")
    m.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the database to answer, retrying with backoff "
        "(default 0: one try; an init container or hook job wants a bounded wait, e.g. 120)",
    )
    for name in (*SERVICES, "relay"):
        s = sub.add_parser(
            name,
            help=f"run the {name} service"
            if name != "relay"
            else "run only the outbox relay (scale it apart from the consumers)",
        )
        s.add_argument("--migrate", action="store_true", help="apply migrations first")
    run = sub.add_parser(
        "run", help="run all services; embedded PostgreSQL and event bus when none configured"
    )
    run.add_argument("--demo", action="store_true", help="feed a demo stream, accelerated clock")
    run.add_argument(
        "--speed",
        type=float,
        default=43_200.0,
        help="demo clock speed-up (default 43200: one second is twelve hours)",
    )
    run.add_argument(
        "--local-kafka",
        action="store_true",
        help="start a local Kafka broker instead of the in-process bus",
    )
    pub = sub.add_parser("publish-test-event", help="publish one CloudEvent to Kafka")
    pub.add_argument("--type", default="subscription.cancelled")
    pub.add_argument("--customer", default="cus_demo_1")
    pub.add_argument("--data", help="a JSON object merged into the event data")
    pub.add_argument("--id")
    pub.add_argument("--source", default="/billing/test")
    pub.add_argument("--topic")
    sub.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of every event and topic (YAML; "
        "docs/asyncapi.yaml is this with the default settings)",
    )
    dlq_cli.add_parser(sub)
    simulate_cli.add_parser(sub)
    backfill_cli.add_parser(sub)
    val = sub.add_parser(
        "validate",
        help="check playbooks and content as the services do at start-up; one line per "
        "problem (file:line: field: reason), exit code 1 if any",
    )
    val.add_argument("--playbooks", type=Path, help="playbook directory (default: the setting)")
    val.add_argument("--content", type=Path, help="content directory (default: the setting)")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    winback_logging.configure(
        settings.log_level,
        f"winback-{args.command}",
        settings.log_repeat_interval_seconds,
        settings.log_format,
    )
    try:
        if args.command == "migrate":
            cmd_migrate(settings, args)
        elif args.command == "publish-test-event":
            cmd_publish(settings, args)
        elif args.command == "asyncapi":
            cmd_asyncapi(settings, args)
        elif args.command == "dlq":
            raise SystemExit(dlq_cli.run(settings, args))
        elif args.command == "simulate":
            raise SystemExit(simulate_cli.run(settings, args))
        elif args.command == "billing":
            raise SystemExit(backfill_cli.run(settings, args))
        elif args.command == "validate":
            cmd_validate(settings, args)
        else:
            cmd_service(settings, args)
    except (ConfigError, PlaybookError, UsageError) as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
