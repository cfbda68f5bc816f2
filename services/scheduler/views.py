"""Translations between stored rows / event payloads and the pure domain's plain data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast, get_args

from services.scheduler.domain import (
    CaseStep,
    Channel,
    ChurnEpisode,
    CustomerView,
    GuardrailPolicy,
    Migration,
    PlannedStep,
    Segment,
    SendWindow,
    reonboarding_anchor,
)
from services.scheduler.domain.case import (
    REONBOARDING,
    Case,
    CaseClosed,
    CaseEvent,
    CaseMigrated,
)
from services.scheduler.domain.guardrails import FrequencyCap
from shared import domain_events as de
from shared.channels import ChannelName
from shared.contracts import cases as contract
from shared.settings import SchedulerSettings

CHANNELS = get_args(ChannelName)


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def customer_view(
    row: Mapping[Any, Any], fiscal_year_start_month: int | None = None
) -> CustomerView:
    """The customer as the domain sees it; ``fiscal_year_start_month`` is the default
    (``scheduler.fiscal_year_start_month``) for a customer whose profile names none."""
    month = row.get("fiscal_year_start_month") or fiscal_year_start_month
    consent = {k: bool(v) for k, v in (row.get("consent") or {}).items() if k in CHANNELS}
    engagement = row.get("engagement")
    return CustomerView(
        customer_id=row["id"],
        timezone=row.get("timezone"),
        locale=row.get("locale"),
        mrr_minor=row.get("mrr_minor"),
        currency=row.get("currency"),
        customer_since=_time(row.get("customer_since")),
        engagement=engagement if engagement in ("high", "medium", "low") else None,
        crm_owner=row.get("crm_owner"),
        consent=cast(dict[Channel, bool], consent),
        opted_out_all=bool(row.get("opted_out_all")),
        suppressed_channels=frozenset(
            cast(Channel, c) for c in (row.get("suppressed_channels") or []) if c in CHANNELS
        ),
        last_active_at=_time(row.get("last_active_at")),
        fiscal_year_start_month=month if month is not None and 1 <= month <= 12 else None,
    )


def episode_from_event(data: Mapping[str, Any], prior_win_back_at: datetime | None) -> ChurnEpisode:
    occurred = _time(data["occurred_at"])
    assert occurred is not None
    return ChurnEpisode(
        episode_id=data["id"],
        kind=data["kind"],
        occurred_at=occurred,
        reason=data.get("reason") or "unknown",
        feature=data.get("feature"),
        competitor=data.get("competitor"),
        mrr_at_churn_minor=data.get("mrr_at_churn_minor"),
        prior_win_back_at=prior_win_back_at,
    )


def episode_json(episode: ChurnEpisode) -> dict[str, Any]:
    return {
        "id": episode.episode_id,
        "kind": episode.kind,
        "occurred_at": episode.occurred_at.isoformat(),
        "reason": episode.reason,
        "feature": episode.feature,
        "competitor": episode.competitor,
        "mrr_at_churn_minor": episode.mrr_at_churn_minor,
        "prior_win_back_at": episode.prior_win_back_at.isoformat()
        if episode.prior_win_back_at
        else None,
    }


def episode_from_json(data: Mapping[str, Any]) -> ChurnEpisode:
    """The case's churn episode as stored (for a re-onboarding case: the original churn)."""
    return episode_from_event(data, _time(data.get("prior_win_back_at")))


def returned_at_of(data: Mapping[str, Any] | None) -> datetime | None:
    """When a re-onboarding case's customer returned (its time zero); ``None`` otherwise."""
    return _time((data or {}).get("returned_at"))


def planning_episode(data: Mapping[str, Any]) -> ChurnEpisode:
    """The episode a case's steps are planned from: the churn, or for a re-onboarding case
    the original churn re-timed to the return."""
    episode = episode_from_json(data)
    returned_at = returned_at_of(data)
    return reonboarding_anchor(episode, returned_at) if returned_at is not None else episode


def segment_json(segment: Segment) -> dict[str, Any]:
    return {
        "lifecycle": segment.lifecycle,
        "reason": segment.reason,
        "value_tier": segment.value_tier,
        "engagement": segment.engagement,
        "tenure": segment.tenure,
        "is_rechurn": segment.is_rechurn,
        "days_since_churn": segment.days_since_churn,
        "labels": sorted(segment.labels),
    }


def segment_from_json(data: Mapping[str, Any]) -> Segment:
    return Segment(
        lifecycle=data["lifecycle"],
        reason=data["reason"],
        value_tier=data["value_tier"],
        engagement=data["engagement"],
        tenure=data["tenure"],
        is_rechurn=bool(data["is_rechurn"]),
        days_since_churn=int(data.get("days_since_churn", 0)),
    )


def step_row(
    case_id: str, customer_id: str, step: PlannedStep, context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "customer_id": customer_id,
        "step_key": step.step_key,
        "channel": step.channel,
        "template": step.template,
        "offer": step.offer,
        "is_discount": step.is_discount,
        "discount_fallback_template": step.discount_fallback_template,
        "variant": step.variant,
        "window": step.window,
        "on_cap": step.on_cap,
        "holdout": step.holdout,
        "trigger": step.trigger,
        "inactive_for": step.inactive_for,
        "state": "pending",
        "due_at": step.due_at,
        "original_due_at": step.original_due_at,
        "expires_at": step.expires_at,
        "context": dict(context or {}),
    }


def planned_from_row(row: Mapping[Any, Any], playbook: str, version: int) -> PlannedStep:
    return PlannedStep(
        playbook=playbook,
        playbook_version=version,
        step_key=row["step_key"],
        channel=row["channel"],
        template=row["template"],
        offer=row["offer"],
        is_discount=row["is_discount"],
        due_at=row["due_at"],
        original_due_at=row["original_due_at"],
        variant=row["variant"],
        window=row["window"],
        on_cap=row["on_cap"],
        holdout=row["holdout"],
        expires_at=row["expires_at"],
        discount_fallback_template=row["discount_fallback_template"],
        trigger=row["trigger"],
        inactive_for=row.get("inactive_for"),
    )


def case_step_from_row(row: Mapping[Any, Any], playbook: str, version: int) -> CaseStep:
    return CaseStep(
        planned_from_row(row, playbook, version),
        state=row["state"],
        state_reason=row["state_reason"],
    )


def case_from_rows(row: Mapping[Any, Any], steps: Iterable[Mapping[Any, Any]]) -> Case:
    """The case aggregate from its row and its step rows (in due order)."""
    return Case(
        id=row["id"],
        customer_id=row["customer_id"],
        episode_id=row["episode_id"],
        status=row["status"],
        purpose=row["purpose"],
        playbook=row["playbook"],
        playbook_version=row["playbook_version"],
        segment=segment_from_json(row["segment"]),
        episode=episode_from_json(row["episode"]),
        holdout=row["holdout"],
        is_rechurn=row["is_rechurn"],
        churned_at=row["churned_at"],
        opened_at=row["opened_at"],
        expires_at=row["expires_at"],
        feature_key=row["feature_key"],
        close_reason=row["close_reason"],
        closed_at=row["closed_at"],
        returned_at=row["returned_at"],
        return_anchor=returned_at_of(row["episode"]),
        steps=tuple(case_step_from_row(s, row["playbook"], row["playbook_version"]) for s in steps),
    )


def case_row(case: Case) -> dict[str, Any]:
    """The ``cases`` row of a newly opened case (its steps are :func:`step_row`'s)."""
    episode = episode_json(case.episode)
    if case.return_anchor is not None:
        episode["returned_at"] = case.return_anchor.isoformat()
    return {
        "id": case.id,
        "customer_id": case.customer_id,
        "episode_id": case.episode_id,
        "status": case.status,
        "purpose": case.purpose,
        "playbook": case.playbook,
        "playbook_version": case.playbook_version,
        "segment": segment_json(case.segment),
        "episode": episode,
        "feature_key": case.feature_key,
        "holdout": case.holdout,
        "is_rechurn": case.is_rechurn,
        "churned_at": case.churned_at,
        "opened_at": case.opened_at,
        "expires_at": case.expires_at,
        "close_reason": case.close_reason,
        "closed_at": case.closed_at,
        "returned_at": case.returned_at,
    }


def event_message(event: CaseEvent) -> tuple[str, dict[str, Any]]:
    """A case's domain event as published: its CloudEvent type and data (built with the
    event's contract, ``shared.contracts.cases``)."""
    if isinstance(event, CaseClosed):
        return de.CASE_CLOSED, contract.CaseClosed(
            case_id=event.case_id,
            customer_id=event.customer_id,
            reason=event.reason,
            playbook=event.playbook,
        ).to_data()
    if isinstance(event, CaseMigrated):
        return de.CASE_MIGRATED, contract.CaseMigrated(
            case_id=event.case_id,
            customer_id=event.customer_id,
            **migration_json(event.migration),
        ).to_data()
    if event.purpose == REONBOARDING:
        announce: dict[str, Any] = {
            "after_case_id": event.after_case_id,
            "churn_reason": event.churn_reason,
            "returned_at": event.returned_at,
        }
    else:
        announce = {"time_since_return_days": event.time_since_return_days}
    return de.CASE_OPENED, contract.CaseOpened(
        case_id=event.case_id,
        customer_id=event.customer_id,
        purpose=event.purpose,
        playbook=event.playbook,
        playbook_version=event.playbook_version,
        segment=segment_json(event.segment),
        holdout=event.holdout,
        is_rechurn=event.is_rechurn,
        **announce,
        steps=event.steps,
    ).to_data()


_CONTENT = (
    "channel",
    "template",
    "offer",
    "is_discount",
    "discount_fallback_template",
    "variant",
    "on_cap",
    "holdout",
    "trigger",
    "inactive_for",
    "window",
    "due_at",
    "original_due_at",
    "expires_at",
)


def _step_json(step: PlannedStep) -> dict[str, Any]:
    return {
        "step_key": step.step_key,
        "channel": step.channel,
        "template": step.template,
        "offer": step.offer,
        "variant": step.variant,
        "window": step.window,
        "due_at": step.due_at.isoformat(),
        "original_due_at": step.original_due_at.isoformat(),
    }


def migration_json(migration: Migration) -> dict[str, Any]:
    """A case's step changes, as the ``case.migrated`` event and the dry run show them."""
    return {
        "playbook": migration.playbook,
        "from_version": migration.from_version,
        "to_version": migration.to_version,
        "expires_at": migration.expires_at.isoformat(),
        "added": [_step_json(step) for step in migration.added],
        "cancelled": [
            {"step_key": c.step_key, "cause": c.cause, "due_at": c.step.due_at.isoformat()}
            for c in migration.cancelled
        ],
        "retimed": [
            {
                **_step_json(c.after),
                "from_due_at": c.before.due_at.isoformat(),
                "changed": [f for f in _CONTENT if getattr(c.before, f) != getattr(c.after, f)],
            }
            for c in migration.retimed
        ],
        "updated": [
            {
                **_step_json(c.after),
                "changed": [f for f in _CONTENT if getattr(c.before, f) != getattr(c.after, f)],
            }
            for c in migration.updated
        ],
        "kept": list(migration.kept),
        "unchanged": list(migration.unchanged),
    }


def policy(settings: SchedulerSettings) -> GuardrailPolicy:
    from datetime import time

    end = (
        time(settings.send_window_end_hour)
        if settings.send_window_end_hour < 24
        else time(23, 59, 59)
    )
    return GuardrailPolicy(
        caps=(
            FrequencyCap(settings.cap_per_week, timedelta(days=7)),
            FrequencyCap(settings.cap_per_month, timedelta(days=30)),
        ),
        send_window=SendWindow(time(settings.send_window_start_hour), end),
        fallback_timezone=settings.fallback_timezone,
        discount_period=timedelta(days=settings.discount_period_days),
        consent_by_default=frozenset(
            cast(Channel, c) for c in settings.consent_by_default if c in CHANNELS
        ),
    )
