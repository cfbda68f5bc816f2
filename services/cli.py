"""The ``winback`` command: start a service, run migrations, publish a test event."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import orjson

from services.scheduler.domain.errors import PlaybookError
from shared import logging as winback_logging
from shared.errors import ConfigError
from shared.settings import Settings, load_settings

SERVICES = ("ingest", "scheduler")


def _app_for(name: str, settings: Settings) -> Any:
    if name == "ingest":
        from services.ingest.bootstrap import bootstrap

        return bootstrap(settings).app
    if name == "relay":
        from services.relay import bootstrap as relay

        return relay(settings)[1]
    if name == "scheduler":
        from services.scheduler.bootstrap import bootstrap as scheduler

        return scheduler(settings).app
    raise SystemExit(f"unknown service {name!r}")


def _port(name: str, settings: Settings) -> int:
    port: int = getattr(settings.http, f"{name}_port")
    return port


async def _serve(apps: list[tuple[str, Any, int]], host: str) -> None:
    import contextlib
    from collections.abc import Iterator

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
    await asyncio.gather(*(server.serve() for server in servers))


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from shared.db import migrate

    with ExitStack() as stack:
        if not settings.database.url:
            from shared.local.embedded import with_local_infrastructure

            settings = with_local_infrastructure(
                settings.model_copy(
                    update={
                        "kafka": settings.kafka.model_copy(
                            update={"bootstrap_servers": "unused:9092"}
                        )
                    }
                ),
                stack,
            )
        if args.down:
            migrate.downgrade(settings.database.url, args.down)
        else:
            migrate.upgrade(settings.database.url, "head")
    print("migrations done")


def cmd_service(settings: Settings, args: argparse.Namespace) -> None:
    names = SERVICES if args.command == "run" else (args.command,)
    with ExitStack() as stack:
        if args.command == "run":
            from shared.local.embedded import with_local_infrastructure

            settings = with_local_infrastructure(settings, stack)
        from shared.db import migrate

        if args.command == "run" or args.migrate:
            migrate.upgrade(settings.database.url)
        apps = [(n, _app_for(n, settings), _port(n, settings)) for n in names]
        for name, _, port in apps:
            print(f"{name}: http://{settings.http.host}:{port}  (docs at /docs)", flush=True)
        asyncio.run(_serve(apps, settings.http.host))


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
    sub.add_parser("run", help="run everything, with a local database and broker if unset")
    pub = sub.add_parser("publish-test-event", help="publish one CloudEvent to Kafka")
    pub.add_argument("--type", default="subscription.cancelled")
    pub.add_argument("--customer", default="cus_demo_1")
    pub.add_argument("--data", help="JSON merged into the event data")
    pub.add_argument("--id")
    pub.add_argument("--source", default="/billing/test")
    pub.add_argument("--topic")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    winback_logging.configure(settings.log_level, f"winback-{args.command}")
    try:
        if args.command == "migrate":
            cmd_migrate(settings, args)
        elif args.command == "publish-test-event":
            cmd_publish(settings, args)
        else:
            cmd_service(settings, args)
    except (ConfigError, PlaybookError) as exc:
        print(f"winback: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
