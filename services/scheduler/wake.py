"""What wakes a churner's case after it opened: a survey answer, a fix, a competitor's news.

* ``feedback.received`` (an exit-survey answer): the open win-back case's reason is refined.
  When the refined reason picks another playbook, the case moves to that track: it is
  superseded (the aggregate's ``supersede``) and a case of the matching playbook opens for the
  same churn, timed from it (a step whose time has passed follows the planner's late-churn
  rule). When the playbook stays the same, the refined reason is recorded on the case's
  episode (reports group by it) and nothing is re-planned.
* ``feature.released`` and ``issue.resolved``: every open (or paused) win-back case whose
  episode they name — the feature (``normalise_feature``), or for a fix its ``features``, or
  a tag that is the episode's reason (one of ``shared.churn.CHURN_REASONS``) or its feature —
  gets its playbook's steps with that ``trigger``, due now, however long ago the customer
  left as long as the case horizon has not passed. A paused case gets them too: they fire
  when it resumes.
* ``competitor.changed``: the same for the cases whose episode names that competitor
  (compared like features); the step's dispatch command carries the competitor and the news.

Each step key is planned once per case: a second release, fix or news sends nothing twice.
The events are rare; the cases they wake are read (locked) from the database as the events
before them in the batch left them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduler import store
from services.scheduler.domain import (
    ChurnEpisode,
    CustomerView,
    PlannedStep,
    Playbook,
    Segment,
    case_expires_at,
    choose_playbook,
    plan_steps,
    segment,
)
from services.scheduler.domain.planning import normalise_feature, plan_step
from services.scheduler.domain.variants import in_holdout
from services.scheduler.views import (
    customer_view,
    episode_from_json,
    segment_from_json,
    step_row,
)
from shared.churn import CHURN_REASONS
from shared.cloudevents import CloudEvent
from shared.db.tables import cases

if TYPE_CHECKING:
    from services.scheduler.handler import Batch, Event, SchedulerHandler

log = logging.getLogger(__name__)

FEATURE_RELEASED = "feature.released"
ISSUE_RESOLVED = "issue.resolved"
COMPETITOR_CHANGED = "competitor.changed"


# -- the rules (pure) ---------------------------------------------------------------------------
def fix_names(episode: ChurnEpisode, features: Iterable[str], tags: Iterable[str]) -> bool:
    """Whether a fix (``issue.resolved``) names what made this customer leave: one of its
    features is the episode's feature, or a tag is the episode's reason (a normalised churn
    reason) or its feature."""
    named = {normalise_feature(f) for f in (*features, *tags)}
    if episode.feature is not None and normalise_feature(episode.feature) in named:
        return True
    return episode.reason != "unknown" and episode.reason in tag_reasons(tags)


def tag_reasons(tags: Iterable[str]) -> set[str]:
    """The tags that are churn reasons (``shared.churn.CHURN_REASONS``, spelled like features:
    ``Poor experience`` is ``poor_experience``); never ``unknown``."""
    spelled = {normalise_feature(t).replace(" ", "_") for t in tags}
    return spelled & set(CHURN_REASONS) - {"unknown"}


def left_for(episode: ChurnEpisode, competitor: str) -> bool:
    """Whether the customer left for ``competitor`` (names compared like features)."""
    return episode.competitor is not None and normalise_feature(
        episode.competitor
    ) == normalise_feature(competitor)


def plan_woken(
    playbook: Playbook,
    customer: CustomerView,
    episode: ChurnEpisode,
    now: datetime,
    *,
    trigger: str,
    segment: Segment,
    already_planned: Sequence[str] = (),
) -> list[PlannedStep]:
    """The playbook's steps with ``trigger``, due ``now`` (never before the churn): none once
    the case horizon has passed, none whose key is already planned, only where the step's
    ``when`` matches the segment. The caller decides that the event names this case."""
    if now >= case_expires_at(playbook, episode):
        return []
    due = max(now, episode.occurred_at)
    holdout = in_holdout(customer.customer_id, playbook.name, playbook.holdout)
    return [
        plan_step(
            playbook, customer, episode, step, due_at=due, original_due_at=due, holdout=holdout
        )
        for step in playbook.steps
        if step.trigger == trigger
        and step.key not in already_planned
        and (step.when is None or step.when.matches(segment))
    ]


def refined_track(playbooks: Sequence[Playbook], seg: Segment, current: str) -> Playbook | None:
    """The playbook the refined segment picks when it is not the case's ``current`` one."""
    chosen = choose_playbook(playbooks, seg)
    return chosen if chosen is not None and chosen.name != current else None


# -- reading the cases an event names -------------------------------------------------------------
async def _woken_cases(conn: AsyncConnection, *conditions: Any) -> list[Any]:
    """Open (or paused) win-back cases matching any of ``conditions``, locked."""
    return list(
        await conn.execute(
            cases.select()
            .where(
                cases.c.status.in_(store.OPEN),
                cases.c.purpose == "winback",
                or_(*conditions),
            )
            .order_by(cases.c.id)
            .with_for_update()
        )
    )


def _episode_field(name: str) -> Any:
    """``cases.episode ->> name``, compared like features (lower-case, ``_``/``-`` as space)."""
    return func.lower(func.regexp_replace(cases.c.episode[name].astext, r"[\s_-]+", " ", "g"))


# -- the handlers (routed by SchedulerHandler._routes) -----------------------------------------
async def feedback(handler: SchedulerHandler, b: Batch, event: Event, cause: CloudEvent) -> None:
    """An exit-survey answer refines the open win-back case's reason (see the module doc)."""
    data = event.data
    cid = data["customer_id"]
    if data.get("reason_raw") is None or data.get("reason") in (None, "unknown"):
        return  # tags or a comment only: nothing to refine
    case = await b.open_case(cid)
    if case is None or case.purpose != "winback":
        return
    if data.get("episode_id") not in (None, case.episode_id, case.episode.episode_id):
        return  # an answer about an older churn
    if case.episode.reason == data["reason"]:
        return
    row = await b.customer(cid)
    if row is None or row.get("erased_at") is not None:
        return
    now = b.tx.now
    episode = replace(case.episode, reason=data["reason"])
    view = customer_view(row, handler.fiscal_year_start_month)
    seg = replace(segment(view, episode, now), lifecycle=case.segment.lifecycle)
    target = refined_track(handler.playbooks, seg, case.playbook)
    if target is None or now >= case_expires_at(target, episode):
        # the same track: the refined reason is recorded on the case, for the reports
        await b.flush()
        await b.tx.conn.execute(
            text(
                "UPDATE cases SET episode = episode || jsonb_build_object('reason', "
                "CAST(:reason AS text), 'reason_refined_at', CAST(:at AS text)) WHERE id = :id"
            ),
            {"reason": data["reason"], "at": now.isoformat(), "id": case.id},
        )
        b.forget_case(cid)
        log.info("reason refined", extra={"case_id": case.id, "reason": data["reason"]})
        return
    superseded = await b.apply(case.supersede(now), cause)
    current = superseded.after if superseded is not None else case
    steps = plan_steps(
        target, view, episode, now, segment=seg, fallback_timezone=handler.fallback_timezone
    )
    # one case per answer that moves it (A, then B, then A again: three cases of one churn)
    answer = hashlib.sha256(cause.id.encode()).hexdigest()[:16]
    refined_id = f"{case.episode.episode_id[:40]}~{answer}"
    if refined_id in await store.episodes_with_cases(b.tx.conn, [refined_id]):
        return  # this answer already moved it
    await handler._open_case(
        b,
        cause,
        case_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"winback-case|{refined_id}")),
        customer_id=cid,
        episode_id=refined_id,
        purpose="winback",
        playbook=target,
        seg=seg,
        episode=episode,
        expires=case_expires_at(target, episode),
        steps=steps,
        current=current,
        feature_key=case.feature_key,
    )
    log.info("case moved to the refined track", extra={"case_id": case.id, "to": target.name})


async def feature_released(
    handler: SchedulerHandler, b: Batch, event: Event, cause: CloudEvent
) -> None:
    feature = event.data["feature"]
    await b.flush()
    found = await _woken_cases(b.tx.conn, cases.c.feature_key == normalise_feature(feature))
    await _wake(
        handler,
        b,
        found,
        FEATURE_RELEASED,
        lambda episode: True,  # the feature key matched
        {
            "feature": event.data.get("name") or feature,
            "feature_description": event.data.get("description"),
        },
    )


async def issue_resolved(
    handler: SchedulerHandler, b: Batch, event: Event, cause: CloudEvent
) -> None:
    features = list(event.data.get("features") or [])
    tags = list(event.data.get("tags") or [])
    keys = sorted({normalise_feature(n) for n in (*features, *tags)})
    reasons = sorted(tag_reasons(tags))
    await b.flush()
    found = await _woken_cases(
        b.tx.conn,
        cases.c.feature_key.in_(keys),
        cases.c.episode["reason"].astext.in_(reasons),
    )
    title = event.data.get("title")
    await _wake(
        handler,
        b,
        found,
        ISSUE_RESOLVED,
        lambda episode: fix_names(episode, features, tags),
        {"feature": title, "feature_description": None} if title else {},
    )


async def competitor_changed(
    handler: SchedulerHandler, b: Batch, event: Event, cause: CloudEvent
) -> None:
    competitor = event.data["competitor"]
    await b.flush()
    found = await _woken_cases(
        b.tx.conn, _episode_field("competitor") == normalise_feature(competitor)
    )
    await _wake(
        handler,
        b,
        found,
        COMPETITOR_CHANGED,
        lambda episode: left_for(episode, competitor),
        {
            "competitor": competitor,
            "competitor_change": event.data.get("kind"),
            "feature_description": event.data.get("note"),
        },
    )


async def _wake(
    handler: SchedulerHandler,
    b: Batch,
    rows: Sequence[Any],
    trigger: str,
    names: Any,
    context: Mapping[str, Any],
) -> None:
    conn, now = b.tx.conn, b.tx.now
    due = False
    for case in rows:
        playbook = handler._playbook(case)
        row = await b.customer(case.customer_id)
        if playbook is None or row is None or row.get("erased_at") is not None:
            continue
        episode = episode_from_json(case.episode)
        if not names(episode):
            continue
        steps = plan_woken(
            playbook,
            customer_view(row, handler.fiscal_year_start_month),
            episode,
            now,
            trigger=trigger,
            segment=segment_from_json(case.segment),
            already_planned=await store.step_keys(conn, case.id),
        )
        if not steps:
            continue
        await store.insert_steps(
            conn, [step_row(case.id, case.customer_id, s, context) for s in steps]
        )
        b.forget_case(case.customer_id)  # it has new steps: read again when next needed
        due = due or (case.status == "open" and any(s.due_at <= now for s in steps))
    if due:
        await store.steps_due(conn)


__all__ = [
    "competitor_changed",
    "feature_released",
    "feedback",
    "fix_names",
    "issue_resolved",
    "left_for",
    "plan_woken",
    "refined_track",
    "tag_reasons",
]
