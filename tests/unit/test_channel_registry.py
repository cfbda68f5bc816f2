"""The channel registry (``shared.channels``) is the one table of channels: the literal the
pydantic models use agrees with it, every service's view of channels comes from it, and a
channel registered in a test exists only for that test."""

from __future__ import annotations

from typing import get_args

import pytest

from services.dispatcher.rendering import TEMPLATE_SPECS
from services.scheduler.domain.model import CHANNELS as SCHEDULER_CHANNELS
from shared import channels
from shared.channels import BUILTIN, Channel, ChannelName, ChannelNameOrAll, ChannelSpec
from shared.contracts.base import Channel as ContractChannel
from shared.settings import CHANNEL_KINDS, DispatcherSettings

PUSH = ChannelSpec(
    name="push_test",
    address_field="push_token",
    template_dir="push_test",
    template_parts=("txt",),
    provider_kinds=("file",),
    suppressible=False,
    unsubscribe_link=False,
)


def test_the_literal_types_agree_with_the_table() -> None:
    builtin = [s.name for s in BUILTIN]
    assert list(get_args(ChannelName)) == builtin
    assert list(get_args(ChannelNameOrAll)) == [*builtin, "all"]
    assert get_args(ContractChannel) == get_args(ChannelName)
    assert list(SCHEDULER_CHANNELS) == builtin


def test_settings_have_a_section_and_the_provider_kinds_of_every_builtin_channel() -> None:
    assert {s.name: s.provider_kinds for s in BUILTIN} == CHANNEL_KINDS
    settings = DispatcherSettings()
    for spec in BUILTIN:
        assert settings.channel(spec.name).providers, spec.name


def test_every_builtin_channel_has_templates() -> None:
    shipped = {channel for _, channel in TEMPLATE_SPECS}
    assert shipped == set(channels.names())


def test_a_channel_is_a_registered_name() -> None:
    assert Channel("sms") is Channel.SMS
    assert Channel.EMAIL == "email"
    assert Channel.EMAIL.spec.address_field == "email"
    with pytest.raises(channels.UnknownChannelError, match="unknown channel 'fax'"):
        Channel("fax")
    with pytest.raises(ValueError, match="fax"):  # a ValueError, as the enum raised
        Channel("fax")


def test_a_registered_channel_lives_for_the_with_block_only() -> None:
    with channels.registered(PUSH):
        assert Channel("push_test").spec is PUSH
        assert "push_test" in channels.names()
        with pytest.raises(ValueError, match="already registered"):
            channels.register(PUSH)
    assert "push_test" not in channels.REGISTRY
    with pytest.raises(channels.UnknownChannelError):
        Channel("push_test")


def test_builtins_cannot_be_removed_or_replaced() -> None:
    with pytest.raises(ValueError, match="built in"):
        channels.unregister("email")
    with pytest.raises(ValueError, match="already registered"):
        channels.register(BUILTIN[0])


@pytest.mark.parametrize("name", ["", "all", "no spaces"])
def test_a_spec_needs_a_usable_name(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        ChannelSpec(
            name, None, "x", ("txt",), ("file",), suppressible=False, unsubscribe_link=False
        )


def test_addresses_hash_as_before_email_ignoring_case() -> None:
    assert channels.address_hash("email", " Aino@Example.COM ") == channels.address_hash(
        "email", "aino@example.com"
    )
    assert channels.address_hash("sms", "+358 40") != channels.address_hash(
        "sms", "+358 40".upper() + "1"
    )
    assert channels.address_fields() == {"email": "email", "sms": "phone"}


def test_unsubscribe_wording_falls_back_to_english() -> None:
    email = channels.spec("email")
    assert email.wording("fi-FI") == "sähköposteja"
    assert email.wording("sv") == "emails"
    assert channels.spec("crm").wording("fi") == "messages"
