"""Campaign content as data: the template catalogue and the offers, read from a content
directory (the shipped one, ``shared/content``, or the user's own: ``WINBACK_CONTENT_DIR``).

A content directory holds:

- ``catalog.yaml``: every template playbooks may name, the channels it ships on, the fields it
  needs and may use, and sample data for checks and previews;
- ``offers.yaml``: every offer, its kind and value, whether it is a discount, what it costs;
- ``{locale}/{channel dir}/{name}.{part}``: the message files (see
  ``services/dispatcher/rendering.py``), and ``{locale}/offers.json``: the offers in words.

A new template, offer or locale is a file: :func:`load_catalog` reads the two YAML files and
reports every problem as ``file:line: field: reason`` (:class:`ContentError`). Pure apart from
reading those two files; both services load it at start-up (the scheduler holds playbooks to
it, the dispatcher renders from it) and ``winback validate`` runs the same checks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from shared import channels
from shared.errors import ConfigError
from shared.yamlfile import FieldPath, Located, YamlFileError, line_of, parse, validation_problems

SHIPPED_CONTENT_DIR = Path(__file__).with_name("content")
"""The content shipped with winback (templates in four languages, the standard offers)."""
DEFAULT_LOCALE = "en"
"""The locale every template has (others fall back to it)."""
CATALOG_FILE = "catalog.yaml"
OFFERS_FILE = "offers.yaml"

FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "name": "text",
        "product": "text",
        "offer": "text",
        "valid_until": "date",
        "new_features": "list",
        "cta_url": "url",
        "unsubscribe_url": "url",
        "churn_reason": "text",
        "segment": "text",
        "mrr": "decimal",
        "currency": "text",
        "lifecycle": "text",
        # CRM tasks: whom to call and what they have had from us
        "customer_id": "text",
        "email": "text",
        "phone": "text",
        "tenure": "text",
        "sent_so_far": "list",
        "status_url": "url",
        # competitor_news: the competitor the customer left for (competitor.changed)
        "competitor": "text",
    }
)
"""The personalisation fields a template can use (the composer fills them), by kind."""
OPTIONAL_PROFILE_FIELDS = frozenset(
    {"name", "churn_reason", "segment", "mrr", "currency", "lifecycle"}
    | {"customer_id", "email", "phone", "tenure", "sent_so_far", "status_url"}
)
"""What we know about the customer, which a profile may lack: never required."""
DISCOUNT_KINDS = frozenset({"percent_off", "amount_off", "free_months"})


class ContentError(YamlFileError, ConfigError):
    """The content directory is invalid; the message lists ``file:line: field: reason``.
    A configuration error: a service started with it stops with exit code 2."""

    def __init__(self, problems: list[Located]) -> None:
        super().__init__(problems, what="content")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Fields(_Strict):
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


Localised = Annotated[
    dict[str, Annotated[str, Field(min_length=1, max_length=5000)]],
    BeforeValidator(lambda v: {DEFAULT_LOCALE: v} if isinstance(v, str) else v),
]
"""A text per locale (``{en: ..., fi: ...}``); a plain string is the default locale's."""


class _Template(_Strict):
    about: str | None = Field(default=None, min_length=1)
    channels: tuple[str, ...] | None = Field(default=None, min_length=1)
    required: tuple[str, ...] | None = None
    optional: tuple[str, ...] | None = None
    sample: dict[str, Any] = Field(default_factory=dict)
    like: str | None = None
    subject: Localised | None = None
    blocks: dict[str, Localised] = Field(default_factory=dict)
    # per-channel overrides of required/optional (the keys are channel names)
    model_config = ConfigDict(extra="allow", frozen=True)


class _CatalogFile(_Strict):
    channel_fields: dict[str, _Fields]
    sample: dict[str, Any]
    templates: dict[str, _Template] = Field(min_length=1)


OfferKind = Literal[
    "percent_off", "amount_off", "free_months", "trial_extension", "service", "guarantee"
]


class Offer(_Strict):
    """One offer a playbook step may carry."""

    kind: OfferKind
    discount: bool
    percent_off: int | None = Field(default=None, ge=1, le=100)
    amount_off_minor: int | None = Field(default=None, ge=1)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    duration_months: int | None = Field(default=None, ge=1, le=36)
    months: int | None = Field(default=None, ge=1, le=24)
    days: int | None = Field(default=None, ge=1, le=365)
    cost_minor: int | None = Field(default=None, ge=0)
    cost_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _consistent(self) -> Offer:
        needs: dict[str, tuple[str, ...]] = {
            "percent_off": ("percent_off", "duration_months"),
            "amount_off": ("amount_off_minor", "currency", "duration_months"),
            "free_months": ("months",),
            "trial_extension": ("days",),
        }
        missing = [f for f in needs.get(self.kind, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} offer needs {', '.join(missing)}")
        if self.discount != (self.kind in DISCOUNT_KINDS):
            word = "is" if self.kind in DISCOUNT_KINDS else "is not"
            raise ValueError(
                f"discount must be {self.kind in DISCOUNT_KINDS}: a {self.kind} {word} a discount"
            )
        if (self.cost_minor is None) != (self.cost_currency is None):
            raise ValueError("cost_minor and cost_currency go together")
        return self


class _OffersFile(_Strict):
    offers: dict[str, Offer] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class TemplateFields:
    """The fields one template needs (``required``) and may use (``optional``) on a channel."""

    required: frozenset[str]
    optional: frozenset[str]


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    about: str
    fields: Mapping[str, TemplateFields]
    """Channel → its fields (the channel's own and the template's)."""
    sample: Mapping[str, Any]
    """Sample data for checks and previews: the catalogue's, with the template's own over it."""
    like: str | None = None
    """A variant of another template: its files are that template's, except ``subject`` and
    ``blocks`` (an A/B test of a subject line or a paragraph is a few lines of YAML)."""
    subject: Mapping[str, str] = field(default_factory=dict)
    """Locale → the subject line (a Jinja template) in place of the base template's."""
    blocks: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Block name → locale → its text in place of the base template's block."""

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self.fields)


@dataclass(frozen=True, slots=True)
class Catalog:
    """What a content directory offers: its templates and offers."""

    directory: Path
    templates: Mapping[str, Template]
    offers: Mapping[str, Offer]
    _pairs: frozenset[tuple[str, str]] = field(default=frozenset(), repr=False)

    @property
    def template_names(self) -> frozenset[str]:
        return frozenset(self.templates)

    @property
    def offer_discounts(self) -> Mapping[str, bool]:
        """Offer name → is it a discount (what the playbook loader checks ``is_discount`` by)."""
        return {name: offer.discount for name, offer in self.offers.items()}

    @property
    def template_channels(self) -> Mapping[str, frozenset[str]]:
        return {name: t.channels for name, t in self.templates.items()}

    def template_pairs(self) -> frozenset[tuple[str, str]]:
        """Every catalogued (template, channel)."""
        return frozenset((n, c) for n, t in self.templates.items() for c in t.fields)

    def channel_problem(self, template: str, channel: str) -> str | None:
        """Why a catalogued ``template`` cannot go out on ``channel`` (``None``: it can, or it
        is not catalogued, which the caller reports as an unknown template)."""
        found = self.templates.get(template)
        if found is None or channel in found.fields:
            return None
        shipped = ", ".join(sorted(found.fields))
        return f"template {template!r} has no {channel} version (it has: {shipped})"


def load_catalog(directory: str | Path = SHIPPED_CONTENT_DIR) -> Catalog:
    """Read and check ``catalog.yaml`` and ``offers.yaml`` of a content directory.

    Raises:
        ContentError: every problem found in either file, each with its file, line and field.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ContentError([Located((), "content directory not found", str(root))])
    problems: list[Located] = []
    templates: dict[str, Template] = {}
    offers: dict[str, Offer] = {}
    catalog_path, offers_path = root / CATALOG_FILE, root / OFFERS_FILE
    loaded = _read(catalog_path, problems)
    if loaded is not None:
        templates = _templates(loaded[0], loaded[1], str(catalog_path), problems)
    loaded = _read(offers_path, problems)
    if loaded is not None:
        data, node = loaded
        try:
            offers = dict(_OffersFile.model_validate(data).offers)
        except ValidationError as exc:
            problems.extend(validation_problems(exc, node, str(offers_path)))
    if problems:
        raise ContentError(problems)
    return Catalog(root, MappingProxyType(templates), MappingProxyType(offers))


@functools.cache
def shipped() -> Catalog:
    """The catalogue of the shipped content (read once per process)."""
    return load_catalog(SHIPPED_CONTENT_DIR)


def catalog_for(content_dir: str | Path | None) -> Catalog:
    """The catalogue of ``content_dir`` (the ``content_dir`` setting), or the shipped one."""
    return shipped() if content_dir is None else load_catalog(content_dir)


def _read(path: Path, problems: list[Located]) -> tuple[Any, yaml.Node] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Located((), f"cannot read: {exc}", str(path)))
        return None
    try:
        return parse(text, str(path))
    except YamlFileError as exc:
        problems.extend(exc.problems)
        return None


def _templates(
    data: Any, node: yaml.Node, source: str, problems: list[Located]
) -> dict[str, Template]:
    def at(path: FieldPath, reason: str) -> None:
        problems.append(Located(path, reason, source, line_of(node, path)))

    try:
        parsed = _CatalogFile.model_validate(data)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, node, source))
        return {}
    known_channels = set(channels.names())
    for chan, fields in parsed.channel_fields.items():
        if chan not in known_channels:
            at(
                ("channel_fields", chan),
                f"unknown channel (known: {', '.join(sorted(known_channels))})",
            )
        _check_fields(("channel_fields", chan), fields.required, fields.optional, at)
    base_sample = _sample(parsed.sample, ("sample",), at)
    out: dict[str, Template] = {}
    entries = dict(parsed.templates)
    ordered = [n for n, e in entries.items() if e.like is None]
    ordered += [n for n, e in entries.items() if e.like is not None]
    for name in ordered:
        entry = entries[name]
        here: FieldPath = ("templates", name)
        if not name.isidentifier():
            at(here, "a template name is letters, digits and underscores")
        base_template: Template | None = None
        if entry.like is not None:
            base_template = out.get(entry.like)
            if base_template is None:
                liked = entries.get(entry.like)
                reason = (
                    f"{entry.like!r} is itself a variant (like: {liked.like}): name its base"
                    if liked is not None and liked.like is not None
                    else f"unknown template {entry.like!r}"
                )
                at((*here, "like"), reason)
                continue
            if (
                entry.channels is not None
                or entry.required is not None
                or entry.optional is not None
            ):
                at(here, "a variant (like:) takes its channels and fields from its base")
                continue
        elif entry.about is None or entry.channels is None:
            missing = [f for f in ("about", "channels") if getattr(entry, f) is None]
            for f in missing:
                at((*here, f), "required field is missing")
            continue
        if entry.like is None and (entry.subject is not None or entry.blocks):
            at(here, "subject and blocks replace a base template's: give like: <template>")
            continue
        overrides = dict(entry.model_extra or {})
        if base_template is not None:
            for extra in overrides:
                at((*here, extra), "unknown field")
            sample = {**base_template.sample, **_sample(entry.sample, (*here, "sample"), at)}
            out[name] = Template(
                name,
                entry.about or f"{base_template.about} (variant)",
                base_template.fields,
                MappingProxyType(sample),
                like=base_template.name,
                subject=MappingProxyType(dict(entry.subject or {})),
                blocks=MappingProxyType({b: MappingProxyType(t) for b, t in entry.blocks.items()}),
            )
            continue
        required_own, optional_own = entry.required or (), entry.optional or ()
        _check_fields(here, required_own, optional_own, at)
        per_channel: dict[str, TemplateFields] = {}
        for chan in entry.channels or ():
            if chan not in known_channels:
                at((*here, "channels"), f"unknown channel {chan!r}")
                continue
            base = parsed.channel_fields.get(chan)
            if base is None:
                at((*here, "channels"), f"channel {chan!r} has no channel_fields entry")
                continue
            required, optional = required_own, optional_own
            if chan in overrides:
                try:
                    own = _Fields.model_validate(overrides.pop(chan))
                except ValidationError as exc:
                    problems.extend(validation_problems(exc, node, source, (*here, chan)))
                    continue
                _check_fields((*here, chan), own.required, own.optional, at)
                required, optional = own.required, own.optional
            per_channel[chan] = TemplateFields(
                frozenset(base.required) | frozenset(required),
                (frozenset(base.optional) | frozenset(optional))
                - frozenset(base.required)
                - frozenset(required),
            )
        for extra in overrides:
            reason = (
                f"channel {extra!r} is not in this template's channels"
                if extra in known_channels
                else "unknown field"
            )
            at((*here, extra), reason)
        sample = {**base_sample, **_sample(entry.sample, (*here, "sample"), at)}
        out[name] = Template(
            name, entry.about or name, MappingProxyType(per_channel), MappingProxyType(sample)
        )
    return dict(sorted(out.items(), key=lambda item: list(entries).index(item[0])))


def _check_fields(
    path: FieldPath, required: tuple[str, ...], optional: tuple[str, ...], at: Any
) -> None:
    for key, names in (("required", required), ("optional", optional)):
        for index, name in enumerate(names):
            if name not in FIELDS:
                at(
                    (*path, key, index),
                    f"unknown field {name!r} (known: {', '.join(sorted(FIELDS))})",
                )
            elif key == "required" and name in OPTIONAL_PROFILE_FIELDS:
                at(
                    (*path, key, index),
                    f"{name!r} is what we know of the customer and a profile may lack it: "
                    "list it in optional and guard it in the template",
                )


def field_value(name: str, value: Any, *, blank_ok: bool = False) -> Any:
    """``value`` of template field ``name`` as the renderer takes it (a date, a Decimal, a
    tuple of texts, a text); ``blank_ok``: blank texts pass (the caller treats them as absent).

    Raises:
        ValueError: an unknown field, or a value not of the field's kind (the reason).
    """
    kind = FIELDS.get(name)
    if kind is None:
        raise ValueError(f"unknown field (known: {', '.join(sorted(FIELDS))})")
    if kind == "date":
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise ValueError("not a date (YYYY-MM-DD)") from None
    if kind == "decimal":
        try:
            return Decimal(str(value))
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
    if kind == "list":
        if isinstance(value, list) and all(
            isinstance(v, str) and (blank_ok or v.strip()) for v in value
        ):
            return tuple(value)
        raise ValueError("not a list of texts")
    if not isinstance(value, str) or not (blank_ok or value.strip()):
        raise ValueError("not a text")
    return value


def _sample(raw: Mapping[str, Any], path: FieldPath, at: Any) -> dict[str, Any]:
    """Sample values converted to what the renderer gets (:func:`field_value`)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            out[name] = field_value(name, value)
        except ValueError as exc:
            at((*path, name), str(exc))
    return out
