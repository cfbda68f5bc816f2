"""From a delivery's dispatch command to a rendered ``OutboundMessage``: the template context,
the recipient, the unsubscribe link (RFC 8058) and the non-PII tags. Pure apart from the
renderer; a missing field or address is a permanent error naming it."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import get_currency_precision

from services.dispatcher.errors import PermanentSendError, UnknownChannelError
from services.dispatcher.model import parse_time
from services.dispatcher.providers.base import CrmTaskDetails, OutboundMessage
from services.dispatcher.rendering import Channel, RenderedMessage, TemplateRenderer
from services.dispatcher.signatures import UnsubscribeTokens
from shared import channels

_ADDRESS_NAMES: Final = {"email": "email address", "phone": "phone number"}
_E164_LIKE: Final = re.compile(r"\+[0-9 ()-]{6,}")
TAGS: Final = ("customer_id", "case_id", "step_key", "step_id", "template", "variant")


@dataclass(frozen=True, slots=True)
class Profile:
    """What the database knows beside the command (scheduler's customer view, the case)."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None
    timezone: str | None = None
    mrr_minor: int | None = None
    currency: str | None = None
    segment: Mapping[str, Any] | None = None


class Composer:
    def __init__(
        self,
        renderer: TemplateRenderer,
        tokens: UnsubscribeTokens,
        *,
        public_base_url: str,
        product: str,
        cta_url: str,
        highlights: Sequence[str] = (),
        unsubscribe_mailto: str | None = None,
        crm_default_owner: str | None = None,
        crm_task_due: timedelta = timedelta(hours=24),
        status_api_base_url: str | None = None,
    ) -> None:
        self.renderer = renderer
        self.tokens = tokens
        self.public_base_url = public_base_url.rstrip("/")
        self.product = product
        self.cta_url = cta_url
        self.highlights = list(highlights)
        self.unsubscribe_mailto = unsubscribe_mailto
        self.crm_default_owner = crm_default_owner
        self.crm_task_due = crm_task_due
        self.status_api_base_url = (status_api_base_url or "").rstrip("/") or None
        self._ctas: dict[tuple[str, str, str], str] = {}
        """The call-to-action link per (template, variant, channel): built once each."""

    def unsubscribe_url(self, customer_id: str, channel: str) -> str:
        return f"{self.public_base_url}/u/{self.tokens.issue(customer_id, channel)}"

    def context(self, command: Mapping[str, Any], profile: Profile, channel: str) -> dict[str, Any]:
        """The personalisation fields; a field with no value is left out, so the renderer
        names it if the template needs it."""
        customer = _customer(command)
        ctx: dict[str, Any] = {
            "name": customer.get("name") or profile.name,
            "product": self.product,
            "offer": command.get("offer"),
            "valid_until": _local_date(
                command.get("valid_until"), customer.get("timezone") or profile.timezone
            ),
            "new_features": list(command.get("features") or []) or list(self.highlights),
            "cta_url": self._cta(command, channel),
            "churn_reason": command.get("reason"),
            "segment": _segment_text(profile.segment),
            # who they are to us (a trial that ended is never told "you decided to leave")
            "lifecycle": (profile.segment or {}).get("lifecycle"),
            "competitor": command.get("competitor"),
        }
        if channels.spec(channel).unsubscribe_link:
            ctx["unsubscribe_url"] = self.unsubscribe_url(str(customer["id"]), channel)
        if profile.mrr_minor is not None and profile.currency:
            ctx["mrr"] = _major_units(profile.mrr_minor, profile.currency)
            ctx["currency"] = profile.currency.upper()
        if channel == Channel.CRM:  # a salesperson needs to know whom to call and why
            ctx |= self._crm_context(customer, profile)
        return {k: v for k, v in ctx.items() if v is not None and v != []}

    def _crm_context(self, customer: Mapping[str, Any], profile: Profile) -> dict[str, Any]:
        customer_id = str(customer.get("id") or "") or None
        tenure = (profile.segment or {}).get("tenure")
        return {
            "customer_id": customer_id,
            "email": customer.get("email") or profile.email,
            "phone": customer.get("phone") or profile.phone,
            "tenure": str(tenure).replace("_", " ") if tenure and tenure != "unknown" else None,
            "status_url": (
                f"{self.status_api_base_url}/v1/customers/{quote(customer_id, safe='')}/winback"
                if self.status_api_base_url and customer_id
                else None
            ),
        }

    def compose(
        self, command: Mapping[str, Any], profile: Profile, now: datetime
    ) -> OutboundMessage:
        """Render the message; raises ``TemplateError``/``PermanentSendError`` naming the gap
        (``UnknownChannelError`` for a channel the registry does not know)."""
        channel = str(command["channel"])
        try:
            spec = channels.spec(channel)
        except channels.UnknownChannelError:
            raise UnknownChannelError(channel) from None
        customer = _customer(command)
        locale = customer.get("locale")
        context = self.context(command, profile, channel)
        content = self.renderer.render(str(command["template"]), channel, locale, context)
        crm_task = None
        field = spec.address_field
        if channel == Channel.CRM:  # a task for the account owner, not a message to an address
            owner = customer.get("crm_owner") or self.crm_default_owner
            owner = _required(owner, "CRM owner (crm_owner) for the task")
            crm_task = CrmTaskDetails(
                owner_id=owner,
                due_at=now + self.crm_task_due,
                customer_id=context.get("customer_id"),
                case_id=str(command.get("case_id") or "") or None,
                email=context.get("email"),
                name=context.get("name"),
                phone=context.get("phone"),
                rerender=functools.partial(
                    self._rerender, str(command["template"]), locale, context
                ),
            )
            # the CRM's contact id when the profile carries it; else the adapter finds it
            to = str(customer.get("crm_contact_id") or "")
        elif field is not None:
            on_file = getattr(profile, field, None)
            to = _required(customer.get(field) or on_file, _ADDRESS_NAMES.get(field, field))
        else:  # the receiver knows the customer by id
            to = str(customer["id"])
        return OutboundMessage(
            idempotency_key=str(command["idempotency_key"]),
            channel=Channel(channel),
            to=to,
            content=content,
            tags=_tags(command),
            unsubscribe_url=context.get("unsubscribe_url"),
            unsubscribe_mailto=self.unsubscribe_mailto if channel == "email" else None,
            crm_task=crm_task,
        )

    def _rerender(
        self, template: str, locale: Any, context: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> RenderedMessage:
        """The CRM task again with fields known only at send time (``sent_so_far``)."""
        return self.renderer.render(template, Channel.CRM, locale, {**context, **extra})

    def _cta(self, command: Mapping[str, Any], channel: str) -> str:
        key = (str(command.get("template") or ""), str(command.get("variant") or ""), channel)
        url = self._ctas.get(key)
        if url is None:
            if len(self._ctas) >= 4096:  # the names come from commands: keep it bounded
                self._ctas.clear()
            url = self._ctas[key] = self._cta_uncached(command, channel)
        return url

    def _cta_uncached(self, command: Mapping[str, Any], channel: str) -> str:
        parts = urlsplit(self.cta_url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        query += [
            ("utm_source", "winback"),
            ("utm_medium", channel),
            ("utm_campaign", str(command.get("template") or "")),
        ]
        if command.get("variant"):
            query.append(("utm_content", str(command["variant"])))
        return urlunsplit(parts._replace(query=urlencode(query)))


def _customer(command: Mapping[str, Any]) -> Mapping[str, Any]:
    customer = command.get("customer")
    return customer if isinstance(customer, Mapping) else {}


def _required(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PermanentSendError(f"the customer has no {what}", error_code="no_address")
    return value.strip()


def _local_date(value: Any, timezone: Any) -> date | None:
    when = parse_time(value)
    if when is None:
        return None
    try:
        zone = ZoneInfo(timezone) if isinstance(timezone, str) and timezone else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    return when.astimezone(zone).date() if zone is not None else when.date()


def _major_units(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-_precision(currency.upper()))


@functools.lru_cache(maxsize=512)
def _precision(currency: str) -> int:
    """Digits after the decimal point of ``currency`` (Babel's table, looked up once)."""
    return int(get_currency_precision(currency))


def _segment_text(segment: Mapping[str, Any] | None) -> str | None:
    if not segment:
        return None
    labels = segment.get("labels") or []
    if labels:
        return ", ".join(str(label).replace("_", " ") for label in labels)
    parts = [segment.get("lifecycle"), segment.get("reason"), segment.get("value_tier")]
    text = ", ".join(str(p).replace("_", " ") for p in parts if p)
    return text or None


def _tags(command: Mapping[str, Any]) -> dict[str, str]:
    """Identifiers for provider metadata: never an address (values with @ or like a phone
    number are left out)."""
    values = {
        "customer_id": _customer(command).get("id"),
        "case_id": command.get("case_id"),
        "step_key": command.get("step_key"),
        "step_id": command.get("step_id"),
        "template": command.get("template"),
        "variant": command.get("variant"),
    }
    tags = {}
    for key, value in values.items():
        if value is None:
            continue
        text = str(value)
        if "@" in text or _E164_LIKE.fullmatch(text) or not text.isprintable():
            continue  # an address, or a value that would break a header line
        tags[key] = text
    return tags
