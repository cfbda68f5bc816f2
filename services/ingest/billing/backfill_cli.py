"""``winback billing backfill stripe|paddle --since 2025-11-01``: the parser and the command's
run (the work is ``services.ingest.billing.backfill``; the providers' libraries are imported
only when the command runs).

The API key is ``WINBACK_BILLING__<PROVIDER>__API_KEY`` (read access to subscriptions,
customers and events is enough); the broker ``WINBACK_KAFKA__BOOTSTRAP_SERVERS``,
the topic the first of ``WINBACK_TOPICS__INBOUND``. Progress on stderr (a bar on a terminal),
the summary on stdout.

Exit codes: 0 done; 1 the provider or the broker refused a request (one line); 2 a
configuration or an argument that can never work, or the provider
refused the API key; 69 the provider or the broker did not answer (or kept rate-limiting us)
— the checkpoint keeps what was done: run the command again to go on; 130 interrupted (the
same).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.messaging.dlq_cli import when
from shared.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
PROVIDERS = ("stripe", "paddle", "chargebee")


def add_parser(sub: Any) -> None:
    """Add ``billing backfill`` to the ``winback`` parser's subparsers."""
    b = sub.add_parser("billing", help="billing connectors: backfill past cancellations")
    bsub = b.add_subparsers(dest="billing_command", required=True)
    f = bsub.add_parser(
        "backfill",
        help="publish the provider's canceled subscriptions since a date as our events, with "
        "their real times (resumable; a second run adds nothing)",
    )
    f.add_argument("provider", choices=PROVIDERS)
    f.add_argument(
        "--since",
        type=when,
        required=True,
        help="subscriptions that ended at or after this time (2025-11-01, ISO 8601, or 365d)",
    )
    f.add_argument(
        "--restart",
        action="store_true",
        help="ignore the checkpoint: publish everything since --since again, what earlier "
        "runs published too (ingest's inbox drops what it still remembers)",
    )
    f.add_argument(
        "--checkpoint",
        type=Path,
        help="the checkpoint file (default: one per account and topic under "
        "$WINBACK_CACHE_DIR or ~/.cache/winback/backfill/)",
    )
    f.add_argument(
        "--api-base",
        help="the provider's API address (default: the provider's; e.g. a stripe-mock)",
    )
    f.add_argument("--topic", help="publish here (default: the first inbound topic)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from services.ingest.billing import backfill

    if args.provider not in backfill.PROVIDERS:
        print(
            f"winback: billing backfill {args.provider}: not available yet (only "
            f"{', '.join(backfill.PROVIDERS)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    connector = getattr(settings.billing, args.provider)
    key = connector.api_key
    if key is None or not key.get_secret_value():
        variable = f"WINBACK_BILLING__{args.provider.upper()}__API_KEY"
        raise ConfigError(f"billing.{args.provider}.api_key ({variable}) is not set")
    if not settings.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers (WINBACK_KAFKA__BOOTSTRAP_SERVERS) is empty")
    since: datetime = args.since
    topic: str = args.topic or settings.topics.inbound[0]
    path = args.checkpoint or backfill.checkpoint_path(args.provider, key.get_secret_value(), topic)
    job = backfill.Run(
        since=since,
        topic=topic,
        type_prefix=settings.ingest.event_type_prefix,
        checkpoint=backfill.Checkpoint(path),
        restart=args.restart,
        id_key=connector.customer_id_key,
    )
    # the outcome is this command's lines, not each client's log of a connection attempt
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("stripe").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        counts = asyncio.run(
            _run(settings, key.get_secret_value(), args.api_base, job, args.provider)
        )
    except backfill.BackfillError as exc:
        print(f"winback: billing backfill {args.provider}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _unavailable(exc):
            if not _refused(exc):
                raise
            print(f"winback: billing backfill {args.provider}: {_reason(exc)}", file=sys.stderr)
            return EXIT_FAILED
        line = f"winback: billing backfill {args.provider}: did not finish: {_reason(exc)}"
        print(f"{line}; run it again to go on from {path}"[:600], file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(
        f"{args.provider}: {counts.read} canceled subscriptions read, {counts.published} "
        f"events published to {topic}; left alone: {counts.before_since} ended before "
        f"{since.isoformat()}, {counts.earlier_run} published by an earlier run, "
        f"{counts.active_again} customers active again, {counts.not_mapped} not readable "
        f"(logged)"
    )
    if counts.earlier_run:
        print("(--restart publishes those again; ingest's inbox drops what it still remembers)")
    return 0


async def _run(
    settings: Settings, api_key: str, api_base: str | None, job: Any, provider: str
) -> Any:
    from services.ingest.billing import backfill
    from shared.messaging.kafka import KafkaTransport

    transport = KafkaTransport(
        settings.kafka.bootstrap_servers,
        settings.kafka.client_id,
        max_record_bytes=settings.kafka.max_record_bytes,
    )
    publisher = transport.publisher()
    source: backfill.Source = (
        backfill.StripeSource(api_key, api_base)
        if provider == "stripe"
        else backfill.PaddleSource(api_key, api_base)
    )
    try:
        await publisher.start()
        return await backfill.backfill(source, publisher, job, backfill.default_progress(provider))
    finally:
        await source.close()
        await publisher.stop()


def _unavailable(exc: BaseException) -> bool:
    """The provider or the broker did not answer (after the retries)."""
    import stripe
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
    from requests import HTTPError

    from shared.messaging.transport import PublishFailed
    from shared.retry import is_transient

    if isinstance(exc, PublishFailed):
        return exc.outcome.status == "failed"
    kinds = (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError)
    if isinstance(exc, HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500  # Paddle's SDK: its ApiError is one
    return isinstance(exc, (*kinds, KafkaConnectionError, KafkaTimeoutError)) or is_transient(exc)


def _refused(exc: BaseException) -> bool:
    """The provider or the broker refused a request (a Stripe 400, a record refused)."""
    import stripe
    from aiokafka.errors import KafkaError
    from requests import HTTPError

    from shared.messaging.transport import PublishFailed

    return isinstance(exc, stripe.StripeError | HTTPError | KafkaError | PublishFailed)


def _reason(exc: BaseException) -> str:
    text = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())
