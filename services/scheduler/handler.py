"""The scheduler's handler for the shared loop: domain events from ingest and outcome events
from the dispatcher become cases, step timers, closes and win-backs.

The decisions (segment, playbook, plan, attribution) are the pure domain's; this module only
loads what they need, calls them and stores the answer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.scheduler import store
from services.scheduler.domain import (
    ChurnEpisode,
    PlannedStep,
    Playbook,
    Segment,
    attribute_reactivation,
    case_expires_at,
    choose_playbook,
    find_playbook,
    plan_reonboarding,
    plan_steps,
    plan_triggered,
    reonboarding_anchor,
    segment,
)
from services.scheduler.domain.case import Case, CaseChange, Purpose, Refused, open_case
from services.scheduler.domain.planning import normalise_feature
from services.scheduler.views import (
    customer_view,
    episode_from_event,
    episode_from_json,
    segment_from_json,
    step_row,
)
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts import registry as contracts
from shared.contracts.base import Published, Received
from shared.contracts.cases import CaseWonBack
from shared.logging import correlated
from shared.messaging.pipeline import Incoming, Tx

log = logging.getLogger(__name__)

WINBACK: Purpose = "winback"
REONBOARDING: Purpose = "reonboarding"

OUTCOME_STATE = {
    de.MESSAGE_SENT: "sent",
    de.MESSAGE_FAILED: "failed",
    de.MESSAGE_SUPPRESSED: "suppressed",
}
OUTCOME_EVENTS = frozenset(de.MESSAGE_OUTCOMES)
UNSUBSCRIBED = de.CUSTOMER_UNSUBSCRIBED


@dataclass(frozen=True)
class Event:
    """A decoded event: ``data`` is what its contract validated (JSON types, unknown fields
    dropped), ``contract`` the validated model (``None`` for a type this handler ignores)."""

    type: str
    data: dict[str, Any]
    time: datetime | None
    contract: Published | Received | None = None


class SchedulerHandler:
    def __init__(
        self, playbooks: Sequence[Playbook], domain_topic: str, fallback_timezone: str = "UTC"
    ) -> None:
        self.playbooks = list(playbooks)
        self.topic = domain_topic
        self.fallback_timezone = fallback_timezone

    def decode(self, event: CloudEvent) -> Event:
        """Validate the data of every type this handler acts on with its contract
        (``shared.contracts``): a malformed payload raises ``InvalidEvent`` naming the field,
        so it dead-letters here, before any transaction. Fields the contract does not know are
        dropped (a newer producer may add some). Other types on the subscribed topics (our own
        ``case.*``) are not ours to read and pass through unread."""
        if event.type not in CONSUMED:
            return Event(event.type, {}, event.time)
        model = contracts.decode(event.type, event.data, tolerant=True)
        return Event(event.type, model.to_data(), event.time, model)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        for item in items:
            event: Event = item.payload
            handler = self._routes.get(event.type)
            with correlated(item.event.correlation_id):
                if handler is not None:
                    await handler(self, tx, event, item.event)
                elif event.type in OUTCOME_EVENTS:
                    await self._outcome(tx, event)

    # -- ingest's events ----------------------------------------------------------------------
    async def _churn(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        snapshot, ep = event.data["customer"], event.data["episode"]
        cid = snapshot["id"]
        await store.upsert_customer(tx.conn, snapshot, tx.now)
        if await store.case_exists_for_episode(tx.conn, ep["id"]):
            return
        row = await store.customer(tx.conn, cid)
        if row is None or row.erased_at is not None:
            return
        current = await store.load_open_case(tx.conn, cid)
        if current is not None:
            superseded = await self._apply(tx, current.supersede(tx.now), cause)
            current = superseded.after if superseded is not None else current
        prior = row.last_won_back_at
        episode = episode_from_event(ep, prior if prior is not None else None)
        if prior is not None and prior > episode.occurred_at:
            episode = episode_from_event(ep, None)
        view = customer_view(row._mapping)
        seg = segment(view, episode, tx.now)
        playbook = choose_playbook(self.playbooks, seg)
        if playbook is None:
            log.info("no playbook matches", extra={"customer_id": cid})
            return
        expires = case_expires_at(playbook, episode)
        if tx.now >= expires:
            return  # churned longer ago than the horizon: not on the list any more
        steps = plan_steps(
            playbook, view, episode, tx.now, segment=seg, fallback_timezone=self.fallback_timezone
        )
        case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-case|{episode.episode_id}"))
        await self._open_case(
            tx,
            cause,
            case_id=case_id,
            customer_id=cid,
            episode_id=episode.episode_id,
            purpose=WINBACK,
            playbook=playbook,
            seg=seg,
            episode=episode,
            expires=expires,
            steps=steps,
            current=current,
            feature_key=normalise_feature(episode.feature) if episode.feature else None,
        )

    async def _returned(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        snapshot = event.data["customer"]
        cid = snapshot["id"]
        await store.upsert_customer(tx.conn, snapshot, tx.now)
        case = await store.load_open_case(tx.conn, cid)
        if case is None:
            return
        playbook = self._playbook(case)
        returned_at = datetime.fromisoformat(event.data["returned_at"])
        by_activity = event.data.get("kind") == "activity"
        closed = await self._apply(
            tx,
            case.customer_returned(
                tx.now, returned_at=returned_at, by_activity=by_activity, playbook=playbook
            ),
            cause,
        )
        if closed is None or not closed.closed:
            return  # the exit rules (e.g. a return during re-onboarding changes nothing)
        episode = case.episode
        row = await store.customer(tx.conn, cid)
        owner = row.crm_owner if row is not None else None
        sent = await store.sent_steps(tx.conn, case.id, owner)
        window = playbook.attribution_window if playbook else None
        credit = attribute_reactivation(
            [s for _, s in sent],
            episode,
            returned_at,
            mrr_regained_minor=event.data.get("mrr_minor"),
            **({"window": window} if window is not None else {}),
        )
        step_id = next((i for i, s in sent if s is credit.credited), None)
        credited = credit.credited
        await store.record_win_back(
            tx.conn,
            {
                "case_id": case.id,
                "customer_id": cid,
                "step_id": step_id,
                "step_key": credited.step_key if credited else None,
                "channel": credited.channel if credited else None,
                "template": credited.template if credited else None,
                "variant": credited.variant if credited else None,
                "crm_owner": credit.crm_owner if credited else owner,
                "playbook": case.playbook,
                "mrr_regained_minor": credit.mrr_regained_minor,
                "currency": snapshot.get("currency"),
                "days_to_return": credit.days_to_return,
                "holdout": case.holdout,
                "churned_at": episode.occurred_at,
                "returned_at": returned_at,
            },
        )
        if credit.is_win_back and credited is not None:
            await store.set_last_won_back(tx.conn, cid, returned_at)
            tx.emit(
                self.topic,
                cid,
                de.CASE_WON_BACK,
                CaseWonBack(
                    case_id=case.id,
                    customer_id=cid,
                    episode_id=episode.episode_id,
                    playbook=case.playbook,
                    playbook_version=case.playbook_version,
                    step_key=credited.step_key,
                    channel=credited.channel,
                    template=credited.template,
                    variant=credited.variant,
                    offer=credited.offer,
                    crm_owner=credit.crm_owner,
                    mrr_regained_minor=credit.mrr_regained_minor,
                    mrr_at_churn_minor=credit.mrr_at_churn_minor,
                    currency=snapshot.get("currency"),
                    days_to_return=credit.days_to_return,
                    churned_at=episode.occurred_at,
                    returned_at=returned_at,
                ).to_data(),
                cause=cause,
                subject=cid,
            )
        await self._reonboard(tx, cid, closed.after, returned_at, cause)

    async def _reonboard(
        self, tx: Tx, cid: str, closed: Case, returned_at: datetime, cause: CloudEvent
    ) -> None:
        """Open the re-onboarding case of a customer whose win-back case just closed as
        ``returned``: the original churn's segment (what went wrong the first time) picks a
        ``starts_on: returned`` playbook, and its steps are timed from the return."""
        row = await store.customer(tx.conn, cid)
        if row is None or row.erased_at is not None:
            return
        episode, seg = closed.episode, closed.segment
        playbook = choose_playbook(self.playbooks, seg, starts_on="returned")
        if playbook is None:
            return
        anchored = reonboarding_anchor(episode, returned_at)
        expires = case_expires_at(playbook, anchored)
        if tx.now >= expires:
            return  # returned longer ago than the re-onboarding horizon
        view = customer_view(row._mapping)
        steps = plan_reonboarding(
            playbook,
            view,
            episode,
            returned_at,
            tx.now,
            segment=seg,
            fallback_timezone=self.fallback_timezone,
        )
        case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-reonboarding|{episode.episode_id}"))
        await self._open_case(
            tx,
            cause,
            case_id=case_id,
            customer_id=cid,
            episode_id=case_id,
            purpose=REONBOARDING,
            playbook=playbook,
            seg=seg,
            episode=episode,
            expires=expires,
            steps=steps,
            current=closed,
            return_anchor=returned_at,
            after_case_id=closed.id,
        )

    async def _open_case(
        self,
        tx: Tx,
        cause: CloudEvent,
        *,
        case_id: str,
        customer_id: str,
        episode_id: str,
        purpose: Purpose,
        playbook: Playbook,
        seg: Segment,
        episode: ChurnEpisode,
        expires: datetime,
        steps: Sequence[PlannedStep],
        current: Case | None,
        feature_key: str | None = None,
        return_anchor: datetime | None = None,
        after_case_id: str | None = None,
    ) -> None:
        """Open a case with its planned steps (the aggregate's ``open_case``: refused while
        ``current`` is open) and store it; ``case.opened`` goes to the outbox."""
        opened = open_case(
            case_id=case_id,
            customer_id=customer_id,
            episode_id=episode_id,
            purpose=purpose,
            playbook=playbook,
            segment=seg,
            episode=episode,
            expires_at=expires,
            steps=steps,
            now=tx.now,
            current=current,
            feature_key=feature_key,
            return_anchor=return_anchor,
            after_case_id=after_case_id,
        )
        await self._apply(tx, opened, cause)

    async def _activity(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        cid = event.data["customer_id"]
        if event.data.get("at"):
            await store.set_last_active(tx.conn, cid, datetime.fromisoformat(event.data["at"]))
        case = await store.load_open_case(tx.conn, cid)
        if case is not None:
            closing = case.customer_active(tx.now, playbook=self._playbook(case))
            await self._apply(tx, closing, cause)

    async def _consent(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        cid = event.data["customer_id"]
        channel = event.data.get("channel", "all")
        await store.set_consent(tx.conn, cid, channel, bool(event.data.get("granted")), tx.now)
        if not event.data.get("granted"):
            case = await store.load_open_case(tx.conn, cid)
            if case is not None:  # withdrawn on every channel, the case ends
                await self._apply(tx, case.withdraw_consent(channel, tx.now), cause)

    async def _updated(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        await store.upsert_customer(tx.conn, event.data["customer"], tx.now)

    async def _feature(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        feature = event.data["feature"]
        for case in await store.open_cases_for_feature(tx.conn, normalise_feature(feature)):
            playbook = self._playbook(case)
            row = await store.customer(tx.conn, case.customer_id)
            if playbook is None or row is None or case.status != "open":
                continue
            steps = plan_triggered(
                playbook,
                customer_view(row._mapping),
                episode_from_json(case.episode),
                tx.now,
                feature=feature,
                segment=segment_from_json(case.segment),
                already_planned=await store.step_keys(tx.conn, case.id),
            )
            context = {
                "feature": event.data.get("name") or feature,
                "feature_description": event.data.get("description"),
            }
            await store.insert_steps(
                tx.conn, [step_row(case.id, case.customer_id, s, context) for s in steps]
            )

    # -- the dispatcher's outcomes ----------------------------------------------------------
    async def _outcome(self, tx: Tx, event: Event) -> None:
        data = event.data
        if not data.get("case_id") or not data.get("step_key"):
            return
        name = event.type.rsplit(".", 1)[-1]
        outcome = {name: (event.time or tx.now).isoformat()}
        for key in ("provider", "provider_message_id", "reason"):
            if data.get(key):
                outcome[f"{name}_{key}" if key == "reason" else key] = data[key]
        await store.record_outcome(
            tx.conn,
            data["case_id"],
            data["step_key"],
            OUTCOME_STATE.get(event.type),
            outcome,
            tx.now,
        )

    async def _unsubscribed(self, tx: Tx, event: Event, cause: CloudEvent) -> None:
        # from a message (link, reply STOP, provider report): the step records it too, so
        # the results report can count unsubscribes per step and variant
        await self._outcome(tx, event)
        cid = event.data["customer_id"]
        channel = event.data.get("channel") or "all"
        await store.set_consent(tx.conn, cid, channel, False, tx.now)
        case = await store.load_open_case(tx.conn, cid)
        if case is not None:
            # An unsubscribe is the customer saying stop: the case ends, whatever the channel.
            await self._apply(tx, case.unsubscribe(tx.now), cause)

    # -- helpers ------------------------------------------------------------------------------
    def _playbook(self, case: Any) -> Playbook | None:
        try:
            return find_playbook(self.playbooks, case.playbook, case.playbook_version)
        except KeyError:
            return None

    async def _apply(
        self, tx: Tx, result: CaseChange | Refused, cause: CloudEvent | None
    ) -> CaseChange | None:
        """Store what a case command returned (its events go to the outbox, caused by
        ``cause``); a refusal changes nothing."""
        if isinstance(result, Refused):
            log.info(
                "case command refused",
                extra={"case_id": result.case_id, "command": result.command, "code": result.code},
            )
            return None
        await store.save_cases(tx, self.topic, [result], cause)
        return result

    _routes: dict[str, Any] = {
        de.CHURN_RECORDED: _churn,
        de.CUSTOMER_RETURNED: _returned,
        de.CUSTOMER_ACTIVITY: _activity,
        de.CONSENT_CHANGED: _consent,
        de.CUSTOMER_UPDATED: _updated,
        de.FEATURE_RELEASED: _feature,
        UNSUBSCRIBED: _unsubscribed,
    }


CONSUMED = frozenset({*SchedulerHandler._routes, *OUTCOME_EVENTS})
"""Every type the scheduler acts on; each is decoded with its contract."""
