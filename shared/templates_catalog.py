"""The template catalogue: the template and offer names playbooks may use, and on which
channels each template ships. Shared (pure, no I/O) because two services agree on it: the
scheduler's playbook loader refuses a template, offer or template-on-channel not listed here,
and the dispatcher (the owner of content) ships a template for each (name, channel) in
:data:`TEMPLATE_CHANNELS` (checked at its start-up and by a unit test) and words for each
offer in :data:`OFFERS`.

Every message should acknowledge the customer's decision, offer something new, make the
next step easy and low-pressure, and give value even if they do not return.
"""

from __future__ import annotations

from collections.abc import Mapping

TEMPLATES: Mapping[str, str] = {
    "we_miss_you": "name, product, what you missed, optional offer; acknowledges the decision",
    "what_you_missed": "name, highlights released since they left",
    "special_offer": "name, offer, valid-until date",
    "last_chance": "name, offer or final invitation, valid-until date; urgency without pressure",
    "whats_new": "name, new features, fixed problems, try-free link",
    "feature_built": "name, the feature they asked for is live, try-free link",
    "comparison": "name, competitor, 'has it delivered?' comparison",
    "budget_checkin": "name, new budget year check-in, plans",
    "what_we_changed": "name, apology, what changed, offer of premium onboarding",
    "check_in": "name, periodic no-pressure check-in with useful content",
    "crm_personal_outreach": "CRM task for the account owner: call / LinkedIn message",
    "value_content": "name, useful content with a soft re-engagement link",
    "customer_story": "name, a customer story from a similar company",
    "exit_survey": "name, short survey: what blocked you?",
    "trial_extension": "name, trial extended, getting-started help",
    "demo_follow_up": "name, follow-up after a demo or rejected offer",
    "usage_nudge": "name, what they have not tried yet, one-click way back in",
    # re-onboarding: for customers who came back
    "welcome_back": "name, thanks for coming back, what is new, one easy first step",
    "settling_in": "name, two weeks back: getting the value out, optional non-discount offer",
    "crm_at_risk": "CRM task: a won-back customer quiet since returning; a helpful call",
    "crm_reonboarding_check_in": "CRM task: 30-day check-in call with a won-back customer",
}
TEMPLATE_NAMES: frozenset[str] = frozenset(TEMPLATES)

_SMS: frozenset[str] = frozenset({"we_miss_you", "special_offer", "last_chance"})
"""The templates that also have a short SMS version."""
_EMAIL_LIKE: frozenset[str] = frozenset({"email", "webhook"})


def _channels(name: str) -> frozenset[str]:
    if name.startswith("crm_"):
        return frozenset({"crm"})
    return _EMAIL_LIKE | ({"sms"} if name in _SMS else set())


TEMPLATE_CHANNELS: Mapping[str, frozenset[str]] = {name: _channels(name) for name in TEMPLATES}
"""Template name → the channels it ships on (email templates also go out on the webhook
channel; ``crm_*`` templates are CRM tasks only)."""


def template_pairs() -> frozenset[tuple[str, str]]:
    """Every catalogued (template, channel)."""
    return frozenset((n, c) for n, channels in TEMPLATE_CHANNELS.items() for c in channels)


def channel_problem(template: str, channel: str) -> str | None:
    """Why a catalogued ``template`` cannot go out on ``channel`` (``None``: it can, or the
    template is not catalogued, which the caller reports as an unknown template)."""
    shipped = TEMPLATE_CHANNELS.get(template)
    if shipped is None or channel in shipped:
        return None
    return f"template {template!r} has no {channel} version (it has: {', '.join(sorted(shipped))})"


OFFERS: Mapping[str, bool] = {
    # offer name → is it a discount (subject to the no-discount-loop guardrail)?
    "discount_50pct_3mo": True,  # 50% off the next 3 months, time-limited
    "discount_20pct_12mo": True,  # 20% off for a year
    "free_month": True,
    "extended_trial_30d": False,
    "premium_onboarding": False,
    "migration_help": False,
    "bonus_features": False,
    "money_back_guarantee": False,
}
OFFER_NAMES: frozenset[str] = frozenset(OFFERS)
