"""The scheduler's handler for the shared loop: domain events from ingest and outcome events
from the dispatcher become cases, step timers, closes and win-backs.

The decisions (segment, playbook, plan, attribution) are the pure domain's and the case
aggregate's; this module only loads what they need, calls them and stores the answer.

Set-based: a batch costs a handful of statements, whatever its size. First the rows the batch
needs, one statement each — its customers (locked), their open cases and then those cases'
steps (locked), the episodes that already have a case. Then each event, in order, is decided
over that state in memory, so events of one customer in one batch see each other's effects as
they would one by one. Then the writes: every case change through one ``store.save_cases``
(one insert for all new cases, one for all their steps), every ``message.*`` outcome through
one ``UPDATE … FROM unnest``, every customer through one upsert. Two things write earlier, to
stay the same as one by one: an event that reads what the events before it wrote (a return
reads the case's sent steps, a feature release its cases) flushes the pending writes first,
and a case changed a second time in a batch (opened, then superseded) has its first change
saved before the second is queued.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.scheduler import store, wake
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
    reonboarding_anchor,
    segment,
)
from services.scheduler.domain.case import (
    Case,
    CaseChange,
    Purpose,
    Refused,
    open_case,
    reonboards,
)
from services.scheduler.domain.planning import normalise_feature
from services.scheduler.domain.playbook import DEFAULT_ATTRIBUTION_HORIZON
from services.scheduler.domain.segmentation import (
    NOT_PASSIVE_STATUSES,
    InactivityRule,
    is_returner,
)
from services.scheduler.views import (
    customer_view,
    episode_from_event,
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
        self,
        playbooks: Sequence[Playbook],
        domain_topic: str,
        fallback_timezone: str = "UTC",
        inactivity: InactivityRule | None = None,
        fiscal_year_start_month: int | None = None,
    ) -> None:
        self.playbooks = list(playbooks)
        self.fiscal_year_start_month = fiscal_year_start_month  # budget_cycle's default
        self.topic = domain_topic
        self.fallback_timezone = fallback_timezone
        # when a customer counts as passive: arms the inactivity timers, reads user.inactive
        self.inactivity = inactivity or InactivityRule()

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
        batch = Batch(tx, self.topic, self.inactivity)
        await batch.load(item.payload for item in items)
        for item in items:
            event: Event = item.payload
            handler = self._routes.get(event.type)
            with correlated(item.event.correlation_id):
                if handler is not None:
                    await handler(self, batch, event, item.event)
                elif event.type in OUTCOME_EVENTS:
                    self._outcome(batch, event)
        await batch.finish()

    # -- ingest's events ----------------------------------------------------------------------
    async def _churn(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        snapshot, ep = event.data["customer"], event.data["episode"]
        cid = snapshot["id"]
        now = b.tx.now
        b.take_snapshot(snapshot)
        if ep["id"] in b.episodes:
            return
        row = b.customers.get(cid)
        if row is None or row["erased_at"] is not None:
            return
        if ep["kind"] == "user_inactive" and not self.inactivity.signal_opens(
            ep.get("days_inactive"), ep.get("usage_drop_percent"), row.get("plan")
        ):
            # a detector's signal below both thresholds: the inactivity timer decides
            log.info("inactivity below the thresholds", extra={"customer_id": cid})
            return
        current = await b.open_case(cid)
        if current is not None:
            superseded = await b.apply(current.supersede(now), cause)
            current = superseded.after if superseded is not None else current
        prior = row["last_won_back_at"]
        episode = episode_from_event(ep, prior)
        if prior is not None and prior > episode.occurred_at:
            episode = episode_from_event(ep, None)
        view = customer_view(row, self.fiscal_year_start_month)
        seg = segment(view, episode, now)
        playbook = choose_playbook(self.playbooks, seg)
        if playbook is None:
            log.info("no playbook matches", extra={"customer_id": cid})
            return
        expires = case_expires_at(playbook, episode)
        if now >= expires:
            return  # churned longer ago than the horizon: not on the list any more
        steps = plan_steps(
            playbook, view, episode, now, segment=seg, fallback_timezone=self.fallback_timezone
        )
        case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-case|{episode.episode_id}"))
        await self._open_case(
            b,
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

    async def _returned(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        """Every return is recorded against the customer's latest win-back case within its
        attribution horizon: an open case closes as ``returned``; on a closed one (horizon,
        unsubscribed, consent withdrawn, superseded, cancelled) only the return is recorded
        (``Case.record_return``). Either way the win-back row says whether a sent step earns
        the credit. A churned customer who came back is re-onboarded (not after an
        unsubscribe) and is a returner from then on (``last_won_back_at``: their next churn is
        a re-churn, credited or not); a converted trial or lead, or a passive user active
        again, gets neither."""
        snapshot = event.data["customer"]
        cid = snapshot["id"]
        b.take_snapshot(snapshot)
        returned_at = datetime.fromisoformat(event.data["returned_at"])
        known = b.customers.get(cid)
        erased = known is None or known["erased_at"] is not None
        if not erased and is_returner(event.data.get("previous_status"), came_back=False):
            # a churned customer back, credited or not, with or without a case: a re-churner
            # if they leave again
            b.set_last_won_back(cid, returned_at)
        case = await b.open_case(cid)
        if case is None:
            row = b.customers.get(cid)
            if row is None or row["erased_at"] is not None:
                return  # an erased customer's closed cases record nothing more
            # no open case: the latest win-back case, as the events before this one left it
            await b.flush()
            case = await store.load_latest_winback_case(b.tx.conn, cid)
            if case is None:
                return
        elif case.purpose != WINBACK:
            return  # a return during re-onboarding: its win-back case has its return
        playbook = self._playbook(case)
        by_activity = event.data.get("kind") == "activity"
        recorded = await b.apply(
            case.record_return(
                b.tx.now,
                returned_at=returned_at,
                by_activity=by_activity,
                playbook=playbook,
                horizon=playbook.return_horizon
                if playbook is not None
                else max(DEFAULT_ATTRIBUTION_HORIZON, case.expires_at - case.churned_at),
            ),
            cause,
        )
        if recorded is None or recorded.after.returned_at is None:
            return  # the exit rules (activity that is no return), outside the horizon
        if recorded.after.came_back:
            b.set_last_won_back(cid, returned_at)
        episode = case.episode
        row = b.customers.get(cid)
        owner = row["crm_owner"] if row is not None else None
        await b.flush()  # the sent steps as the events before this one left them
        conn = b.tx.conn
        sent = await store.sent_steps(conn, case.id, owner)
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
            conn,
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
            b.tx.emit(
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
        if reonboards(recorded):
            # only a churned customer who came back (not a converted trial or lead, not a
            # passive user active again), and not one who said stop
            await self._reonboard(b, cid, recorded.after, returned_at, cause)

    async def _reonboard(
        self, b: Batch, cid: str, closed: Case, returned_at: datetime, cause: CloudEvent
    ) -> None:
        """Open the re-onboarding case of a customer whose win-back case just closed as
        ``returned``: the original churn's segment (what went wrong the first time) picks a
        ``starts_on: returned`` playbook, and its steps are timed from the return."""
        row = b.customers.get(cid)
        if row is None or row["erased_at"] is not None:
            return
        now = b.tx.now
        episode, seg = closed.episode, closed.segment
        playbook = choose_playbook(self.playbooks, seg, starts_on="returned")
        if playbook is None:
            return
        anchored = reonboarding_anchor(episode, returned_at)
        expires = case_expires_at(playbook, anchored)
        if now >= expires:
            return  # returned longer ago than the re-onboarding horizon
        view = customer_view(row)
        steps = plan_reonboarding(
            playbook,
            view,
            episode,
            returned_at,
            now,
            segment=seg,
            fallback_timezone=self.fallback_timezone,
        )
        case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-reonboarding|{episode.episode_id}"))
        await self._open_case(
            b,
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
        b: Batch,
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
        ``current`` is open); it is stored, and ``case.opened`` goes to the outbox, with the
        batch's writes."""
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
            now=b.tx.now,
            current=current,
            feature_key=feature_key,
            return_anchor=return_anchor,
            after_case_id=after_case_id,
        )
        await b.apply(opened, cause)

    async def _activity(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        """Product activity: the last-active register, the customer's inactivity timer pushed
        forward (not for a churned customer: they are no passive user), and the open case
        closed when its playbook exits on activity (a passive-user case: at once)."""
        cid = event.data["customer_id"]
        if event.data.get("at"):
            at = datetime.fromisoformat(event.data["at"])
            b.set_last_active(cid, at)
            row = b.customers.get(cid)
            erased = row is not None and row["erased_at"] is not None
            if not erased and event.data.get("status") not in NOT_PASSIVE_STATUSES:
                b.arm_inactivity(cid, at)
        case = await b.open_case(cid)
        if case is not None:
            closing = case.customer_active(b.tx.now, playbook=self._playbook(case))
            await b.apply(closing, cause)

    async def _consent(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        cid = event.data["customer_id"]
        channel = event.data.get("channel", "all")
        b.set_consent(cid, channel, bool(event.data.get("granted")))
        if not event.data.get("granted"):
            case = await b.open_case(cid)
            if case is not None:  # withdrawn on every channel, the case ends
                await b.apply(case.withdraw_consent(channel, b.tx.now), cause)

    async def _updated(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        b.take_snapshot(event.data["customer"])

    # -- the dispatcher's outcomes ----------------------------------------------------------
    def _outcome(self, b: Batch, event: Event) -> None:
        data = event.data
        if not data.get("case_id") or not data.get("step_key"):
            return
        name = event.type.rsplit(".", 1)[-1]
        outcome = {name: (event.time or b.tx.now).isoformat()}
        for key in ("provider", "provider_message_id", "reason", "confirmed_by"):
            if data.get(key):
                outcome[f"{name}_{key}" if key == "reason" else key] = data[key]
        b.outcomes.append(
            store.Outcome(data["case_id"], data["step_key"], OUTCOME_STATE.get(event.type), outcome)
        )

    async def _unsubscribed(self, b: Batch, event: Event, cause: CloudEvent) -> None:
        # from a message (link, reply STOP, provider report): the step records it too, so
        # the results report can count unsubscribes per step and variant
        self._outcome(b, event)
        cid = event.data["customer_id"]
        channel = event.data.get("channel") or "all"
        b.set_consent(cid, channel, False)
        case = await b.open_case(cid)
        if case is not None:
            # An unsubscribe is the customer saying stop: the case ends, whatever the channel.
            await b.apply(case.unsubscribe(b.tx.now), cause)

    # -- helpers ------------------------------------------------------------------------------
    def _playbook(self, case: Any) -> Playbook | None:
        try:
            return find_playbook(self.playbooks, case.playbook, case.playbook_version)
        except KeyError:
            return None

    _routes: dict[str, Any] = {
        de.CHURN_RECORDED: _churn,
        de.CUSTOMER_RETURNED: _returned,
        de.CUSTOMER_ACTIVITY: _activity,
        de.CONSENT_CHANGED: _consent,
        de.CUSTOMER_UPDATED: _updated,
        # what wakes a churner's case after it opened: services/scheduler/wake.py
        de.FEATURE_RELEASED: wake.feature_released,
        de.FEEDBACK_RECEIVED: wake.feedback,
        de.ISSUE_RESOLVED: wake.issue_resolved,
        de.COMPETITOR_CHANGED: wake.competitor_changed,
        UNSUBSCRIBED: _unsubscribed,
    }


# the events that carry a customer snapshot, name a customer, may change an open case
_SNAPSHOT = frozenset({de.CHURN_RECORDED, de.CUSTOMER_RETURNED, de.CUSTOMER_UPDATED})
_BY_ID = frozenset({de.CUSTOMER_ACTIVITY, de.CONSENT_CHANGED, UNSUBSCRIBED})
_CASE_EVENTS = frozenset(
    {
        de.CHURN_RECORDED,
        de.CUSTOMER_RETURNED,
        de.CUSTOMER_ACTIVITY,
        de.CONSENT_CHANGED,
        UNSUBSCRIBED,
    }
)


class Batch:
    """What one batch of events works on: its rows, loaded set-based and changed in memory
    event by event, and the writes not made yet (made by :meth:`flush` and :meth:`finish`).

    ``customers``: each customer's row as the events so far left it (``None``: no row);
    ``cases``: each customer's open (or paused) case as the events so far left it (``None``:
    none; a customer not in it is read when first needed); ``episodes``: the episodes that
    have a case; ``outcomes``: message outcomes to record, in order.
    """

    def __init__(self, tx: Tx, topic: str, inactivity: InactivityRule | None = None) -> None:
        self.tx = tx
        self.topic = topic
        self.inactivity = inactivity or InactivityRule()
        self.active: dict[str, datetime] = {}  # latest activity per customer: their timers
        self.customers: dict[str, dict[str, Any] | None] = {}
        self.cases: dict[str, Case | None] = {}
        self.episodes: set[str] = set()
        self.outcomes: list[store.Outcome] = []
        self._changed_customers: set[str] = set()
        self._changes: list[CaseChange] = []
        self._causes: list[CloudEvent | None] = []
        self._pending: set[str] = set()  # ids of the cases with a change in _changes

    async def load(self, events: Iterable[Event]) -> None:
        """Read what the events need: their customers (locked), the open cases of the
        customers whose case they may change (cases and steps locked), and which of their
        churn episodes already have a case — one statement each."""
        people: set[str] = set()
        with_cases: set[str] = set()
        episodes: set[str] = set()
        for event in events:
            if event.type in _SNAPSHOT:
                cid = event.data["customer"]["id"]
            elif event.type in _BY_ID:
                cid = event.data["customer_id"]
            else:
                continue
            people.add(cid)
            if event.type in _CASE_EVENTS:
                with_cases.add(cid)
            if event.type == de.CHURN_RECORDED:
                episodes.add(event.data["episode"]["id"])
        conn = self.tx.conn
        rows = await store.lock_customers(conn, list(people))
        self.customers = {cid: rows.get(cid) for cid in people}
        cases = await store.load_open_cases(conn, list(with_cases))
        self.cases = {cid: cases.get(cid) for cid in with_cases}
        self.episodes = await store.episodes_with_cases(conn, list(episodes))

    # -- customers ---------------------------------------------------------------------------
    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's row (read, unlocked, if no event of the batch named them)."""
        if customer_id not in self.customers:
            found = await store.customers(self.tx.conn, [customer_id])
            row = found.get(customer_id)
            self.customers[customer_id] = dict(row._mapping) if row is not None else None
        return self.customers[customer_id]

    def take_snapshot(self, snapshot: dict[str, Any]) -> None:
        """The profile as ingest published it (``store.upsert_customer``): an erased
        customer's row is not written again."""
        cid = snapshot["id"]
        row = self.customers[cid]
        if row is None:
            row = self.customers[cid] = store.new_customer(cid)
        elif row["erased_at"] is not None:
            return
        for name in store.PROFILE:
            if name in snapshot:
                value = snapshot[name]
                if name == "customer_since" and isinstance(value, str):
                    value = datetime.fromisoformat(value)
                row[name] = value
        if "consent" in snapshot:
            row["consent"] = snapshot["consent"] or {}
        if "opted_out_all" in snapshot:
            row["opted_out_all"] = bool(snapshot["opted_out_all"])
        row["updated_at"] = self.tx.now
        self._changed_customers.add(cid)

    def set_consent(self, customer_id: str, channel: str, granted: bool) -> None:
        """Consent on a channel, or on every channel (``all``); a customer without a row
        gets one (``store.set_consent``)."""
        row = self.customers[customer_id]
        if row is None:
            row = self.customers[customer_id] = store.new_customer(customer_id)
        if channel == "all":
            row["opted_out_all"] = not granted
        else:
            row["consent"] = {**(row["consent"] or {}), channel: granted}
        row["updated_at"] = self.tx.now
        self._changed_customers.add(customer_id)

    def set_last_active(self, customer_id: str, at: datetime) -> None:
        """Activity at ``at`` (the register only moves forward: events may arrive late)."""
        self._forward(customer_id, "last_active_at", at)

    def arm_inactivity(self, customer_id: str, at: datetime) -> None:
        """Activity at ``at``: the customer's inactivity timer restarts from it (written by
        :meth:`finish`, one upsert for the batch)."""
        known = self.active.get(customer_id)
        if known is None or known < at:
            self.active[customer_id] = at

    def set_last_won_back(self, customer_id: str, at: datetime) -> None:
        self._forward(customer_id, "last_won_back_at", at)

    def _forward(self, customer_id: str, column: str, at: datetime) -> None:
        row = self.customers[customer_id]
        if row is None:
            return
        if row[column] is None or row[column] <= at:
            row[column] = at
            self._changed_customers.add(customer_id)

    # -- cases -------------------------------------------------------------------------------
    async def open_case(self, customer_id: str) -> Case | None:
        """The customer's open (or paused) case, as the events so far left it."""
        if customer_id not in self.cases:
            self.cases[customer_id] = await store.load_open_case(self.tx.conn, customer_id)
        return self.cases[customer_id]

    def forget_case(self, customer_id: str) -> None:
        """The customer's case was changed outside the aggregate: read it again when needed."""
        self.cases.pop(customer_id, None)

    async def apply(
        self, result: CaseChange | Refused, cause: CloudEvent | None
    ) -> CaseChange | None:
        """Take what a case command returned: the case as it is now, its writes and events
        queued (caused by ``cause``); a refusal changes nothing."""
        if isinstance(result, Refused):
            log.info(
                "case command refused",
                extra={"case_id": result.case_id, "command": result.command, "code": result.code},
            )
            return None
        after = result.after
        if result.changed:
            if after.id in self._pending:
                await self.flush()  # one change per case in a save: the earlier one first
            self._changes.append(result)
            self._causes.append(cause)
            self._pending.add(after.id)
            if result.before is None:
                self.episodes.add(after.episode_id)
        self.cases[after.customer_id] = after if after.is_open else None
        return result

    # -- writing -----------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write the queued outcomes (first: a step they moved is then not cancelled as
        pending by mistake, the case change conflicts instead) and case changes."""
        tx = self.tx
        if self.outcomes:
            await store.record_outcomes(tx.conn, self.outcomes, tx.now)
            self.outcomes = []
        if self._changes:
            await store.save_cases(tx, self.topic, self._changes, causes=self._causes)
            self._changes, self._causes, self._pending = [], [], set()

    async def finish(self) -> None:
        """Write everything the batch changed."""
        await self.flush()
        rows = [self.customers[cid] for cid in sorted(self._changed_customers)]
        await store.write_customers(self.tx.conn, [r for r in rows if r is not None])
        self._changed_customers = set()
        timers = {}
        for cid, at in self.active.items():
            row = self.customers.get(cid)
            timers[cid] = (at, self.inactivity.due_at(at, row["plan"] if row else None))
        await store.arm_inactivity_timers(self.tx.conn, timers, self.tx.now)
        self.active = {}


CONSUMED = frozenset({*SchedulerHandler._routes, *OUTCOME_EVENTS})
"""Every type the scheduler acts on; each is decoded with its contract."""
