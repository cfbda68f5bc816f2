"""A customer's state, folded over lifecycle events in EVENT time, not arrival time. Pure.

Two last-writer-wins registers, each stamped with the event time that set it:
- ``lifecycle`` (unknown / active / churned / trial_expired / lead_lost), written by
  subscription and trial events and lost leads;
- ``activity`` (unknown / active / inactive), written by activity events (and by a
  reactivation, which implies activity).
An event older than the register's stamp never overrides it, so the final state does not
depend on arrival order (property-tested). A stale churn is still recorded as an episode,
already ended (``returned`` or ``superseded``): history is complete, a returned customer stays
active. A return ends every open episode that began before it.

Profile fields are last-writer-wins by event time, field by field. Consent withdrawal always
applies, whatever its time: an objection to direct marketing is absolute.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from services.ingest import events as ev
from services.ingest.reasons import normalise_reason

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ACTIVITY_BUCKET = timedelta(hours=1)
"""At most one ``customer.activity`` per clock hour for a customer who is not churned."""


def _hour(at: datetime) -> int:
    return int((at - EPOCH) // ACTIVITY_BUCKET)


Lifecycle = Literal["unknown", "active", "churned", "trial_expired", "lead_lost"]
Activity = Literal["unknown", "active", "inactive"]
CHURNED: frozenset[str] = frozenset({"churned", "trial_expired", "lead_lost"})
PROFILE_FIELDS = (
    "email",
    "phone",
    "name",
    "locale",
    "timezone",
    "plan",
    "mrr_minor",
    "currency",
    "customer_since",
    "engagement",
    "crm_owner",
)
LIFECYCLE_CHURN: dict[str, tuple[str, Lifecycle]] = {
    "subscription.cancelled": ("subscription_cancelled", "churned"),
    "trial.expired": ("trial_expired", "trial_expired"),
    "lead.lost": ("lead_lost", "lead_lost"),
}


@dataclass(frozen=True)
class OpenEpisode:
    id: str
    kind: str
    occurred_at: datetime


@dataclass(frozen=True)
class CustomerState:
    id: str
    profile: dict[str, Any] = field(default_factory=dict)
    profile_times: dict[str, datetime] = field(default_factory=dict)
    lifecycle: Lifecycle = "unknown"
    lifecycle_at: datetime = EPOCH
    activity: Activity = "unknown"
    activity_at: datetime = EPOCH
    consent: dict[str, bool] = field(default_factory=dict)
    opted_out_all: bool = False
    open_episodes: tuple[OpenEpisode, ...] = ()

    @property
    def status(self) -> str:
        """One word for people and queries: churned-like lifecycle first, then inactivity."""
        if self.lifecycle in CHURNED:
            return self.lifecycle
        if self.activity == "inactive":
            return "inactive"
        if "active" in (self.lifecycle, self.activity):
            return "active"
        return "unknown"

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        for name in PROFILE_FIELDS:
            value = self.profile.get(name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        out.update(status=self.status, consent=dict(self.consent), opted_out_all=self.opted_out_all)
        return out


@dataclass(frozen=True)
class Episode:
    id: str
    customer_id: str
    kind: str
    reason: str
    reason_raw: str | None
    comment: str | None
    feature: str | None
    competitor: str | None
    occurred_at: datetime
    mrr_at_churn_minor: int | None
    currency: str | None
    tenure_days: int | None
    source: str
    source_event_id: str
    ended_at: datetime | None = None
    end_reason: str | None = None

    def public(self) -> dict[str, Any]:
        """The episode as published: no free-text comment (it may hold PII)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "reason_raw": self.reason_raw,
            "feature": self.feature,
            "competitor": self.competitor,
            "occurred_at": self.occurred_at.isoformat(),
            "mrr_at_churn_minor": self.mrr_at_churn_minor,
            "currency": self.currency,
            "tenure_days": self.tenure_days,
        }


@dataclass
class Effects:
    """What applying one event changes: the new state, rows to write, events to emit."""

    state: CustomerState | None
    new_episode: Episode | None = None
    ended: list[tuple[str, datetime, str]] = field(default_factory=list)
    emit: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def episode_id(source: str, event_id: str) -> str:
    return hashlib.sha256(f"{source}|{event_id}".encode()).hexdigest()[:32]


def _merge_fields(state: CustomerState, fields: dict[str, Any], at: datetime) -> CustomerState:
    """Take each field whose last write is older than ``at`` (ties: the later arrival)."""
    fresh = {k: v for k, v in fields.items() if at >= state.profile_times.get(k, EPOCH)}
    if not fresh:
        return state
    return replace(
        state,
        profile={**state.profile, **fresh},
        profile_times={**state.profile_times, **dict.fromkeys(fresh, at)},
    )


def _merge_profile(state: CustomerState, profile: ev.Profile, at: datetime) -> CustomerState:
    return _merge_fields(state, profile.fields_set(), at)


def _end_before(
    state: CustomerState, at: datetime, reason: str, kinds: set[str] | None = None
) -> tuple[CustomerState, list[tuple[str, datetime, str]]]:
    keep, ended = [], []
    for episode in state.open_episodes:
        if episode.occurred_at <= at and (kinds is None or episode.kind in kinds):
            ended.append((episode.id, at, reason))
        else:
            keep.append(episode)
    return replace(state, open_episodes=tuple(keep)), ended


def apply(
    state: CustomerState | None,
    inbound: ev.Inbound,
    source: str,
    event_id: str,
) -> Effects:
    """Apply one validated inbound event to a customer's state (``None`` = unknown)."""
    payload = inbound.payload
    at = inbound.occurred_at
    if inbound.name == "feature.released":
        assert isinstance(payload, ev.FeatureReleased)
        return Effects(
            state=None,
            emit=[
                (
                    "feature.released",
                    {
                        "feature": payload.feature,
                        "name": payload.name,
                        "description": payload.description,
                        "released_at": at.isoformat(),
                    },
                )
            ],
        )
    assert isinstance(payload, ev.CustomerEvent)
    before = state or CustomerState(id=payload.customer_id)
    current = _merge_profile(before, payload.customer, at)
    effects = Effects(state=current)

    if inbound.name in LIFECYCLE_CHURN:
        _churn(effects, current, inbound, source, event_id)
    elif inbound.name == "user.inactive":
        _inactive(effects, current, inbound, source, event_id)
    elif inbound.name in ("subscription.reactivated", "subscription.created"):
        _reactivated(effects, current, inbound)
    elif inbound.name == "user.active":
        _active(effects, current, at)
    elif inbound.name == "consent.withdrawn":
        assert isinstance(payload, ev.ConsentWithdrawn)
        if payload.channel == "all":
            current = replace(current, opted_out_all=True)
        else:
            current = replace(current, consent={**current.consent, payload.channel: False})
        effects.state = current
        effects.emit.append(
            (
                "consent.changed",
                {
                    "customer_id": current.id,
                    "channel": payload.channel,
                    "granted": False,
                    "at": at.isoformat(),
                    "customer": current.snapshot(),
                },
            )
        )
    elif inbound.name == "customer.updated" and current is not before:
        effects.emit.append(("customer.updated", {"customer": current.snapshot()}))
    return effects


def _episode(
    state: CustomerState, inbound: ev.Inbound, kind: str, source: str, event_id: str
) -> Episode:
    payload = inbound.payload
    at = inbound.occurred_at
    reason_raw = getattr(payload, "reason", None)
    if kind == "user_inactive":
        reason_raw = reason_raw or "unused"
    mrr = getattr(payload, "mrr_minor", None)
    if mrr is None:
        mrr = state.profile.get("mrr_minor")
    since = state.profile.get("customer_since")
    return Episode(
        id=episode_id(source, event_id),
        customer_id=state.id,
        kind=kind,
        reason=normalise_reason(reason_raw),
        reason_raw=reason_raw,
        comment=getattr(payload, "comment", None),
        feature=getattr(payload, "feature", None),
        competitor=getattr(payload, "competitor", None),
        occurred_at=at,
        mrr_at_churn_minor=mrr,
        currency=getattr(payload, "currency", None) or state.profile.get("currency"),
        tenure_days=(at - since).days if isinstance(since, datetime) and since <= at else None,
        source=source,
        source_event_id=event_id,
    )


def _open(effects: Effects, state: CustomerState, episode: Episode) -> None:
    """Open ``episode``; it supersedes every open episode that began before it."""
    current, ended = _end_before(state, episode.occurred_at, "superseded")
    current = replace(
        current,
        open_episodes=(
            *current.open_episodes,
            OpenEpisode(episode.id, episode.kind, episode.occurred_at),
        ),
    )
    effects.state = current
    effects.new_episode = episode
    effects.ended.extend(ended)
    effects.emit.append(
        (
            "churn.recorded",
            {
                "customer": current.snapshot(),
                "episode": episode.public(),
                "superseded": [e[0] for e in ended],
            },
        )
    )


def _churn(
    effects: Effects, state: CustomerState, inbound: ev.Inbound, source: str, event_id: str
) -> None:
    at = inbound.occurred_at
    kind, lifecycle = LIFECYCLE_CHURN[inbound.name]
    episode = _episode(state, inbound, kind, source, event_id)
    if at < state.lifecycle_at:
        # Stale: something newer already decided the lifecycle. Keep the history only.
        end_reason = "returned" if state.lifecycle == "active" else "superseded"
        effects.new_episode = replace(episode, ended_at=state.lifecycle_at, end_reason=end_reason)
        return
    _open(effects, replace(state, lifecycle=lifecycle, lifecycle_at=at), episode)


def _inactive(
    effects: Effects, state: CustomerState, inbound: ev.Inbound, source: str, event_id: str
) -> None:
    at = inbound.occurred_at
    if at < state.activity_at:
        return  # activity seen after this: the customer was not inactive
    state = replace(state, activity="inactive", activity_at=at)
    effects.state = state
    if state.lifecycle in CHURNED:
        return  # already churned: an open case covers them
    if any(e.kind == "user_inactive" for e in state.open_episodes):
        return  # still the same spell of inactivity
    _open(effects, state, _episode(state, inbound, "user_inactive", source, event_id))


def _reactivated(effects: Effects, state: CustomerState, inbound: ev.Inbound) -> None:
    payload = inbound.payload
    assert isinstance(payload, ev.SubscriptionReactivated)
    at = inbound.occurred_at
    state = _merge_fields(
        state,
        {
            n: getattr(payload, n)
            for n in ("plan", "mrr_minor", "currency")
            if getattr(payload, n) is not None
        },
        at,
    )
    current, ended = _end_before(state, at, "returned")
    if at >= state.activity_at:
        current = replace(current, activity="active", activity_at=at)
    if at >= state.lifecycle_at:
        was = state.status
        current = replace(current, lifecycle="active", lifecycle_at=at)
        if was in CHURNED or was == "inactive" or ended:
            effects.emit.append(
                (
                    "customer.returned",
                    {
                        "customer": current.snapshot(),
                        "kind": "reactivated",
                        "returned_at": at.isoformat(),
                        "previous_status": was,
                        "ended_episodes": [e[0] for e in ended],
                        "mrr_minor": current.profile.get("mrr_minor"),
                    },
                )
            )
    effects.state = current
    effects.ended.extend(ended)


def _active(effects: Effects, state: CustomerState, at: datetime) -> None:
    current, ended = _end_before(state, at, "returned", kinds={"user_inactive"})
    if at >= state.activity_at:
        current = replace(current, activity="active", activity_at=at)
    if ended:
        effects.emit.append(
            (
                "customer.returned",
                {
                    "customer": current.snapshot(),
                    "kind": "activity",
                    "returned_at": at.isoformat(),
                    "previous_status": "inactive",
                    "ended_episodes": [e[0] for e in ended],
                    "mrr_minor": current.profile.get("mrr_minor"),
                },
            )
        )
    # a churned customer's case may exit on any activity; for everyone else (a returned
    # customer's re-onboarding watches for the lack of it) the first signal of each hour is
    # enough — a product that reports every page view must not become a stream of events
    if state.lifecycle in CHURNED or _hour(at) > _hour(state.activity_at):
        effects.emit.append(
            (
                "customer.activity",
                {"customer_id": state.id, "at": at.isoformat(), "status": state.status},
            )
        )
    effects.state = current
    effects.ended.extend(ended)
