"""The shipped template catalogue, as the names two services agree on.

The catalogue itself is data: ``shared/content/catalog.yaml`` (templates, their channels and
fields) and ``shared/content/offers.yaml`` (offers), loaded by :mod:`shared.content`. This
module keeps the shipped catalogue's names for code and tests that use the shipped content; a
service started with its own content directory (``WINBACK_CONTENT_DIR``) loads that instead
(:func:`shared.content.load_catalog`).

Every message should acknowledge the customer's decision, offer something new, make the
next step easy and low-pressure, and give value even if they do not return.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.content import Catalog, shipped

SHIPPED: Catalog = shipped()
"""The catalogue of the content shipped with winback."""

TEMPLATES: Mapping[str, str] = {name: t.about for name, t in SHIPPED.templates.items()}
TEMPLATE_NAMES: frozenset[str] = SHIPPED.template_names
TEMPLATE_CHANNELS: Mapping[str, frozenset[str]] = SHIPPED.template_channels
"""Template name → the channels it ships on."""
OFFERS: Mapping[str, bool] = SHIPPED.offer_discounts
"""Offer name → is it a discount (subject to the no-discount-loop guardrail)?"""
OFFER_NAMES: frozenset[str] = frozenset(OFFERS)


def template_pairs(catalog: Catalog = SHIPPED) -> frozenset[tuple[str, str]]:
    """Every catalogued (template, channel)."""
    return catalog.template_pairs()


def channel_problem(template: str, channel: str, catalog: Catalog = SHIPPED) -> str | None:
    """Why a catalogued ``template`` cannot go out on ``channel`` (``None``: it can, or the
    template is not catalogued, which the caller reports as an unknown template)."""
    return catalog.channel_problem(template, channel)
