"""The ``winback`` command: start a service (or all of them), run migrations, publish a test
event."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from services.scheduler.domain.errors import PlaybookError
from shared import logging as winback_logging
from shared.clock import AcceleratedClock, Clock
from shared.errors import ConfigError
from shared.messaging.transport import Transport
from shared.settings import Settings, load_settings

SERVICES = ("ingest", "scheduler", "dispatcher")


def _app_for(
    name: str, settings: Settings, transport: Transport | None = None, clock: Clock | None = None
) -> Any:
    if name == "ingest":
        from services.ingest.bootstrap import bootstrap as ingest

        return ingest(settings, transport=transport, clock=clock).app
    if name == "scheduler":
        from services.scheduler.bootstrap import bootstrap as scheduler

        return scheduler(settings, transport=transport, clock=clock).app
    if name == "dispatcher":
        from services.dispatcher.bootstrap import bootstrap as dispatcher

        return dispatcher(settings, transport=transport, clock=clock).app
    if name == "relay":
        from services.relay import bootstrap as relay

        return relay(settings, transport=transport, clock=clock)[1]
    raise SystemExit(f"unknown service {name!r}")


def _port(name: str, settings: Settings) -> int:
    port: int = getattr(settings.http, f"{name}_port")
    return port


async def _serve(apps: list[tuple[str, Any, int]], host: str, demo: Any = None) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """Several servers share one loop: the signal handling is ours, not each server's."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    servers = [
        Server(uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on"))
        for _, app, port in apps
    ]
    loop = asyncio.get_running_loop()

    def _exit() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit)

    async def feed() -> None:
        while not all(s.started for s in servers):  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # the consumers join their groups
        await demo.run()

    tasks = [asyncio.create_task(s.serve()) for s in servers]
    if demo is not None:
        tasks.append(asyncio.create_task(feed()))
    await asyncio.gather(*tasks)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from shared.db import migrate

    with ExitStack() as stack:
        if not settings.database.url:
            from shared.local.embedded import with_local_database

            settings = with_local_database(settings, stack)
        if args.down:
            migrate.downgrade(settings.database.url, args.down)
        else:
            migrate.upgrade(settings.database.url, "head")
    print("migrations done")


def cmd_service(settings: Settings, args: argparse.Namespace) -> None:
    from shared.db import migrate

    names = SERVICES if args.command == "run" else (args.command,)
    transport: Transport | None = None
    clock: Clock | None = None
    demo = None
    with ExitStack() as stack:
        if args.command == "run":
            from shared.local.embedded import with_local_broker, with_local_database

            settings = with_local_database(settings, stack)
            if not settings.kafka.bootstrap_servers and args.local_kafka:
                settings = with_local_broker(settings, stack)
            if not settings.kafka.bootstrap_servers:
                from shared.messaging.memory import MemoryBus

                path = Path(settings.kafka.data_dir).with_name("bus.sqlite")
                path.parent.mkdir(parents=True, exist_ok=True)
                bus = MemoryBus(path=path, max_record_bytes=settings.kafka.max_record_bytes)
                stack.callback(bus.close)
                transport = bus
                print(f"event bus: in-process (no Kafka configured), kept in {path}", flush=True)
            if args.demo:
                clock = AcceleratedClock(factor=args.speed)
        if args.command == "run" or args.migrate:
            migrate.upgrade(settings.database.url)
        apps = [(n, _app_for(n, settings, transport, clock), _port(n, settings)) for n in names]
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
            print(
                f"demo: clock runs {args.speed:g}x (1 s = {args.speed / 3600:.1f} h); "
                "events are on their way",
                flush=True,
            )
        for name, _, port in apps:
            print(f"{name}: http://{settings.http.host}:{port}  (docs at /docs)", flush=True)
        asyncio.run(_serve(apps, settings.http.host, demo))


def cmd_publish(settings: Settings, args: argparse.Namespace) -> None:
    from aiokafka import AIOKafkaProducer

    if not settings.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS) is empty")
    data: dict[str, Any] = {"customer_id": args.customer}
    if args.data:
        data.update(orjson.loads(args.data))
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
        await producer.start()
        try:
            await producer.send_and_wait(
                args.topic or settings.topics.inbound[0],
                orjson.dumps(event),
                key=args.customer.encode(),
                headers=[("content-type", b"application/cloudevents+json")],
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    print(orjson.dumps(event).decode())


def cmd_asyncapi(settings: Settings, args: argparse.Namespace) -> None:
    from shared.contracts.asyncapi import document, to_yaml

    sys.stdout.write(to_yaml(document(settings.topics, settings.ingest.event_type_prefix)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="winback", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="apply the database migrations (or --down REV)")
    m.add_argument("--down", help="downgrade to this revision (e.g. base)")
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
    pub.add_argument("--data", help="JSON merged into the event data")
    pub.add_argument("--id")
    pub.add_argument("--source", default="/billing/test")
    pub.add_argument("--topic")
    sub.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of every event and topic (YAML; "
        "docs/asyncapi.yaml is this with the default settings)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    winback_logging.configure(
        settings.log_level, f"winback-{args.command}", settings.log_repeat_interval_seconds
    )
    try:
        if args.command == "migrate":
            cmd_migrate(settings, args)
        elif args.command == "publish-test-event":
            cmd_publish(settings, args)
        elif args.command == "asyncapi":
            cmd_asyncapi(settings, args)
        else:
            cmd_service(settings, args)
    except (ConfigError, PlaybookError) as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
