"""Render a step's message from sandboxed Jinja2 templates, per channel and locale.

Layout of a content directory (``shared/content`` as shipped; one directory per locale, one
per channel inside it)::

    {locale}/email/{name}.subject.txt   subject line (plain text)
    {locale}/email/{name}.html          HTML part (autoescaped), extends {locale}/email/_base.html
    {locale}/email/{name}.txt           plain-text part, extends {locale}/email/_base.txt
    {locale}/sms/{name}.txt             SMS body
    {locale}/crm/{name}.subject.txt, {name}.body.txt   CRM task for a person to act on
    {locale}/offers.json                 offer code → the offer in words, in that language

Every template name and channel has a ``TemplateSpec`` naming the fields it needs
(``required``) and may use (``optional``), from the content's ``catalog.yaml``
(:mod:`shared.content`; ``TEMPLATE_SPECS`` for the shipped content). A message is rendered
only when every required field is present and non-blank, so no customer ever gets "Hi ," or
an empty offer: a missing template or field is a ``TemplateError`` (a ``PermanentSendError``).
``check_templates`` runs the same checks, plus trial renders, for every locale at start-up.

What we know about the customer (``OPTIONAL_PROFILE_FIELDS``: name, churn reason, segment, MRR)
is never required: a profile may lack any of it, and the message must still go. Templates use
those fields only under ``{% if name is defined %}`` with a wording that reads naturally without
them ("Hi there," instead of "Hi Aino,"; a CRM task leaves out the MRR line). ``TemplateSpec``
refuses to require them, and the start-up check renders each template without each optional
field. Only what a message cannot do without is required: the product, the links, and the
content a template is about (the features of ``feature_built``, the offer of
``special_offer``); the recipient's address is checked by the composer.

Locale fallback: ``fi-FI`` → ``fi`` → ``en``; all parts of one message come from one locale.
Dates and money are formatted with babel in the customer's locale when its language is the
template's language (``en-GB`` gets "1 March 2026"), otherwise in the template's language.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit

from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import (
    BaseLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    pass_context,
    select_autoescape,
)
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.dispatcher.errors import TemplateError
from shared import content
from shared.channels import Channel as Channel  # re-exported: the registry owns it
from shared.content import SHIPPED_CONTENT_DIR, Catalog
from shared.templates_catalog import SHIPPED

TEMPLATES_DIR: Final = SHIPPED_CONTENT_DIR
DEFAULT_LOCALE: Final = "en"
SHIPPED_LOCALES: Final = ("en", "fi", "da", "ms")


def _parts(channel: Channel) -> tuple[str, ...]:
    """Which template files make up a message on ``channel`` (from the channel registry)."""
    return channel.spec.template_parts


def _channel_dir(channel: Channel) -> str:
    return channel.spec.template_dir


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A rendered message. ``locale`` is the template locale actually used (after fallback).

    ``subject`` is the email subject or CRM task subject (``None`` for SMS); ``text`` the plain
    text part, SMS body or CRM task body; ``html`` the HTML part (email and webhook only).
    """

    template: str
    channel: Channel
    locale: str
    subject: str | None
    text: str
    html: str | None


@dataclass(frozen=True, slots=True)
class Brand:
    """Who sends: shown in every email footer (CAN-SPAM wants the postal address)."""

    company_name: str
    postal_address: str

    def __post_init__(self) -> None:
        if not self.company_name.strip() or not self.postal_address.strip():
            raise ValueError("Brand needs a company name and a postal address")


class MessageContext(TypedDict, total=False):
    """The personalisation fields templates may use; which ones a template needs is in its spec.

    ``offer`` is an offer code from the playbooks (``discount_50pct_3mo``), put into words from
    the locale's ``offers.json``, or else a short phrase already in the customer's language.
    ``mrr`` with ``currency`` (ISO 4217) and ``churn_reason``/``segment`` are for CRM tasks.
    """

    name: str
    product: str
    offer: str
    valid_until: date
    new_features: Sequence[str]
    cta_url: str
    unsubscribe_url: str
    churn_reason: str
    segment: str
    mrr: Decimal | int
    currency: str
    lifecycle: str
    # CRM tasks: whom to call, what they have had from us, their win-back status
    customer_id: str
    email: str
    phone: str
    tenure: str
    sent_so_far: Sequence[str]
    status_url: str
    # competitor_news: the competitor the customer left for
    competitor: str


OPTIONAL_PROFILE_FIELDS: Final = content.OPTIONAL_PROFILE_FIELDS
"""What we know about the customer, which a profile may lack: templates may use these fields
(guarded, with a wording that reads well without them) but never require them."""


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """The fields one template needs on one channel (``required``) and may use (``optional``).

    A field of ``OPTIONAL_PROFILE_FIELDS`` cannot be required: a customer without a name still
    gets the message, greeted without one."""

    required: frozenset[str]
    optional: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        profile = sorted(self.required & OPTIONAL_PROFILE_FIELDS)
        if profile:
            raise ValueError(
                f"optional profile field(s) {', '.join(profile)} cannot be required: "
                "list them in optional and guard them in the template"
            )


def specs_from(catalog: Catalog) -> Mapping[tuple[str, Channel], TemplateSpec]:
    """The spec of every (template, channel) of a content catalogue."""
    return {
        (name, Channel(channel)): TemplateSpec(fields.required, fields.optional)
        for name, template in catalog.templates.items()
        for channel, fields in template.fields.items()
    }


def samples_from(catalog: Catalog) -> Mapping[str, Mapping[str, Any]]:
    """Each template's sample data (the catalogue's, with the template's own over it)."""
    return {name: template.sample for name, template in catalog.templates.items()}


TEMPLATE_SPECS: Final[Mapping[tuple[str, Channel], TemplateSpec]] = specs_from(SHIPPED)
"""Every (template name, channel) of the shipped content, with the fields it needs (from
``shared/content/catalog.yaml``)."""

# Names the renderer provides itself: the brand, and the babel locale used for formatting.
_PROVIDED: Final = frozenset({"company_name", "postal_address", "locale"})
_URL_FIELDS: Final = frozenset(n for n, kind in content.FIELDS.items() if kind == "url")
_BLANK_ELEMENT: Final = re.compile(r"<(p|li|a|strong|em|h1|h2|h3|td|ul)\b[^>]*>\s*</\1>")
_MANY_BLANK_LINES: Final = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_OFFER_CODE: Final = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)+")
OFFERS_FILE: Final = "offers.json"

SAMPLE_CONTEXT: Final[MessageContext] = {
    "name": "Sample",
    "product": "Sample Product",
    "offer": "Sample offer",
    "valid_until": date(2030, 12, 31),
    "new_features": ["Sample feature one", "Sample feature two"],
    "cta_url": "https://example.invalid/next",
    "unsubscribe_url": "https://example.invalid/u/token",
    "churn_reason": "too_expensive",
    "segment": "high_value",
    "mrr": Decimal("99.00"),
    "currency": "EUR",
    "lifecycle": "expired_trial",
    "customer_id": "cus_sample",
    "email": "sample@example.invalid",
    "phone": "+358401234567",
    "tenure": "long term",
    "sent_so_far": ["email: we_miss_you (2030-11-02)"],
    "status_url": "https://example.invalid/v1/customers/cus_sample/winback",
    "competitor": "Sample Rival",
}
"""A complete context used by ``check_templates`` for its trial renders."""


_SPACE: Final = re.compile(r"\s")  # the same characters as str.isspace
# Unicode category Cc (C0 and C1 controls and DEL) except the whitespace that ``split`` folds.
_CONTROL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _clean(value: object) -> object:
    """Collapse runs of whitespace (newlines included) to one space and drop control characters,
    so a field can neither break a text layout nor look filled while printing nothing."""
    if isinstance(value, str):
        return " ".join(_CONTROL.sub("", value).split())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_clean(item) for item in value]
    return value


def _is_blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, Sequence):
        return len(value) == 0
    return False


def _field_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot fill field ``name``, or ``None`` when it can."""
    if _is_blank(value):
        return "blank"
    if name == "valid_until":
        return None if isinstance(value, date) else "not a date"
    if name == "mrr":
        ok = isinstance(value, Decimal | int) and not isinstance(value, bool)
        return None if ok else "not a Decimal or int"
    if content.FIELDS.get(name) == "list":
        if isinstance(value, str) or not isinstance(value, Sequence):
            return "not a list of strings"
        if any(not isinstance(item, str) or not item.strip() for item in value):
            return "has a blank or non-string item"
        return None
    if not isinstance(value, str):
        return "not a string"
    if name in _URL_FIELDS and (
        urlsplit(value).scheme not in {"https", "http"} or _SPACE.search(value) is not None
    ):
        return "not an http(s) URL"
    if name == "currency" and not re.fullmatch(r"[A-Za-z]{3}", value):
        return "not an ISO 4217 code"
    return None


@dataclass(frozen=True, slots=True)
class _ResolvedLocale:
    template_locale: str
    babel_locale: str


@pass_context
def _format_date_filter(ctx: Context, value: date, fmt: str = "long") -> str:
    return format_date(value, format=fmt, locale=str(ctx["locale"]))


@pass_context
def _format_money_filter(ctx: Context, value: Decimal | int, currency: str) -> str:
    return format_currency(value, currency.upper(), locale=str(ctx["locale"]))


class ContentLoader(BaseLoader):
    """The content directory's files, and the parts of the catalogue's template variants
    (``like: <template>`` in catalog.yaml): a variant's part is its base template's part,
    with the variant's subject line in its place, or with the variant's blocks overriding the
    base's (``{% extends <base part> %}{% block … %}``). Autoescaping follows the part's file
    name as for files (``.html`` escaped, ``.txt`` not)."""

    def __init__(self, directory: Path, variants: Mapping[str, content.Template]) -> None:
        self._files = FileSystemLoader(directory)
        self._directory = directory
        self._variants = variants

    @property
    def variants(self) -> Mapping[str, content.Template]:
        """The catalogue's template variants this loader builds, by name."""
        return self._variants

    def base_of(self, name: str) -> str | None:
        """The base template's file of a variant's part ``name`` (``None``: not a variant)."""
        split = _split_name(name)
        if split is None or split[2] not in self._variants:
            return None
        locale, folder, template, part = split
        return f"{locale}/{folder}/{self._variants[template].like}.{part}"

    def exists(self, name: str) -> bool:
        base = self.base_of(name)
        return (self._directory / (base or name)).is_file()

    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        base = self.base_of(template)
        if base is None:
            return self._files.get_source(environment, template)
        if not (self._directory / base).is_file():
            raise TemplateNotFound(template)
        locale, _, name, part = _split_name(template) or ("", "", "", "")
        variant = self._variants[name]
        if part.startswith("subject") and locale in variant.subject:
            return variant.subject[locale], None, lambda: True
        blocks = {b: texts[locale] for b, texts in variant.blocks.items() if locale in texts}
        source = f'{{% extends "{base}" %}}'
        if not part.startswith("subject"):
            source += "".join(f"{{% block {b} %}}{t}{{% endblock %}}" for b, t in blocks.items())
        return source, None, lambda: True


def _split_name(name: str) -> tuple[str, str, str, str] | None:
    """``en/email/we_miss_you.subject.txt`` → (en, email, we_miss_you, subject.txt)."""
    parts = name.split("/")
    if len(parts) != 3:
        return None
    template, _, part = parts[2].partition(".")
    return (parts[0], parts[1], template, part) if part else None


def variants_from(catalog: Catalog) -> Mapping[str, content.Template]:
    """The catalogue's template variants (``like:``), by name."""
    return {name: t for name, t in catalog.templates.items() if t.like is not None}


def block_names(env: Environment, source: str) -> set[str]:
    """The blocks a template source defines."""
    return {block.name for block in env.parse(source).find_all(nodes.Block)}


class TemplateRenderer:
    """Renders messages from a template directory in a sandboxed, strict Jinja2 environment.

    HTML templates (``.html``) are autoescaped; text templates (``.txt``) are not, as their
    output is never interpreted as HTML. Templates are compiled once and cached.
    """

    def __init__(
        self,
        brand: Brand,
        templates_dir: Path = TEMPLATES_DIR,
        *,
        specs: Mapping[tuple[str, Channel], TemplateSpec] = TEMPLATE_SPECS,
        samples: Mapping[str, Mapping[str, Any]] | None = None,
        variants: Mapping[str, content.Template] | None = None,
    ) -> None:
        self._brand = brand
        self._specs = specs
        self._samples: Mapping[str, Mapping[str, Any]] = samples or {}
        self._loader = ContentLoader(
            templates_dir, variants_from(SHIPPED) if variants is None else variants
        )
        """Template name → its sample data (the content catalogue's) for the start-up check."""
        self._dir = templates_dir
        self._env = ImmutableSandboxedEnvironment(
            loader=self._loader,
            undefined=StrictUndefined,
            autoescape=select_autoescape(
                enabled_extensions=("html",), disabled_extensions=("txt",), default=True
            ),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        self._env.filters["format_date"] = _format_date_filter
        self._env.filters["format_money"] = _format_money_filter
        self._locales = tuple(
            sorted(p.name for p in templates_dir.iterdir() if p.is_dir() and p.name[0] != "_")
        )
        self._offers = {
            locale: _load_offers(templates_dir / locale / OFFERS_FILE) for locale in self._locales
        }
        self._offer_codes = frozenset(code for table in self._offers.values() for code in table)
        self._parts_present: dict[tuple[str, str, Channel], bool] = {}
        # per message these would otherwise parse the locale (Babel) and look the compiled
        # template up through Jinja's locked LRU cache; neither result changes while we run
        self._resolved: dict[tuple[str, Channel, str | None], _ResolvedLocale] = {}
        self._templates: dict[str, Template] = {}
        self._globals: dict[str, dict[str, Any]] = {}

    @property
    def locales(self) -> tuple[str, ...]:
        """The template locales present in the template directory."""
        return self._locales

    @property
    def offer_codes(self) -> frozenset[str]:
        """Offer codes the templates can put into words (from every locale's offers.json)."""
        return self._offer_codes

    def render(
        self, template: str, channel: Channel | str, locale: str | None, context: Mapping[str, Any]
    ) -> RenderedMessage:
        """Render ``template`` for ``channel`` in the best locale for ``locale``.

        Raises ``TemplateError`` when there is no such template, when a required field is
        missing or blank or of the wrong type, or when the output would contain a blank hole.
        Fields the template does not declare are ignored.
        """
        chan = self._channel(template, channel)
        spec = self._spec(template, chan)
        values = self._values(template, chan, spec, context)
        resolved = self._resolve_locale(template, chan, locale)
        self._localise_offer(template, chan, values, resolved.template_locale)
        return self._render(template, chan, spec, resolved, values)

    def check_templates(self, names: Iterable[str]) -> None:
        """Start-up check: every named template renders on every channel and locale it has.

        For each name: a spec exists; the default locale has every part; no locale has only
        some of the parts; every file parses; the templates use no field outside their spec;
        and trial renders succeed with a complete sample context, with the required fields
        only, and with each optional field left out in turn.
        Raises one ``TemplateError`` listing every problem found.
        """
        problems = self.template_problems(names)
        if problems:
            raise TemplateError("template check failed: " + "; ".join(problems))

    def template_problems(self, names: Iterable[str]) -> list[str]:
        """What ``check_templates`` finds, one problem a line (``winback validate``)."""
        problems = self._check_offers()
        for name in dict.fromkeys(names):
            channels = [chan for (n, chan) in self._specs if n == name]
            if not channels:
                problems.append(f"{name}: no template spec for this name on any channel")
                continue
            for chan in channels:
                problems.extend(self._check_one(name, chan))
            problems.extend(self._check_variant_blocks(name, channels))
        return problems

    def _check_variant_blocks(self, name: str, channels: list[Channel]) -> list[str]:
        """A variant's block overrides name blocks its base template has (a misspelt block
        would otherwise be ignored without a word)."""
        variant = self._loader.variants.get(name)
        if variant is None or not variant.blocks:
            return []
        problems = []
        for chan in channels:
            for locale in self._locales:
                for file in self._names(locale, name, chan):
                    base = self._loader.base_of(file)
                    if base is None or file.split(".", 1)[1].startswith("subject"):
                        continue
                    if not (self._dir / base).is_file():
                        continue
                    known = block_names(self._env, (self._dir / base).read_text("utf-8"))
                    parent = base
                    while True:  # blocks of the templates it extends count too
                        extends = next(
                            self._env.parse((self._dir / parent).read_text("utf-8")).find_all(
                                nodes.Extends
                            ),
                            None,
                        )
                        if extends is None or not isinstance(extends.template, nodes.Const):
                            break
                        parent = str(extends.template.value)
                        known |= block_names(self._env, (self._dir / parent).read_text("utf-8"))
                    for block, texts in variant.blocks.items():
                        if locale in texts and block not in known:
                            problems.append(
                                f"{name} ({chan.value}): locale {locale!r}: block {block!r} "
                                f"is not a block of {base}"
                            )
        return problems

    # --- internals -----------------------------------------------------------------------

    def _localise_offer(
        self, template: str, channel: Channel, values: dict[str, object], locale: str
    ) -> None:
        """Replace an offer code by its wording in ``locale`` (English if untranslated)."""
        offer = values.get("offer")
        if not isinstance(offer, str):
            return
        if offer in self._offer_codes:
            text = self._offers.get(locale, {}).get(offer) or self._offers.get(
                DEFAULT_LOCALE, {}
            ).get(offer)
        elif _OFFER_CODE.fullmatch(offer):
            text = None
        else:
            return  # free text, already in the customer's language
        if text is None:
            raise TemplateError(
                f"offer code {offer!r} has no wording in {locale!r} or {DEFAULT_LOCALE!r}",
                template=template,
                channel=channel.value,
                missing_fields=["offer"],
            )
        values["offer"] = text

    def _check_offers(self) -> list[str]:
        reference = set(self._offers.get(DEFAULT_LOCALE, {}))
        problems = []
        for locale, table in self._offers.items():
            missing = sorted(reference - set(table))
            if missing:
                problems.append(f"{OFFERS_FILE}: locale {locale!r} lacks {', '.join(missing)}")
        return problems

    def _channel(self, template: str, channel: Channel | str) -> Channel:
        try:
            return Channel(channel)
        except ValueError:
            raise TemplateError(
                f"unknown channel {channel!r} for template {template!r}",
                template=template,
                channel=str(channel),
            ) from None

    def _spec(self, template: str, channel: Channel) -> TemplateSpec:
        spec = self._specs.get((template, channel))
        if spec is None:
            raise TemplateError(
                f"no template {template!r} for channel {channel.value!r}",
                template=template,
                channel=channel.value,
            )
        return spec

    def _values(
        self, template: str, channel: Channel, spec: TemplateSpec, context: Mapping[str, Any]
    ) -> dict[str, object]:
        missing = sorted(f for f in spec.required if f not in context)
        if missing:
            raise TemplateError(
                f"template {template!r} ({channel.value}) is missing field(s): "
                + ", ".join(missing),
                template=template,
                channel=channel.value,
                missing_fields=missing,
            )
        bad: dict[str, str] = {}
        values: dict[str, object] = {}
        for name in spec.required | spec.optional:
            if name not in context:
                continue
            value = context[name] if name in _URL_FIELDS else _clean(context[name])
            if name in spec.optional and _is_blank(value):
                continue  # an absent optional field: the template leaves that part out
            problem = _field_problem(name, value)
            if problem is not None:
                bad[name] = problem
            else:
                values[name] = value
        if bad:
            described = ", ".join(f"{k} ({v})" for k, v in sorted(bad.items()))
            raise TemplateError(
                f"template {template!r} ({channel.value}) has unusable field(s): {described}",
                template=template,
                channel=channel.value,
                missing_fields=sorted(bad),
            )
        return values

    def _names(self, locale: str, template: str, channel: Channel) -> list[str]:
        return [f"{locale}/{_channel_dir(channel)}/{template}.{p}" for p in _parts(channel)]

    def _has_all_parts(self, locale: str, template: str, channel: Channel) -> bool:
        key = (locale, template, channel)
        found = self._parts_present.get(key)
        if found is None:  # the files do not change while we run (no auto-reload either)
            found = all(self._loader.exists(n) for n in self._names(locale, template, channel))
            self._parts_present[key] = found
        return found

    def _resolve_locale(
        self, template: str, channel: Channel, requested: str | None
    ) -> _ResolvedLocale:
        key = (template, channel, requested)
        resolved = self._resolved.get(key)
        if resolved is None:
            resolved = self._resolve_locale_uncached(template, channel, requested)
            if len(self._resolved) >= 4096:  # requested locales come from customer data
                self._resolved.clear()
            self._resolved[key] = resolved
        return resolved

    def _template(self, name: str) -> Template:
        found = self._templates.get(name)
        if found is None:
            found = self._templates[name] = self._env.get_template(name)
            self._globals[name] = dict(found.globals)
        return found

    def _render_one(self, name: str, variables: Mapping[str, object]) -> str:
        """``Template.render(variables)`` with the template's globals merged in once: its
        own ``new_context`` copies them out of a ``ChainMap`` on every call (about a sixth of
        the time to render a message); the output and the exceptions are the same."""
        template = self._template(name)
        context = template.new_context({**self._globals[name], **variables}, shared=True)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()

    def _resolve_locale_uncached(
        self, template: str, channel: Channel, requested: str | None
    ) -> _ResolvedLocale:
        parsed = _parse_locale(requested)
        candidates: list[str] = []
        if parsed is not None:
            if parsed.territory:
                candidates.append(f"{parsed.language}-{parsed.territory}")
            candidates.append(parsed.language)
        candidates.append(DEFAULT_LOCALE)
        for candidate in candidates:
            if candidate in self._locales and self._has_all_parts(candidate, template, channel):
                language = candidate.split("-")[0]
                same_language = parsed is not None and parsed.language == language
                babel_locale = str(parsed) if same_language and parsed else language
                return _ResolvedLocale(candidate, babel_locale)
        raise TemplateError(
            f"no template {template!r} for channel {channel.value!r} in locales "
            + " → ".join(dict.fromkeys(candidates)),
            template=template,
            channel=channel.value,
        )

    def _render(
        self,
        template: str,
        channel: Channel,
        spec: TemplateSpec,
        resolved: _ResolvedLocale,
        values: Mapping[str, object],
    ) -> RenderedMessage:
        variables: dict[str, object] = {
            **values,
            "company_name": self._brand.company_name,
            "postal_address": self._brand.postal_address,
            "locale": resolved.babel_locale,
        }
        parts: dict[str, str] = {}
        for part, name in zip(
            _parts(channel), self._names(resolved.template_locale, template, channel), strict=True
        ):
            try:
                out = self._render_one(name, variables)
            except UndefinedError as exc:
                raise TemplateError(
                    f"template {name!r} uses a field its spec does not provide: {exc.message}",
                    template=template,
                    channel=channel.value,
                ) from exc
            except (TemplateNotFound, TemplateSyntaxError, SecurityError) as exc:
                raise TemplateError(
                    f"template {name!r} cannot be rendered: {exc}",
                    template=template,
                    channel=channel.value,
                ) from exc
            parts[part] = self._tidy(part, out, name, template, channel)
        subject = parts.get("subject.txt")
        text = parts.get("txt") or parts.get("body.txt")
        if text is None:  # pragma: no cover - every channel has a text part
            raise TemplateError(f"channel {channel.value} has no text part", template=template)
        return RenderedMessage(
            template=template,
            channel=channel,
            locale=resolved.template_locale,
            subject=subject,
            text=text,
            html=parts.get("html"),
        )

    def _tidy(self, part: str, out: str, name: str, template: str, channel: Channel) -> str:
        if part.startswith("subject"):
            out = " ".join(out.split())
        elif part == "html":
            out = out.strip() + "\n"
            hole = _BLANK_ELEMENT.search(out)
            if hole is not None:
                raise TemplateError(
                    f"template {name!r} rendered an empty <{hole.group(1)}> element",
                    template=template,
                    channel=channel.value,
                )
        else:
            lines = "\n".join(line.rstrip() for line in out.strip().splitlines())
            out = _MANY_BLANK_LINES.sub("\n\n", lines) + "\n"
            if channel == Channel.SMS:
                out = out.strip()
        if not out.strip():
            raise TemplateError(
                f"template {name!r} rendered nothing", template=template, channel=channel.value
            )
        return out

    def _check_one(self, name: str, channel: Channel) -> list[str]:
        spec = self._specs[(name, channel)]
        label = f"{name} ({channel.value})"
        problems: list[str] = []
        if not self._has_all_parts(DEFAULT_LOCALE, name, channel):
            problems.append(f"{label}: default locale {DEFAULT_LOCALE!r} lacks a part")
        allowed = spec.required | spec.optional | _PROVIDED
        for locale in self._locales:
            files = self._names(locale, name, channel)
            present = [f for f in files if self._loader.exists(f)]
            if not present:
                continue  # not translated: falls back
            if len(present) != len(files):
                missing = sorted(set(files) - set(present))
                problems.append(f"{label}: locale {locale!r} lacks {', '.join(missing)}")
                continue
            try:
                used = set().union(*(self._variables(f) for f in files))
            except (TemplateSyntaxError, TemplateNotFound) as exc:
                problems.append(f"{label}: locale {locale!r} does not parse: {exc}")
                continue
            unknown = sorted(used - allowed)
            if unknown:
                problems.append(
                    f"{label}: locale {locale!r} uses undeclared field(s) {', '.join(unknown)}"
                )
                continue
            resolved = _ResolvedLocale(locale, locale.replace("-", "_"))
            complete = spec.required | spec.optional
            base = {**SAMPLE_CONTEXT, **self._samples.get(name, {})}
            unsampled = sorted(complete - set(base))
            if unsampled:
                problems.append(
                    f"{label}: no sample value for {', '.join(unsampled)} (catalog.yaml sample)"
                )
                break
            samples = [_sample(base, complete), _sample(base, spec.required)]
            samples += [_sample(base, complete - {f}) for f in sorted(spec.optional)]
            for sample in samples:
                try:
                    values = self._values(name, channel, spec, sample)
                    self._render(name, channel, spec, resolved, values)
                except TemplateError as exc:
                    problems.append(f"{label}: locale {locale!r}: {exc.reason}")
                    break
        return problems

    def _variables(self, name: str, seen: set[str] | None = None) -> set[str]:
        """Undeclared variables of ``name`` and of every template it extends or includes."""
        seen = set() if seen is None else seen
        if name in seen:
            return set()
        seen.add(name)
        loader = self._env.loader
        assert loader is not None
        source, _, _ = loader.get_source(self._env, name)
        ast = self._env.parse(source)
        found = set(meta.find_undeclared_variables(ast))
        for ref in meta.find_referenced_templates(ast):
            if ref is not None:
                found |= self._variables(ref, seen)
        return found


def _load_offers(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TemplateError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in table.items()
    ):
        raise TemplateError(f"{path} must map offer codes to non-blank phrases")
    return table


def _sample(sample: Mapping[str, object], fields: Iterable[str]) -> dict[str, object]:
    return {f: sample[f] for f in fields}


def _parse_locale(requested: str | None) -> Locale | None:
    if not requested or not requested.strip():
        return None
    try:
        return Locale.parse(requested.strip().replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return None
