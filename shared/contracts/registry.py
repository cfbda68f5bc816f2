"""Every event type winback publishes or consumes, in one table: its ``data`` model, the topic
it travels on (a field of ``shared.settings.TopicSettings``), who produces it and who acts on
it, what the record is keyed by, and an example.

Producers build an event's data with the model (``DispatchCommand(...).to_data()``); consumers
decode it with ``decode(event_type, data)``, which names the field at fault in an
``InvalidEvent`` so the record dead-letters at decode time. The AsyncAPI document
(``winback asyncapi``) is generated from this table and the topic settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from shared import domain_events as de
from shared.contracts import examples
from shared.contracts.base import Published, Received
from shared.contracts.cases import CaseClosed, CaseMigrated, CaseOpened, CaseWonBack
from shared.contracts.customer import (
    ChurnRecorded,
    CompetitorNews,
    ConsentChanged,
    CustomerActivity,
    CustomerErased,
    CustomerReturned,
    CustomerUnsubscribed,
    FeatureAnnounced,
    FeedbackRecorded,
    IssueAnnounced,
    ProfileUpdated,
)
from shared.contracts.dispatch import DispatchCommand
from shared.contracts.inbound import INBOUND as INBOUND_MODELS
from shared.contracts.messages import MessageOutcome
from shared.errors import InvalidEvent

Topic: TypeAlias = Literal["inbound", "domain", "dispatch", "outcomes", "erasure"]
"""A field of ``TopicSettings`` (``inbound`` is a list of topics: each carries every inbound
type)."""
Service: TypeAlias = Literal["ingest", "scheduler", "dispatcher"]
EXTERNAL = "billing and product systems"

SERVICES: tuple[Service, ...] = ("ingest", "scheduler", "dispatcher")


@dataclass(frozen=True)
class Contract:
    """One event type. ``name`` is the type for our own events (``dev.winback.case.opened``)
    and the type without the configurable prefix for inbound ones (``trial.expired``)."""

    name: str
    model: type[Published] | type[Received]
    topic: Topic
    producers: tuple[str, ...]
    consumers: tuple[Service, ...]
    key: str
    summary: str
    example: Mapping[str, Any]

    @property
    def inbound(self) -> bool:
        return self.topic == "inbound"

    def event_type(self, inbound_prefix: str) -> str:
        """The CloudEvent ``type`` on the wire."""
        return f"{inbound_prefix.rstrip('.')}.{self.name}" if self.inbound else self.name

    def decode(self, data: Any, *, tolerant: bool = True) -> Published | Received:
        """Validate ``data``; ``InvalidEvent`` (``invalid_payload``) names the field."""
        return self.model.decode(data, tolerant=tolerant)


_INBOUND_SUMMARIES = {
    "subscription.cancelled": "A paying customer cancelled their subscription.",
    "subscription.reactivated": "A customer's subscription started again.",
    "subscription.created": "A subscription was created (a return when the customer churned).",
    "trial.expired": "A trial ended without a purchase.",
    "lead.lost": "Sales lost a lead.",
    "user.inactive": "A customer stopped using the product.",
    "user.active": "A customer used the product.",
    "feature.released": "A feature shipped.",
    "feedback.received": "An exit-survey answer: reason, comment, tags.",
    "issue.resolved": "A problem was fixed: its tags and the features it touches.",
    "competitor.changed": "A competitor raised prices, had an outage, sunset a product.",
    "consent.withdrawn": "A customer withdrew consent on a channel (or all).",
    "customer.updated": "A customer's profile changed.",
}
_BY_CUSTOMER = "customer id"
_INBOUND_KEYS = {
    "feature.released": "feature id",
    "issue.resolved": "issue id",
    "competitor.changed": "competitor",
}


def _inbound() -> list[Contract]:
    return [
        Contract(
            name=name,
            model=model,
            topic="inbound",
            producers=(EXTERNAL,),
            consumers=("ingest",),
            key=_INBOUND_KEYS.get(name, _BY_CUSTOMER),
            summary=_INBOUND_SUMMARIES[name],
            example=examples.INBOUND[name],
        )
        for name, model in INBOUND_MODELS.items()
    ]


def _ours(
    name: str,
    model: type[Published],
    topic: Topic,
    producer: Service,
    consumers: tuple[Service, ...],
    summary: str,
    key: str = _BY_CUSTOMER,
) -> Contract:
    short = name.removeprefix(de.PREFIX + ".")
    return Contract(
        name, model, topic, (producer,), consumers, key, summary, examples.PUBLISHED[short]
    )


_MESSAGE_SUMMARIES = {
    de.MESSAGE_SENT: "The provider accepted the message.",
    de.MESSAGE_FAILED: "The message could not be sent (or a provider reported it failed).",
    de.MESSAGE_SUPPRESSED: "The message was not sent: the re-check at send time said no.",
    de.MESSAGE_DELIVERED: "The provider reports the message delivered.",
    de.MESSAGE_OPENED: "The provider reports the message opened.",
    de.MESSAGE_CLICKED: "The provider reports a link in the message clicked.",
    de.MESSAGE_BOUNCED: "The provider reports the message bounced.",
    de.MESSAGE_COMPLAINED: "The recipient marked the message as spam.",
}

CONTRACTS: tuple[Contract, ...] = (
    *_inbound(),
    _ours(
        de.CHURN_RECORDED,
        ChurnRecorded,
        "domain",
        "ingest",
        ("scheduler",),
        "A churn episode opened: the scheduler opens a win-back case.",
    ),
    _ours(
        de.CUSTOMER_RETURNED,
        CustomerReturned,
        "domain",
        "ingest",
        ("scheduler",),
        "A churned or inactive customer came back: the case closes, the return is credited.",
    ),
    _ours(
        de.CUSTOMER_ACTIVITY,
        CustomerActivity,
        "domain",
        "ingest",
        ("scheduler",),
        "Product activity: may end a case; re-onboarding watches for the lack of it.",
    ),
    _ours(
        de.CUSTOMER_UPDATED,
        ProfileUpdated,
        "domain",
        "ingest",
        ("scheduler",),
        "The customer's profile changed.",
    ),
    _ours(
        de.CONSENT_CHANGED,
        ConsentChanged,
        "domain",
        "ingest",
        ("scheduler",),
        "Consent withdrawn on a channel; withdrawn on all of them closes the open case.",
    ),
    _ours(
        de.FEATURE_RELEASED,
        FeatureAnnounced,
        "domain",
        "ingest",
        ("scheduler",),
        "A feature shipped: cases waiting for it get their triggered steps.",
        key="feature id",
    ),
    _ours(
        de.FEEDBACK_RECEIVED,
        FeedbackRecorded,
        "domain",
        "ingest",
        ("scheduler",),
        "An exit-survey answer: the open case's reason is refined (and its track may change).",
    ),
    _ours(
        de.ISSUE_RESOLVED,
        IssueAnnounced,
        "domain",
        "ingest",
        ("scheduler",),
        "A problem was fixed: cases whose reason, feature or tags it names get their steps.",
        key="issue id",
    ),
    _ours(
        de.COMPETITOR_CHANGED,
        CompetitorNews,
        "domain",
        "ingest",
        ("scheduler",),
        "Something happened at a competitor: cases of customers who left for it wake.",
        key="competitor",
    ),
    _ours(
        de.CUSTOMER_ERASED,
        CustomerErased,
        "erasure",
        "scheduler",
        ("ingest", "dispatcher"),
        "GDPR erasure: every service removes the person's data.",
    ),
    _ours(
        de.DISPATCH_REQUESTED,
        DispatchCommand,
        "dispatch",
        "scheduler",
        ("dispatcher",),
        "Send one step of a case.",
    ),
    _ours(
        de.CASE_OPENED,
        CaseOpened,
        "outcomes",
        "scheduler",
        (),
        "A win-back or re-onboarding case opened.",
    ),
    _ours(
        de.CASE_CLOSED,
        CaseClosed,
        "outcomes",
        "scheduler",
        (),
        "A case closed, with the reason.",
    ),
    _ours(
        de.CASE_WON_BACK,
        CaseWonBack,
        "outcomes",
        "scheduler",
        (),
        "A return credited to the last touch.",
    ),
    _ours(
        de.CASE_MIGRATED,
        CaseMigrated,
        "outcomes",
        "scheduler",
        (),
        "An open case moved to another version of its playbook.",
    ),
    *(
        _ours(name, MessageOutcome, "outcomes", "dispatcher", ("scheduler",), summary)
        for name, summary in _MESSAGE_SUMMARIES.items()
    ),
    _ours(
        de.CUSTOMER_UNSUBSCRIBED,
        CustomerUnsubscribed,
        "outcomes",
        "dispatcher",
        ("scheduler",),
        "The person unsubscribed (link, provider report or STOP reply): the case closes.",
    ),
)

PUBLISHED: Mapping[str, Contract] = {c.name: c for c in CONTRACTS if not c.inbound}
"""Our own events by CloudEvent type."""
INBOUND: Mapping[str, Contract] = {c.name: c for c in CONTRACTS if c.inbound}
"""Inbound events by type name without the prefix."""


def contract_for(event_type: str, inbound_prefix: str | None = None) -> Contract | None:
    """The contract of a CloudEvent type (inbound types need the prefix), or ``None``."""
    if event_type in PUBLISHED:
        return PUBLISHED[event_type]
    if inbound_prefix is not None:
        head = inbound_prefix.rstrip(".") + "."
        if event_type.startswith(head):
            return INBOUND.get(event_type[len(head) :])
    return None


def decode(
    event_type: str, data: Any, *, inbound_prefix: str | None = None, tolerant: bool = True
) -> Published | Received:
    """Validate an event's ``data`` by its type: ``InvalidEvent`` ``unknown_type`` (field
    ``type``) or ``invalid_payload`` naming the field. ``tolerant=False`` also refuses fields
    the contract does not declare (what the contract tests check producers with)."""
    contract = contract_for(event_type, inbound_prefix)
    if contract is None:
        raise InvalidEvent("unknown_type", f"{event_type[:100]!r} has no contract", "type")
    return contract.decode(data, tolerant=tolerant)
