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
applies, whatever its time: an objection to direct marketing is absolute. So does erasure
(``customer.erased``, ``erased``): an erased customer's later events never bring back the
fields erasure removed (``ERASED_FIELDS``, and free-text comments).

Events without a customer (``feature.released``, ``issue.resolved``, ``competitor.changed``)
are announcements: each publishes its contract's model and changes nobody (``announce``).

Events are applied to a ``Draft``: the customer's state, changed in place while a batch's
events are folded into it (``apply_to``), so no event rebuilds a frozen state register by
register. ``apply`` is the same step on a frozen ``CustomerState``.

What an event publishes is built with its contract's model (``shared.contracts.customer``):
``Effects.emit`` holds the models, the handler takes each one's type from the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from services.ingest.events import Inbound
from services.ingest.reasons import normalise_reason
from shared.contracts.base import Published
from shared.contracts.customer import (
    ChurnEpisodeData,
    ChurnRecorded,
    CompetitorNews,
    ConsentChanged,
    CustomerActivity,
    CustomerReturned,
    CustomerSnapshot,
    FeatureAnnounced,
    FeedbackRecorded,
    IssueAnnounced,
    ProfileUpdated,
)
from shared.contracts.inbound import (
    CompetitorChanged,
    ConsentWithdrawn,
    CustomerEvent,
    FeatureReleased,
    FeedbackReceived,
    IssueResolved,
    Profile,
    SubscriptionReactivated,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ACTIVITY_BUCKET = timedelta(hours=1)
"""At most one ``customer.activity`` per clock hour for a customer who is not churned."""


def _hour(at: datetime) -> int:
    return int((at - EPOCH) // ACTIVITY_BUCKET)


Lifecycle = Literal["unknown", "active", "churned", "trial_expired", "lead_lost"]
Activity = Literal["unknown", "active", "inactive"]
CHURNED: frozenset[str] = frozenset({"churned", "trial_expired", "lead_lost"})
PROFILE_FIELDS: tuple[str, ...] = tuple(Profile.model_fields)
"""The profile fields, in the inbound contract's order (the customers table's too)."""
ERASED_FIELDS: frozenset[str] = frozenset({"email", "phone", "name"})
"""What erasure removes from the profile (``services.ingest.erasure``): an erased customer's
later events never write them again."""
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
    erased: bool = False

    @property
    def status(self) -> str:
        """One word for people and queries: churned-like lifecycle first, then inactivity."""
        return status_of(self.lifecycle, self.activity)

    def snapshot(self) -> CustomerSnapshot:
        return _snapshot(self)


class Draft:
    """A customer's state while events are applied to it, changed in place; ``freeze()`` makes
    the ``CustomerState``. Holds copies: the state it was made from is never changed."""

    __slots__ = (
        "activity",
        "activity_at",
        "consent",
        "erased",
        "id",
        "lifecycle",
        "lifecycle_at",
        "open_episodes",
        "opted_out_all",
        "profile",
        "profile_times",
    )

    def __init__(self, state: CustomerState) -> None:
        self.id = state.id
        self.profile = dict(state.profile)
        self.profile_times = dict(state.profile_times)
        self.lifecycle: Lifecycle = state.lifecycle
        self.lifecycle_at = state.lifecycle_at
        self.activity: Activity = state.activity
        self.activity_at = state.activity_at
        self.consent = dict(state.consent)
        self.opted_out_all = state.opted_out_all
        self.open_episodes = list(state.open_episodes)
        self.erased = state.erased

    @classmethod
    def new(cls, customer_id: str) -> Draft:
        """A customer not seen before."""
        draft = cls(_UNKNOWN)
        draft.id = customer_id
        return draft

    @property
    def status(self) -> str:
        return status_of(self.lifecycle, self.activity)

    def snapshot(self) -> CustomerSnapshot:
        return _snapshot(self)

    def freeze(self) -> CustomerState:
        return CustomerState(
            id=self.id,
            profile=dict(self.profile),
            profile_times=dict(self.profile_times),
            lifecycle=self.lifecycle,
            lifecycle_at=self.lifecycle_at,
            activity=self.activity,
            activity_at=self.activity_at,
            consent=dict(self.consent),
            opted_out_all=self.opted_out_all,
            open_episodes=tuple(self.open_episodes),
            erased=self.erased,
        )

    def differs_from(self, state: CustomerState | None) -> bool:
        """Whether this draft holds anything ``state`` (where it started) does not."""
        return (
            state is None
            or self.lifecycle != state.lifecycle
            or self.lifecycle_at != state.lifecycle_at
            or self.activity != state.activity
            or self.activity_at != state.activity_at
            or self.opted_out_all != state.opted_out_all
            or self.profile != state.profile
            or self.profile_times != state.profile_times
            or self.consent != state.consent
            or tuple(self.open_episodes) != state.open_episodes
        )


_UNKNOWN = CustomerState(id="")


def status_of(lifecycle: str, activity: str) -> str:
    """One word for people and queries: churned-like lifecycle first, then inactivity."""
    if lifecycle in CHURNED:
        return lifecycle
    if activity == "inactive":
        return "inactive"
    if "active" in (lifecycle, activity):
        return "active"
    return "unknown"


_NO_PROFILE: dict[str, Any] = dict.fromkeys(PROFILE_FIELDS)


def _snapshot(customer: CustomerState | Draft) -> CustomerSnapshot:
    """The customer as published: id, every profile field, status, consent."""
    data: dict[str, Any] = {"id": customer.id, **_NO_PROFILE}
    for name, value in customer.profile.items():
        if name in _NO_PROFILE:
            data[name] = value
    data["status"] = status_of(customer.lifecycle, customer.activity)
    data["consent"] = dict(customer.consent)
    data["opted_out_all"] = customer.opted_out_all
    # validated from a dict: the profile is one already (and the constructor is slower)
    return CustomerSnapshot.model_validate(data)


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

    def public(self) -> ChurnEpisodeData:
        """The episode as published: no free-text comment (it may hold PII)."""
        return ChurnEpisodeData(
            id=self.id,
            kind=self.kind,
            reason=self.reason,
            reason_raw=self.reason_raw,
            feature=self.feature,
            competitor=self.competitor,
            occurred_at=self.occurred_at,
            mrr_at_churn_minor=self.mrr_at_churn_minor,
            currency=self.currency,
            tenure_days=self.tenure_days,
        )


@dataclass
class Effects:
    """What applying one event changes: the new state (``apply``; ``apply_to`` changes its
    draft instead), rows to write, events to emit (their contracts' models)."""

    state: CustomerState | None
    new_episode: Episode | None = None
    ended: list[tuple[str, datetime, str]] = field(default_factory=list)
    emit: list[Published] = field(default_factory=list)
    refined: list[Refinement] = field(default_factory=list)


@dataclass(frozen=True)
class Refinement:
    """An exit-survey answer written onto an open episode: its reason (and comment)."""

    episode_id: str
    reason: str | None
    reason_raw: str | None
    comment: str | None


def episode_id(source: str, event_id: str) -> str:
    return hashlib.sha256(f"{source}|{event_id}".encode()).hexdigest()[:32]


def _merge_fields(draft: Draft, fields: dict[str, Any], at: datetime) -> bool:
    """Take each field whose last write is older than ``at`` (ties: the later arrival);
    whether any was taken."""
    taken = False
    times = draft.profile_times
    for name, value in fields.items():
        if draft.erased and name in ERASED_FIELDS:
            continue  # erasure sticks: a later event never writes a removed field back
        if at >= times.get(name, EPOCH):
            draft.profile[name] = value
            times[name] = at
            taken = True
    return taken


def _end_before(
    draft: Draft, at: datetime, reason: str, kinds: set[str] | None = None
) -> list[tuple[str, datetime, str]]:
    """End the open episodes (of ``kinds``) that began at or before ``at``."""
    keep, ended = [], []
    for episode in draft.open_episodes:
        if episode.occurred_at <= at and (kinds is None or episode.kind in kinds):
            ended.append((episode.id, at, reason))
        else:
            keep.append(episode)
    if ended:
        draft.open_episodes = keep
    return ended


def apply(
    state: CustomerState | None,
    inbound: Inbound,
    source: str,
    event_id: str,
) -> Effects:
    """Apply one validated inbound event to a customer's state (``None`` = unknown)."""
    payload = inbound.payload
    if not isinstance(payload, CustomerEvent):
        return announce(inbound)
    draft = Draft(state) if state is not None else Draft.new(payload.customer_id)
    effects = apply_to(draft, inbound, source, event_id)
    effects.state = draft.freeze()
    return effects


def apply_to(draft: Draft, inbound: Inbound, source: str, event_id: str) -> Effects:
    """Apply one validated customer event to ``draft`` in place (``effects.state`` stays
    ``None``): the effects of ``apply`` with the same state."""
    payload = inbound.payload
    assert isinstance(payload, CustomerEvent)
    at = inbound.occurred_at
    name = inbound.name
    merged = _merge_fields(draft, payload.customer.fields_set(), at)
    effects = Effects(state=None)
    if name in LIFECYCLE_CHURN:
        _churn(effects, draft, inbound, source, event_id)
    elif name == "user.inactive":
        _inactive(effects, draft, inbound, source, event_id)
    elif name in ("subscription.reactivated", "subscription.created"):
        _reactivated(effects, draft, inbound)
    elif name == "user.active":
        _active(effects, draft, at)
    elif name == "consent.withdrawn":
        assert isinstance(payload, ConsentWithdrawn)
        if payload.channel == "all":
            draft.opted_out_all = True
        else:
            draft.consent[payload.channel] = False
        effects.emit.append(
            ConsentChanged(
                customer_id=draft.id,
                channel=payload.channel,
                granted=False,
                at=at,
                customer=draft.snapshot(),
            )
        )
    elif name == "feedback.received":
        _feedback(effects, draft, inbound)
    elif name == "customer.updated" and merged:
        effects.emit.append(ProfileUpdated(customer=draft.snapshot()))
    return effects


def announce(inbound: Inbound) -> Effects:
    """An event without a customer: what it publishes (no state changes)."""
    payload, at = inbound.payload, inbound.occurred_at
    model: Published
    if isinstance(payload, FeatureReleased):
        model = FeatureAnnounced(
            feature=payload.feature,
            name=payload.name,
            description=payload.description,
            released_at=at,
        )
    elif isinstance(payload, IssueResolved):
        model = IssueAnnounced(
            issue=payload.issue,
            title=payload.title,
            tags=list(payload.tags),
            features=list(payload.features),
            resolved_at=at,
        )
    elif isinstance(payload, CompetitorChanged):
        model = CompetitorNews(
            competitor=payload.competitor, kind=payload.kind, note=payload.note, changed_at=at
        )
    else:  # pragma: no cover - every inbound type without a customer is listed above
        raise TypeError(f"{type(payload).__name__} is no announcement")
    return Effects(state=None, emit=[model])


def announcement_key(model: Published) -> str:
    """The record key of an announcement: its feature, issue or competitor."""
    if isinstance(model, FeatureAnnounced):
        return model.feature
    if isinstance(model, IssueAnnounced):
        return model.issue
    if isinstance(model, CompetitorNews):
        return model.competitor
    return ""


def _feedback(effects: Effects, draft: Draft, inbound: Inbound) -> None:
    """An exit-survey answer: the reason of the latest open episode is refined (a survey
    answered with no open episode is published all the same: the scheduler decides)."""
    payload = inbound.payload
    assert isinstance(payload, FeedbackReceived)
    reason = normalise_reason(payload.reason)
    latest = max(draft.open_episodes, key=lambda e: e.occurred_at, default=None)
    if latest is not None and (payload.reason is not None or payload.comment is not None):
        effects.refined.append(
            Refinement(
                latest.id,
                reason if payload.reason is not None else None,
                payload.reason,
                None if draft.erased else payload.comment,
            )
        )
    effects.emit.append(
        FeedbackRecorded(
            customer_id=draft.id,
            reason=reason,
            reason_raw=payload.reason,
            tags=list(payload.tags),
            episode_id=latest.id if latest is not None else None,
            received_at=inbound.occurred_at,
        )
    )


def _episode(
    draft: Draft,
    inbound: Inbound,
    kind: str,
    source: str,
    event_id: str,
    ended_at: datetime | None = None,
    end_reason: str | None = None,
) -> Episode:
    payload = inbound.payload
    at = inbound.occurred_at
    reason_raw = getattr(payload, "reason", None)
    if kind == "user_inactive":
        reason_raw = reason_raw or "unused"
    mrr = getattr(payload, "mrr_minor", None)
    if mrr is None:
        mrr = draft.profile.get("mrr_minor")
    since = draft.profile.get("customer_since")
    return Episode(
        id=episode_id(source, event_id),
        customer_id=draft.id,
        kind=kind,
        reason=normalise_reason(reason_raw),
        reason_raw=reason_raw,
        comment=None if draft.erased else getattr(payload, "comment", None),
        feature=getattr(payload, "feature", None),
        competitor=getattr(payload, "competitor", None),
        occurred_at=at,
        mrr_at_churn_minor=mrr,
        currency=getattr(payload, "currency", None) or draft.profile.get("currency"),
        tenure_days=(at - since).days if isinstance(since, datetime) and since <= at else None,
        source=source,
        source_event_id=event_id,
        ended_at=ended_at,
        end_reason=end_reason,
    )


def _open(effects: Effects, draft: Draft, episode: Episode) -> None:
    """Open ``episode``; it supersedes every open episode that began before it."""
    ended = _end_before(draft, episode.occurred_at, "superseded")
    draft.open_episodes.append(OpenEpisode(episode.id, episode.kind, episode.occurred_at))
    effects.new_episode = episode
    effects.ended.extend(ended)
    effects.emit.append(
        ChurnRecorded(
            customer=draft.snapshot(),
            episode=episode.public(),
            superseded=[e[0] for e in ended],
        )
    )


def _churn(effects: Effects, draft: Draft, inbound: Inbound, source: str, event_id: str) -> None:
    at = inbound.occurred_at
    kind, lifecycle = LIFECYCLE_CHURN[inbound.name]
    if at < draft.lifecycle_at:
        # Stale: something newer already decided the lifecycle. Keep the history only.
        end_reason = "returned" if draft.lifecycle == "active" else "superseded"
        effects.new_episode = _episode(
            draft, inbound, kind, source, event_id, draft.lifecycle_at, end_reason
        )
        return
    episode = _episode(draft, inbound, kind, source, event_id)
    draft.lifecycle = lifecycle
    draft.lifecycle_at = at
    _open(effects, draft, episode)


def _inactive(effects: Effects, draft: Draft, inbound: Inbound, source: str, event_id: str) -> None:
    at = inbound.occurred_at
    if at < draft.activity_at:
        return  # activity seen after this: the customer was not inactive
    draft.activity = "inactive"
    draft.activity_at = at
    if draft.lifecycle in CHURNED:
        return  # already churned: an open case covers them
    if any(e.kind == "user_inactive" for e in draft.open_episodes):
        return  # still the same spell of inactivity
    _open(effects, draft, _episode(draft, inbound, "user_inactive", source, event_id))


def _reactivated(effects: Effects, draft: Draft, inbound: Inbound) -> None:
    payload = inbound.payload
    assert isinstance(payload, SubscriptionReactivated)
    at = inbound.occurred_at
    _merge_fields(
        draft,
        {
            n: getattr(payload, n)
            for n in ("plan", "mrr_minor", "currency")
            if getattr(payload, n) is not None
        },
        at,
    )
    was = draft.status
    activity_at, lifecycle_at = draft.activity_at, draft.lifecycle_at
    ended = _end_before(draft, at, "returned")
    if at >= activity_at:
        draft.activity = "active"
        draft.activity_at = at
    if at >= lifecycle_at:
        draft.lifecycle = "active"
        draft.lifecycle_at = at
        if was in CHURNED or was == "inactive" or ended:
            effects.emit.append(
                CustomerReturned(
                    customer=draft.snapshot(),
                    kind="reactivated",
                    returned_at=at,
                    previous_status=was,
                    ended_episodes=[e[0] for e in ended],
                    mrr_minor=draft.profile.get("mrr_minor"),
                )
            )
    effects.ended.extend(ended)


def _active(effects: Effects, draft: Draft, at: datetime) -> None:
    lifecycle, activity_at, status = draft.lifecycle, draft.activity_at, draft.status
    ended = _end_before(draft, at, "returned", kinds={"user_inactive"})
    if at >= activity_at:
        draft.activity = "active"
        draft.activity_at = at
    if ended:
        effects.emit.append(
            CustomerReturned(
                customer=draft.snapshot(),
                kind="activity",
                returned_at=at,
                previous_status="inactive",
                ended_episodes=[e[0] for e in ended],
                mrr_minor=draft.profile.get("mrr_minor"),
            )
        )
    # a churned customer's case may exit on any activity; for everyone else (a returned
    # customer's re-onboarding watches for the lack of it) the first signal of each hour is
    # enough — a product that reports every page view must not become a stream of events
    if lifecycle in CHURNED or _hour(at) > _hour(activity_at):
        effects.emit.append(
            CustomerActivity(
                customer_id=draft.id,
                at=at,
                status=status,
            )
        )
    effects.ended.extend(ended)
