"""The shared template catalogue is the contract between the scheduler (whose playbooks may use
only what it lists) and the dispatcher (which ships every (template, channel) it lists): the
dispatcher no longer loads playbooks to check its templates, so these tests hold both sides."""

from __future__ import annotations

import pytest

from services.dispatcher.rendering import TEMPLATE_SPECS
from services.scheduler.domain import PlaybookError, load_playbooks, parse_playbook
from shared.settings import SchedulerSettings
from shared.templates_catalog import OFFERS, TEMPLATE_CHANNELS, TEMPLATE_NAMES, template_pairs

PLAYBOOK = """
name: sms-crm
version: 1
steps:
  - key: d1
    offset: 1d
    channel: {channel}
    template: {template}
"""


def test_the_dispatcher_ships_every_catalogued_template_on_each_of_its_channels() -> None:
    assert template_pairs() <= set(TEMPLATE_SPECS)
    assert set(TEMPLATE_CHANNELS) == TEMPLATE_NAMES


def test_the_shipped_playbooks_use_only_catalogued_templates_on_their_channels() -> None:
    playbooks = load_playbooks(
        SchedulerSettings().playbooks_dir, templates=TEMPLATE_NAMES, offers=OFFERS
    )
    used = {
        (name, step.channel)
        for playbook in playbooks
        for step in playbook.steps
        for name in {step.template, step.without_discount, *(v.template for v in step.variants)}
        if name
    }
    assert ("crm_personal_outreach", "crm") in used
    assert ("we_miss_you", "email") in used
    assert used <= template_pairs()


@pytest.mark.parametrize(
    ("channel", "template", "problem"),
    [
        ("sms", "what_you_missed", "template 'what_you_missed' has no sms version"),
        ("email", "crm_at_risk", "template 'crm_at_risk' has no email version"),
    ],
)
def test_the_loader_refuses_a_template_on_a_channel_it_does_not_ship_on(
    channel: str, template: str, problem: str
) -> None:
    text = PLAYBOOK.format(channel=channel, template=template)
    with pytest.raises(PlaybookError, match=problem) as caught:
        parse_playbook(text, "x.yaml", templates=TEMPLATE_NAMES, offers=OFFERS)
    assert "steps[0].template" in str(caught.value)


def test_a_template_on_a_channel_it_ships_on_loads() -> None:
    text = PLAYBOOK.format(channel="sms", template="we_miss_you")
    assert parse_playbook(text, "x.yaml", templates=TEMPLATE_NAMES, offers=OFFERS).steps
