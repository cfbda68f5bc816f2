"""Template and offer names the shipped playbooks use: the dispatcher ships a template for
each name in :data:`TEMPLATE_NAMES` and knows each offer in :data:`OFFERS`.

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
