"""The channel registry: the one table of what a channel is. Pure (no I/O).

Every service reads channels from here: the scheduler's playbook types and views, ingest's
consent events, the contracts' ``Channel`` literal, the dispatcher's renderer (template
directory and parts), composer (address field, unsubscribe link), sender (suppression by
address) and settings (provider kinds per channel).

Adding a channel is one :class:`ChannelSpec` in :data:`BUILTIN`, its templates under
``shared/content/{locale}/{template_dir}/`` with their entries in ``shared/content/catalog.yaml``,
and one provider adapter (README: "Adding a channel"). Tests register a channel for their own
duration with :func:`registered`.

The pydantic models need a ``Literal`` (their JSON schema and the AsyncAPI document list the
values); :data:`ChannelName` is that literal, kept beside the table, and
``tests/unit/test_channel_registry.py`` holds the two equal.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final, Literal, TypeAlias, get_args

ChannelName: TypeAlias = Literal["email", "sms", "crm", "webhook"]
"""The built-in channel names as a type (pydantic models, playbook types)."""
ChannelNameOrAll: TypeAlias = Literal["email", "sms", "crm", "webhook", "all"]
"""A channel, or ``all`` (a consent answer or opt-out that covers every channel)."""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel.

    ``address_field``: the customer-snapshot field that holds the recipient (``None``: the
    customer id is the recipient, as for the webhook channel). ``template_dir`` and
    ``template_parts``: where the dispatcher finds a message's template files, as
    ``{locale}/{template_dir}/{name}.{part}``. ``provider_kinds``: the provider adapters that
    can serve it (``file`` writes messages to disk). ``suppressible``: a dead or opted-out
    address goes on the suppression list (keyed by :func:`address_hash`).
    ``unsubscribe_link``: the message carries a one-click unsubscribe link.
    ``unsubscribe_wording``: what the unsubscribe page calls these messages, per language
    (``"en"`` is the fallback). ``case_insensitive_address``: addresses are compared lower-cased.
    """

    name: str
    address_field: str | None
    template_dir: str
    template_parts: tuple[str, ...]
    provider_kinds: tuple[str, ...]
    suppressible: bool
    unsubscribe_link: bool
    unsubscribe_wording: Mapping[str, str] = field(default_factory=dict)
    case_insensitive_address: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name == "all":
            raise ValueError(f"channel name {self.name!r} must be an identifier other than 'all'")
        if not self.template_parts:
            raise ValueError(f"channel {self.name!r} needs at least one template part")
        if not self.provider_kinds:
            raise ValueError(f"channel {self.name!r} needs at least one provider kind")

    def wording(self, locale: str) -> str:
        """The unsubscribe page's word for these messages in ``locale`` (``fi-FI`` → ``fi``)."""
        language = locale.split("-")[0].split("_")[0].lower()
        return self.unsubscribe_wording.get(language) or self.unsubscribe_wording.get(
            "en", "messages"
        )


_EMAIL_PARTS: Final = ("subject.txt", "html", "txt")

BUILTIN: Final[tuple[ChannelSpec, ...]] = (
    ChannelSpec(
        name="email",
        address_field="email",
        template_dir="email",
        template_parts=_EMAIL_PARTS,
        provider_kinds=("file", "sendgrid", "postmark"),
        suppressible=True,
        unsubscribe_link=True,
        unsubscribe_wording={"en": "emails", "fi": "sähköposteja", "da": "e-mails", "ms": "e-mel"},
        case_insensitive_address=True,
    ),
    ChannelSpec(
        name="sms",
        address_field="phone",
        template_dir="sms",
        template_parts=("txt",),
        provider_kinds=("file", "twilio"),
        suppressible=True,
        unsubscribe_link=False,
        unsubscribe_wording={"en": "text messages", "fi": "tekstiviestejä", "da": "sms'er"}
        | {"ms": "SMS"},
    ),
    ChannelSpec(
        name="crm",
        address_field="crm_owner",
        template_dir="crm",
        template_parts=("subject.txt", "body.txt"),
        provider_kinds=("file", "hubspot"),
        suppressible=False,
        unsubscribe_link=False,
    ),
    ChannelSpec(
        # the webhook channel carries the email parts (subject, text, HTML) to the receiver
        name="webhook",
        address_field=None,
        template_dir="email",
        template_parts=_EMAIL_PARTS,
        provider_kinds=("file", "webhook"),
        suppressible=False,
        unsubscribe_link=True,
        unsubscribe_wording={"en": "notifications", "fi": "ilmoituksia", "da": "notifikationer"}
        | {"ms": "pemberitahuan"},
    ),
)

_registry: dict[str, ChannelSpec] = {spec.name: spec for spec in BUILTIN}
REGISTRY: Final[Mapping[str, ChannelSpec]] = MappingProxyType(_registry)
"""Channel name → its spec: the built-in ones and any registered since (read-only view)."""


class UnknownChannelError(ValueError):
    """A channel name no :class:`ChannelSpec` is registered for."""

    def __init__(self, name: object) -> None:
        super().__init__(f"unknown channel {name!r} (known: {', '.join(_registry)})")
        self.channel = name


def spec(name: str) -> ChannelSpec:
    """The spec of channel ``name``; ``UnknownChannelError`` if there is none."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownChannelError(name) from None


def names() -> tuple[str, ...]:
    """Every registered channel, built-in first, in registration order."""
    return tuple(_registry)


def register(channel: ChannelSpec) -> None:
    """Add a channel (for a plug-in or a test; built-ins cannot be replaced)."""
    if channel.name in _registry:
        raise ValueError(f"channel {channel.name!r} is already registered")
    _registry[channel.name] = channel


def unregister(name: str) -> None:
    """Remove a channel added by :func:`register` (the built-ins stay)."""
    if any(b.name == name for b in BUILTIN):
        raise ValueError(f"channel {name!r} is built in")
    _registry.pop(name, None)


@contextlib.contextmanager
def registered(channel: ChannelSpec) -> Iterator[ChannelSpec]:
    """``register`` for the duration of a ``with`` block (tests)."""
    register(channel)
    try:
        yield channel
    finally:
        unregister(channel.name)


_interned: dict[str, Channel] = {}


class Channel(str):
    """A registered channel's name: ``Channel("email")``; ``ValueError`` for an unknown name.

    A ``str`` (compare with ``==``), with the built-ins as constants (``Channel.EMAIL``)."""

    __slots__ = ()
    EMAIL: ClassVar[Channel]
    SMS: ClassVar[Channel]
    CRM: ClassVar[Channel]
    WEBHOOK: ClassVar[Channel]

    def __new__(cls, value: str) -> Channel:
        if isinstance(value, Channel):
            return value
        spec(value)
        interned = _interned.get(value)
        if interned is None:  # one object per name, so `is Channel.SMS` holds as for an enum
            interned = _interned[value] = super().__new__(cls, value)
        return interned

    @property
    def value(self) -> str:
        """The name (as an enum member's ``value`` was)."""
        return str.__str__(self)

    @property
    def spec(self) -> ChannelSpec:
        return spec(self)

    def __repr__(self) -> str:
        return f"Channel({str.__repr__(self)})"


Channel.EMAIL = Channel("email")
Channel.SMS = Channel("sms")
Channel.CRM = Channel("crm")
Channel.WEBHOOK = Channel("webhook")


def address_hash(channel: str, address: str) -> str:
    """The suppression-list key of a contact point: SHA-256 of the normalised address (the
    scheduler hashes an erased customer's addresses with it, the dispatcher its sends)."""
    lower = channel in _registry and _registry[channel].case_insensitive_address
    normal = address.strip().lower() if lower else address.strip()
    return hashlib.sha256(f"{channel}:{normal}".encode()).hexdigest()


def address_fields() -> dict[str, str]:
    """Channel → customer field of its address, for the suppressible channels."""
    return {
        s.name: s.address_field for s in _registry.values() if s.suppressible and s.address_field
    }


assert set(get_args(ChannelName)) == {s.name for s in BUILTIN}, "ChannelName is out of date"
