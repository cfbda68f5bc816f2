"""Guardrails: may a planned step go out now? → :class:`Send`, :class:`Defer` or :class:`Skip`.

The scheduler calls :func:`decide` when a step falls due (and may call it earlier to
preview). The checks, in order:

1. holdout → Skip ``holdout`` (the playbook's holdout share receives nothing);
2. global opt-out → Skip ``opted_out``;
3. case horizon passed → Skip ``expired``;
4. channel suppressed → Skip ``channel_suppressed``; consent withdrawn, or not given on a
   channel that needs it (:attr:`GuardrailPolicy.consent_by_default`) → Skip ``no_consent``;
5. no discount loop: a discount step for a non-price, low-engagement or re-churn segment,
   or within ``discount_period`` of the customer's last discount, loses its discount: it is
   sent offer-free with its ``discount_fallback_template``, or skipped
   (``discount_not_allowed``) when it has none;
6. not due yet → Defer ``not_due`` to ``due_at``;
   a monitoring step (``inactive_for``, re-onboarding) while the customer shows activity →
   Defer ``not_at_risk`` until they would have been quiet for ``inactive_for`` (quiet since
   the later of ``watch_from`` — the return — and their last recorded activity), or Skip
   ``not_at_risk`` when that lands at or after the horizon;
7. frequency caps (every cap, across all cases and channels) and the send window in the
   customer's local time: if either blocks now, the step is deferred to the earliest moment
   both allow — or skipped (``frequency_cap``) when a cap blocks and the step says
   ``on_cap: skip``; a deferral that would land at or after the horizon is Skip ``expired``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from services.scheduler.domain.model import (
    Channel,
    ContactHistory,
    CustomerView,
    Decision,
    Defer,
    DiscountBlock,
    PlannedStep,
    Segment,
    Send,
    Skip,
)
from shared.localtime import SendWindow, resolve_zone


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``max_messages`` in any rolling ``period``: a message at ``t`` counts against
    every period ``(t - period, t]`` — two messages exactly one period apart do not share one."""

    max_messages: int
    period: timedelta

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.period <= timedelta(0):
            raise ValueError("a frequency cap needs max_messages >= 1 and a positive period")

    def earliest_allowed(self, at: datetime, sent_at: Sequence[datetime]) -> datetime:
        """The earliest moment at or after ``at`` when one more message stays within the cap,
        given messages ``sent_at`` (at or before ``at``; later ones are ignored)."""
        recent = sorted(s for s in sent_at if at - self.period < s <= at)
        if len(recent) < self.max_messages:
            return at
        return recent[-self.max_messages] + self.period


@dataclass(frozen=True, slots=True)
class GuardrailPolicy:
    """Guardrail configuration.

    ``send_window`` applies to every channel unless ``channel_send_windows`` gives the
    channel its own (``None`` there: any time of day). ``fallback_timezone`` is used when
    the customer's timezone is missing or unknown. ``consent_by_default`` lists channels
    that need no recorded consent (CRM tasks go to the account owner, not the customer); an
    explicit ``False`` stops every channel.
    """

    caps: tuple[FrequencyCap, ...] = (
        FrequencyCap(3, timedelta(days=7)),
        FrequencyCap(6, timedelta(days=30)),
    )
    send_window: SendWindow | None = field(default_factory=SendWindow)
    channel_send_windows: Mapping[Channel, SendWindow | None] = field(default_factory=dict)
    fallback_timezone: str = "UTC"
    discount_period: timedelta = timedelta(days=365)
    consent_by_default: frozenset[Channel] = frozenset({"crm"})

    def window_for(self, channel: Channel) -> SendWindow | None:
        """The send window of ``channel``."""
        if channel in self.channel_send_windows:
            return self.channel_send_windows[channel]
        return self.send_window


DEFAULT_POLICY = GuardrailPolicy()


def discount_block(
    segment: Segment, history: ContactHistory, now: datetime, policy: GuardrailPolicy
) -> DiscountBlock | None:
    """Why a discount may not be offered to this customer now, or ``None`` if it may."""
    if segment.reason != "price":
        return "not_price_reason"
    if segment.engagement == "low":
        return "low_engagement"
    if segment.is_rechurn:
        return "rechurn"
    if any(now - policy.discount_period < at <= now for at in history.discounts_at):
        return "discount_period"
    return None


def quiet_since(last_active_at: datetime | None, watch_from: datetime | None) -> datetime | None:
    """Since when the customer has shown no activity, as far as monitoring counts: the later
    of their last recorded activity and ``watch_from`` (the return); ``None`` if neither."""
    known = [t for t in (last_active_at, watch_from) if t is not None]
    return max(known, default=None)


def earliest_send_time(
    at: datetime,
    history: ContactHistory,
    window: SendWindow | None,
    zone: ZoneInfo,
    caps: Sequence[FrequencyCap],
) -> datetime:
    """The earliest moment at or after ``at`` that every cap and the send window allow."""
    candidate = at
    while True:
        capped = max(
            (cap.earliest_allowed(candidate, history.sent_at) for cap in caps), default=candidate
        )
        allowed = window.next_allowed(capped, zone) if window is not None else capped
        if allowed == candidate:
            return candidate
        candidate = allowed


def decide(
    step: PlannedStep,
    *,
    customer: CustomerView,
    segment: Segment,
    history: ContactHistory,
    now: datetime,
    policy: GuardrailPolicy = DEFAULT_POLICY,
    watch_from: datetime | None = None,
) -> Decision:
    """Decide whether ``step`` goes out at ``now`` (see the module docstring for the rules).

    ``watch_from`` is when a re-onboarding case's customer returned: activity before it does
    not count, and a monitoring step's quiet time starts there at the earliest.
    ``history`` holds the customer's messages sent at or before ``now``, across every case
    and channel. The caller records a :class:`Send` in the history (and in the discount
    history when the sent step ``is_discount``).
    """
    if step.holdout:
        return Skip("holdout")
    if customer.opted_out_all:
        return Skip("opted_out")
    if now >= step.expires_at:
        return Skip("expired")
    if step.channel in customer.suppressed_channels:
        return Skip("channel_suppressed")
    consent = customer.consent.get(step.channel)
    if consent is False or (consent is None and step.channel not in policy.consent_by_default):
        return Skip("no_consent", "withdrawn" if consent is False else "not_given")

    withheld: DiscountBlock | None = None
    if step.is_discount:
        withheld = discount_block(segment, history, now, policy)
        if withheld is not None:
            if step.discount_fallback_template is None:
                return Skip("discount_not_allowed", withheld)
            step = replace(
                step, template=step.discount_fallback_template, offer=None, is_discount=False
            )

    if now < step.due_at:
        return Defer(step.due_at, "not_due")
    if step.inactive_for is not None:
        quiet = quiet_since(customer.last_active_at, watch_from)
        if quiet is not None and now - quiet < step.inactive_for:
            until = quiet + step.inactive_for
            if until >= step.expires_at:
                return Skip("not_at_risk", "active until the case horizon")
            return Defer(until, "not_at_risk")

    zone = resolve_zone(customer.timezone, policy.fallback_timezone)
    window = policy.window_for(step.channel)
    capped_now = any(cap.earliest_allowed(now, history.sent_at) > now for cap in policy.caps)
    if capped_now and step.on_cap == "skip":
        return Skip("frequency_cap")
    when = earliest_send_time(now, history, window, zone, policy.caps)
    if when == now:
        return Send(step, offer_withheld=withheld)
    if when >= step.expires_at:
        return Skip("expired", "deferred past the case horizon")
    return Defer(when, "frequency_cap" if capped_now else "quiet_hours")
