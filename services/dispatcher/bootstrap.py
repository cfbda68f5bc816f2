"""Wires the dispatcher: settings checks, templates (checked at start-up), provider chains over
pooled HTTP clients, the command/erasure consumer, the sender loop, webhooks, unsubscribe and
the gauges. Tests pass their own engine, transport, clock or HTTP clients into the same
function."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher import metrics, store
from services.dispatcher.channels import ChannelSender, build_channels, make_http_clients
from services.dispatcher.compose import Composer
from services.dispatcher.errors import TemplateError
from services.dispatcher.handler import DispatchHandler
from services.dispatcher.message_log import LoggedWebhooks
from services.dispatcher.message_log import router as message_log_router
from services.dispatcher.preview import Previewer
from services.dispatcher.preview import router as preview_router
from services.dispatcher.providers import Provider
from services.dispatcher.queries.sent_steps import SentSteps
from services.dispatcher.reconcile import searches_for
from services.dispatcher.rendering import (
    Brand,
    Channel,
    TemplateRenderer,
    TemplateSpec,
    samples_from,
    specs_from,
    variants_from,
)
from services.dispatcher.sender import DeliverySender, SenderConfig
from services.dispatcher.signatures import (
    SendGridWebhookVerifier,
    TwilioRequestValidator,
    UnsubscribeTokens,
    load_sendgrid_public_key,
)
from services.dispatcher.unsubscribe import UnsubscribeHandler
from services.dispatcher.unsubscribe import router as unsubscribe_router
from services.dispatcher.webhooks import WebhookAuth, WebhookHandler
from services.dispatcher.webhooks import router as webhooks_router
from shared.bootstrap import Core, build_core
from shared.clock import Clock
from shared.content import catalog_for
from shared.errors import ConfigError
from shared.http.app import create_app
from shared.http.auth import require_scope
from shared.messaging.consumer import ConsumerRunner
from shared.messaging.pipeline import Pipeline
from shared.messaging.transport import Transport
from shared.settings import CHANNEL_KINDS, DispatcherSettings, Settings

CONSUMER = "dispatcher"
SOURCE = "/winback/dispatcher"
log = logging.getLogger(__name__)


@dataclass
class DispatcherService:
    core: Core
    pipeline: Pipeline
    consumer: ConsumerRunner
    sender: DeliverySender
    channels: dict[str, ChannelSender]
    webhooks: Pipeline
    unsubscribes: Pipeline
    tokens: UnsubscribeTokens
    composer: Composer
    app: FastAPI
    http_clients: list[httpx.AsyncClient] = field(default_factory=list)
    owns_clients: bool = True

    async def aclose(self) -> None:
        """Close the HTTP clients this service made (not ones passed in)."""
        if self.owns_clients:
            await asyncio.gather(*(c.aclose() for c in self.http_clients))


def check_settings(settings: Settings) -> None:
    """Start-up checks beyond the field types; ``ConfigError`` names each problem."""
    d = settings.dispatcher
    problems = d.production_problems() if settings.environment == "production" else []
    if d.webhooks.sendgrid_public_key is not None:
        try:
            load_sendgrid_public_key(d.webhooks.sendgrid_public_key)
        except ValueError as exc:
            problems.append(f"dispatcher.webhooks.sendgrid_public_key: {exc}")
    if problems:
        raise ConfigError("invalid dispatcher configuration:\n  " + "\n  ".join(problems))
    for name in CHANNEL_KINDS:
        for provider in d.channel(name).providers:
            if provider.kind == "file" and settings.environment == "production":
                log.warning(
                    "production %s messages go to files, not to a provider",
                    name,
                    extra={"directory": str(provider.directory)},
                )


@functools.cache
def _checked_renderer(company: str, address: str, content_dir: Path | None) -> None:
    """``check_templates`` once per process for the same inputs (the files do not change)."""
    catalog = catalog_for(content_dir)
    renderer = TemplateRenderer(
        Brand(company, address),
        catalog.directory,
        specs=specs_from(catalog),
        samples=samples_from(catalog),
        variants=variants_from(catalog),
    )
    renderer.check_templates(sorted(catalog.template_names))


def check_templates(settings: Settings) -> None:
    """Every template of the content's catalogue (``content_dir``, or the shipped content;
    the scheduler's playbook loader holds playbooks to the same catalogue) exists on each of
    its channels and renders in every locale of the content. The dispatcher reads no
    playbooks: the catalogue is the contract."""
    d = settings.dispatcher
    try:
        _checked_renderer(d.company_name, d.postal_address, settings.content_dir)
    except TemplateError as exc:
        raise ConfigError(str(exc)) from exc


def bootstrap(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    transport: Transport | None = None,
    clock: Clock | None = None,
    http_clients: Sequence[httpx.AsyncClient] | None = None,
    group: str = CONSUMER,
    providers: Mapping[str, Sequence[Provider]] | None = None,
    templates: Path | None = None,
    template_specs: Mapping[tuple[str, Channel], TemplateSpec] | None = None,
) -> DispatcherService:
    """``providers``: the provider adapters of channels registered in ``shared.channels``
    beyond the built-in ones; ``templates`` and ``template_specs``: where the messages'
    templates are and what each needs (README, "Adding a channel"; default: the content
    directory of the ``content_dir`` setting, or the shipped content)."""
    check_settings(settings)
    d: DispatcherSettings = settings.dispatcher
    check_templates(settings)
    core = build_core(settings, engine=engine, transport=transport, clock=clock)
    topics = settings.topics
    owns_clients = http_clients is None
    clients = make_http_clients(d) if http_clients is None else list(http_clients)
    channels = build_channels(d, clients, core.clock, providers, crm_history=SentSteps(core.engine))
    catalog = catalog_for(settings.content_dir)
    renderer = TemplateRenderer(
        Brand(d.company_name, d.postal_address),
        catalog.directory if templates is None else templates,
        specs=specs_from(catalog) if template_specs is None else template_specs,
        variants=variants_from(catalog),
    )
    tokens = UnsubscribeTokens(
        [k.get_secret_value().encode() for k in d.unsubscribe_keys],
        core.clock,
        max_age=timedelta(days=d.unsubscribe_max_age_days) if d.unsubscribe_max_age_days else None,
    )
    composer = Composer(
        renderer,
        tokens,
        public_base_url=d.public_base_url,
        product=d.product_name,
        cta_url=d.cta_url,
        highlights=d.highlights,
        unsubscribe_mailto=d.unsubscribe_mailto,
        crm_default_owner=d.crm_default_owner,
        crm_task_due=timedelta(hours=d.crm_task_due_hours),
        status_api_base_url=d.status_api_base_url,
    )

    limit = settings.kafka.max_record_bytes
    pipeline = Pipeline(
        core.engine,
        group,
        DispatchHandler(topics.outcomes),
        core.clock,
        topics.dead_letter,
        SOURCE,
        limit,
    )
    consumer = ConsumerRunner(
        core.transport.subscription(group, [topics.dispatch, topics.erasure]),
        pipeline,
        max_batch=settings.kafka.max_batch,
        poll_timeout_ms=settings.kafka.poll_timeout_ms,
        linger_ms=settings.kafka.batch_linger_ms,
    )
    sender = DeliverySender(
        core.engine,
        core.clock,
        channels,
        composer,
        SenderConfig(
            outcomes_topic=topics.outcomes,
            source=SOURCE,
            consent_by_default=tuple(settings.scheduler.consent_by_default),
            batch_size=d.claim_batch,
            max_in_flight=d.max_in_flight,
            poll_seconds=d.poll_seconds,
            stale_after=timedelta(seconds=d.stale_sending_seconds),
            rounds=d.retry.rounds,
            round_delay=timedelta(seconds=d.retry.round_delay_seconds),
            late_grace=timedelta(seconds=d.late_send_grace_seconds),
            max_record_bytes=limit,
            unknown_window=timedelta(seconds=d.unknown_reconcile_seconds),
        ),
        searches=searches_for(d, clients),
    )
    names: dict[str, list[str]] = {}
    for name in CHANNEL_KINDS:
        for provider in d.channel(name).providers:
            names.setdefault(provider.kind, []).append(provider.label)
    webhooks = Pipeline(
        core.engine,
        f"{group}-webhooks",
        LoggedWebhooks(WebhookHandler(topics.outcomes, names)),
        core.clock,
        topics.dead_letter,
        SOURCE,
        limit,
    )
    unsubscribes = Pipeline(
        core.engine,
        f"{group}-unsubscribe",
        UnsubscribeHandler(topics.outcomes),
        core.clock,
        topics.dead_letter,
        SOURCE,
        limit,
    )
    auth = _webhook_auth(d, core.clock)

    stopping = asyncio.Event()

    async def gauges() -> None:
        async with core.engine.connect() as conn:
            for state, count in (await store.count_by_state(conn)).items():
                metrics.DELIVERIES.labels(state).set(count)

    async def close_clients() -> None:
        """Close our HTTP clients once the sender has finished what was in flight."""
        await stopping.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sender.idle.wait(), 60)
        if owns_clients:
            await asyncio.gather(*(c.aclose() for c in clients))

    core.runtime.consumers.append(consumer)
    core.runtime.extra_parts += [
        ("delivery-sender", sender.run, sender.stop),
        ("http-clients", close_clients, stopping.set),
    ]
    core.runtime.every("dispatcher-gauges", 5, gauges)
    core.runtime.topics = [topics.dispatch, topics.erasure, topics.outcomes, topics.dead_letter]

    app = create_app(
        "winback dispatcher",
        checks=core.runtime.readiness_checks,
        routers=[
            webhooks_router(webhooks, auth, core.clock),
            message_log_router(core.engine, require_scope("read")),
            preview_router(
                Previewer(
                    composer,
                    catalog,
                    core.engine,
                    core.clock,
                    sms_max_segments=d.sms_max_segments,
                    crm_default_owner=d.crm_default_owner,
                ),
                channels,
                d.test_recipients,
                production=settings.environment == "production",
            ),
            unsubscribe_router(
                unsubscribes,
                tokens,
                core.clock,
                product=d.product_name,
                company=d.company_name,
                postal_address=d.postal_address,
            ),
        ],
        lifespan=core.runtime.lifespan,
        api_keys=settings.http.api_keys,
    )
    return DispatcherService(
        core=core,
        pipeline=pipeline,
        consumer=consumer,
        sender=sender,
        channels=channels,
        webhooks=webhooks,
        unsubscribes=unsubscribes,
        tokens=tokens,
        composer=composer,
        app=app,
        http_clients=clients,
        owns_clients=owns_clients,
    )


def _webhook_auth(d: DispatcherSettings, clock: Clock) -> WebhookAuth:
    hooks = d.webhooks
    tolerance = timedelta(seconds=hooks.tolerance_seconds)
    sendgrid = (
        SendGridWebhookVerifier(hooks.sendgrid_public_key, clock, tolerance=tolerance)
        if hooks.sendgrid_public_key
        else None
    )
    token = hooks.twilio_auth_token.get_secret_value() if hooks.twilio_auth_token else ""
    if not token:
        twilio = [p for p in d.sms.providers if p.kind == "twilio" and p.api_key is not None]
        token = twilio[0].api_key.get_secret_value() if twilio and twilio[0].api_key else ""
    postmark = None
    if hooks.postmark_username is not None and hooks.postmark_password is not None:
        postmark = (hooks.postmark_username, hooks.postmark_password.get_secret_value())
    return WebhookAuth(
        sendgrid=sendgrid,
        twilio=TwilioRequestValidator(token) if token else None,
        postmark=postmark,
        public_base_url=d.public_base_url,
    )
