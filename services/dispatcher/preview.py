"""Preview a message before a customer sees it, and send a test of it to yourself.

``POST /v1/preview`` renders a template on a channel in a locale, for one of three kinds of
data: a known customer (``customer_id``: their profile from the scheduler's published read
model, their open case's segment), inline ``data`` (the template's fields, over its sample
data), or neither (the template's own sample data from the content catalogue). It returns the
subject, text, HTML, SMS segment count, CRM task text, and warnings (a field the message goes
without, an SMS over the segment limit). No side effects: nothing written, no provider call.

``POST /v1/test-sends`` renders the same and sends it through the channel's real provider
chain (failover included) to the address given in the request, marked as a test: a
``[Test]`` subject, a ``test`` tag, an idempotency key of its own. It writes no delivery, so it
is never counted in reports, caps or attribution and never touches a case. Recipients must
match ``dispatcher.test_recipients`` (patterns such as ``*@acme.example``; with none set,
any recipient outside production and none in production).
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.channels import ChannelSender
from services.dispatcher.compose import Composer, Profile
from services.dispatcher.errors import SendError, TemplateError
from services.dispatcher.providers.base import CrmTaskDetails, OutboundMessage
from services.dispatcher.rendering import OPTIONAL_PROFILE_FIELDS, RenderedMessage
from shared import channels, sms
from shared.clock import Clock
from shared.content import Catalog, field_value
from shared.http.auth import require_scope
from shared.http.problems import Problem, invalid_field, problems

TEST_SENDS = Counter(
    "winback_test_sends_total",
    "Test sends (POST /v1/test-sends) by channel and outcome (sent, failed, refused)",
    ["channel", "outcome"],
)

_PROFILE = text(
    "SELECT customer_id, erased, name, email, phone, locale, timezone, mrr_minor, currency "
    "FROM dispatcher_customer_status WHERE customer_id = :id"
)
_SEGMENT = text(
    "SELECT segment FROM dispatcher_case_status WHERE customer_id = :id "
    "ORDER BY (status = 'open') DESC LIMIT 1"
).columns(segment=JSONB)


_OURS = frozenset({"product", "cta_url", "unsubscribe_url"})
"""Fields the composer fills from settings: sample data never stands in for them."""


class PreviewRequest(BaseModel):
    """What to preview: a template on a channel, and whose data."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(min_length=1, max_length=100, examples=["we_miss_you"])
    channel: str = Field(default="email", min_length=1, max_length=40)
    locale: str | None = Field(
        default=None,
        max_length=35,
        description="BCP 47 (fi-FI falls back to fi, then en); unset: the customer's, else English",
    )
    variant: str | None = Field(default=None, max_length=100, description="utm_content of links")
    offer: str | None = Field(
        default=None,
        max_length=200,
        description="an offer name of the catalogue (put into "
        "words in the locale) or a short phrase",
    )
    customer_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="preview with this customer's profile and case",
    )
    data: dict[str, Any] | None = Field(
        default=None,
        description="template fields (name, offer, valid_until, new_features, churn_reason, "
        "segment, mrr, currency) over the template's sample data",
        examples=[{"name": "Aino", "new_features": ["SSO", "Audit log"]}],
    )

    @model_validator(mode="after")
    def _one_source(self) -> PreviewRequest:
        if self.customer_id is not None and self.data is not None:
            raise ValueError("give customer_id or data, not both")
        return self


class TestSendRequest(PreviewRequest):
    to: str = Field(
        min_length=3,
        max_length=320,
        description="the address (email), number (SMS, E.164), "
        "owner id (CRM) or receiver id (webhook) to send the test to",
    )


class SmsInfo(BaseModel):
    encoding: Literal["GSM-7", "UCS-2"]
    units: int = Field(description="septets (GSM-7) or UTF-16 code units (UCS-2)")
    segments: int = Field(description="messages the carrier sends and bills")


class Preview(BaseModel):
    template: str
    channel: str
    locale: str = Field(description="the template locale used (after fallback)")
    source: Literal["customer", "data", "sample"]
    subject: str | None = Field(description="email subject or CRM task subject; null for SMS")
    text: str = Field(description="plain-text part, SMS body or CRM task body")
    html: str | None
    sms: SmsInfo | None = None
    warnings: list[str]


class TestSendResult(BaseModel):
    preview: Preview
    provider: str
    provider_message_id: str | None
    idempotency_key: str


class Previewer:
    def __init__(
        self,
        composer: Composer,
        catalog: Catalog,
        engine: AsyncEngine,
        clock: Clock,
        *,
        sms_max_segments: int,
        crm_default_owner: str | None,
    ) -> None:
        self.composer = composer
        self.catalog = catalog
        self.engine = engine
        self.clock = clock
        self.sms_max_segments = sms_max_segments
        self.crm_default_owner = crm_default_owner

    async def preview(self, req: PreviewRequest) -> tuple[Preview, RenderedMessage, dict[str, Any]]:
        """The preview, the rendered message and the context it was rendered from."""
        template = self.catalog.templates.get(req.template)
        if template is None:
            raise invalid_field("template", f"unknown template {req.template!r}")
        if req.channel not in channels.names():
            raise invalid_field("channel", f"unknown channel {req.channel!r}")
        fields = template.fields.get(req.channel)
        if fields is None:
            shipped = ", ".join(sorted(template.fields))
            raise invalid_field(
                "channel",
                f"template {req.template!r} has no {req.channel} version (it has: {shipped})",
            )
        customer: dict[str, Any] = {"id": req.customer_id or "preview", "locale": req.locale}
        profile = Profile()
        source: Literal["customer", "data", "sample"] = "sample"
        if req.customer_id is not None:
            source = "customer"
            profile, row = await self._profile(req.customer_id)
            customer.update({"locale": req.locale or row["locale"], "name": row["name"]})
        elif req.data is not None:
            source = "data"
        command: dict[str, Any] = {
            "template": req.template,
            "channel": req.channel,
            "variant": req.variant,
            "offer": req.offer,
            "customer": customer,
        }
        context = self.composer.context(command, profile, req.channel)
        used = fields.required | fields.optional
        warnings: list[str] = []
        if source != "customer":
            # a blank text is no value: the message goes as it would without the field
            given = _fields(req.data or {})
            blank = {k for k, v in given.items() if isinstance(v, str) and not v.strip()}
            for name, value in template.sample.items():
                if name in used and name not in given and name not in _OURS:
                    context.setdefault(name, value)
            context.update({k: v for k, v in given.items() if k in used and k not in blank})
            for name in blank:
                context.pop(name, None)
            ignored = sorted(set(given) - used)
            if ignored:
                warnings.append(f"not used by this template: {', '.join(ignored)}")
        for name in sorted((fields.optional & OPTIONAL_PROFILE_FIELDS) - set(context)):
            warnings.append(f"no {name}: the message goes without it")
        try:
            rendered = self.composer.renderer.render(
                req.template, req.channel, customer.get("locale"), context
            )
        except TemplateError as exc:
            missing = list(getattr(exc, "missing_fields", None) or [])
            raise Problem(
                422,
                "The message cannot be rendered",
                str(exc),
                type="/problems/template",
                errors=[
                    {"field": f"data.{name}", "reason": "required by the template"}
                    for name in missing
                ]
                or [{"field": "template", "reason": str(exc)}],
            ) from None
        info = None
        if req.channel == "sms":
            counted = sms.segments(rendered.text)
            info = SmsInfo(
                encoding=counted.encoding, units=counted.units, segments=counted.segments
            )
            if counted.segments > self.sms_max_segments:
                warnings.append(
                    f"the SMS takes {counted.segments} segments ({counted.encoding}), over the "
                    f"limit of {self.sms_max_segments} (dispatcher.sms_max_segments)"
                )
        preview = Preview(
            template=req.template,
            channel=req.channel,
            locale=rendered.locale,
            source=source,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            sms=info,
            warnings=warnings,
        )
        return preview, rendered, context

    async def _profile(self, customer_id: str) -> tuple[Profile, Mapping[str, Any]]:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_PROFILE, {"id": customer_id})).mappings().first()
            segment = (await conn.execute(_SEGMENT, {"id": customer_id})).scalar()
        if row is None or row["erased"]:
            raise Problem(
                404,
                "No such customer",
                f"customer {customer_id!r} is not known",
                type="/problems/not-found",
            )
        profile = Profile(
            name=row["name"],
            email=row["email"],
            phone=row["phone"],
            timezone=row["timezone"],
            mrr_minor=row["mrr_minor"],
            currency=row["currency"],
            segment=segment,
        )
        return profile, dict(row)


def _fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Inline data as the renderer takes it (``shared.content.field_value``); an unknown name
    or a value of the wrong kind is a 422 naming the field."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        try:
            out[name] = field_value(name, value, blank_ok=True)
        except ValueError as exc:
            raise invalid_field(f"data.{name}", str(exc)) from None
    return out


def allowed_recipient(to: str, patterns: list[str], production: bool) -> bool:
    """Whether a test may go to ``to``: it matches a pattern (case-insensitive glob); with no
    pattern set, any recipient outside production, none in production."""
    if not patterns:
        return not production
    return any(fnmatch.fnmatchcase(to.lower(), p.lower()) for p in patterns)


def router(
    previewer: Previewer,
    senders: Mapping[str, ChannelSender],
    test_recipients: list[str],
    production: bool,
) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["content"])

    @api.post(
        "/preview",
        operation_id="previewMessage",
        summary="Render a message without sending it",
        description="A template on a channel in a locale, with a customer's real profile "
        "(`customer_id`), inline `data` over the template's sample data, or its sample data "
        "alone. Nothing is written and no provider is called.",
        dependencies=[require_scope("read")],
        responses=problems(404, 422),
    )
    async def preview(req: Annotated[PreviewRequest, Body()]) -> Preview:
        return (await previewer.preview(req))[0]

    @api.post(
        "/test-sends",
        operation_id="sendTestMessage",
        summary="Send a preview to yourself through the real provider",
        description="Renders as `POST /v1/preview` and sends it through the channel's provider "
        "chain to `to`, marked as a test (`[Test]` subject, `test` tag). No delivery is "
        "recorded: never counted in reports, caps or attribution; no case is touched. `to` "
        "must match `dispatcher.test_recipients` (403 otherwise). A provider failure is 502.",
        dependencies=[require_scope("operate")],
        responses=problems(403, 404, 422, 502),
    )
    async def test_send(req: Annotated[TestSendRequest, Body()]) -> TestSendResult:
        if not allowed_recipient(req.to, test_recipients, production):
            TEST_SENDS.labels(req.channel[:40], "refused").inc()
            raise Problem(
                403,
                "Recipient not allowed",
                f"{req.to!r} matches no pattern of dispatcher.test_recipients",
                type="/problems/forbidden-recipient",
                errors=[{"field": "to", "reason": "not an allowed test recipient"}],
            )
        shown, rendered, context = await previewer.preview(req)
        key = f"test-{uuid.uuid4().hex}"
        subject = f"[Test] {rendered.subject}" if rendered.subject is not None else None
        content = RenderedMessage(
            template=rendered.template,
            channel=rendered.channel,
            locale=rendered.locale,
            subject=subject,
            text=rendered.text,
            html=rendered.html,
        )
        crm_task = None
        if req.channel == "crm":
            crm_task = CrmTaskDetails(
                owner_id=req.to, due_at=previewer.clock.now() + timedelta(hours=24)
            )
        message = OutboundMessage(
            idempotency_key=key,
            channel=rendered.channel,
            to="" if req.channel == "crm" else req.to,
            content=content,
            tags={"test": "true", "template": req.template},
            unsubscribe_url=context.get("unsubscribe_url"),
            crm_task=crm_task,
        )
        try:
            result = await senders[req.channel].send(message)
        except SendError as exc:
            TEST_SENDS.labels(req.channel, "failed").inc()
            raise Problem(
                502,
                "The provider did not accept the test",
                str(exc)[:500],
                type="/problems/provider",
            ) from None
        except KeyError:
            raise invalid_field("channel", f"no provider serves {req.channel!r}") from None
        TEST_SENDS.labels(req.channel, "sent").inc()
        return TestSendResult(
            preview=shown,
            provider=result.provider,
            provider_message_id=result.provider_message_id,
            idempotency_key=key,
        )

    return api
