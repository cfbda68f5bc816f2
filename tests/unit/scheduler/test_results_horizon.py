"""Attribution horizons: how long after the churn a return is still recorded against the case.
12 months by default, never shorter than the case horizon, up to 18 months; the shipped
missing_feature playbook (slow returners) records a return 17 months after the churn on a
case closed 16 months before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.scheduler.domain.case import Refused, open_case
from services.scheduler.domain.errors import PlaybookError
from services.scheduler.domain.loader import load_playbooks
from services.scheduler.domain.model import ChurnEpisode, CustomerView, Segment
from services.scheduler.domain.planning import case_expires_at, plan_steps
from services.scheduler.domain.playbook import Playbook
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

DAY = timedelta(days=1)
T0 = datetime(2026, 2, 2, 10, tzinfo=UTC)
SHIPPED = Path(__file__).resolve().parents[3] / "services" / "scheduler" / "playbooks"
STEP = {"key": "d0", "offset": "0d", "channel": "email", "template": "we_miss_you"}


def playbook(**fields: Any) -> Playbook:
    return Playbook.model_validate({"name": "pb", "version": 1, "steps": [STEP], **fields})


def test_the_default_is_twelve_months_and_never_shorter_than_the_case_horizon() -> None:
    assert playbook(horizon="60d").return_horizon == timedelta(days=365)
    assert playbook(horizon="15mo").return_horizon == 15 * 30 * DAY
    assert playbook(horizon="60d", attribution_horizon="18mo").return_horizon == 540 * DAY
    assert playbook(horizon="6mo", attribution_horizon="90d").return_horizon == 180 * DAY


@pytest.mark.parametrize("value", ["19mo", "2y"])
def test_more_than_eighteen_months_is_refused(value: str) -> None:
    with pytest.raises(PlaybookError, match=r"attribution_horizon: .* at most 548d \(18 months\)"):
        playbook(attribution_horizon=value)


def test_the_attribution_window_goes_up_to_eighteen_months() -> None:
    assert playbook(attribution_window_days=548).attribution_window == 548 * DAY
    with pytest.raises(ValidationError, match="attribution_window_days"):
        playbook(attribution_window_days=549)


def test_the_missing_feature_playbook_records_a_return_seventeen_months_later() -> None:
    shipped = {p.name: p for p in load_playbooks(SHIPPED, templates=TEMPLATE_NAMES, offers=OFFERS)}
    pb = shipped["missing_feature"]
    assert pb.attribution_horizon == 540 * DAY
    assert pb.attribution_window == 365 * DAY
    segment = Segment("churned_customer", "missing_feature", "medium", "high", "established", False)
    episode = ChurnEpisode("ep-1", "subscription_cancelled", T0, reason="missing_feature")
    opened = open_case(
        case_id="case-1",
        customer_id="cus-1",
        episode_id="ep-1",
        purpose="winback",
        playbook=pb,
        segment=segment,
        episode=episode,
        expires_at=case_expires_at(pb, episode),
        steps=plan_steps(pb, CustomerView("cus-1"), episode, T0, segment=segment),
        now=T0,
    )
    assert not isinstance(opened, Refused)
    case = opened.after
    closed = case.unsubscribe(T0 + 30 * DAY)  # closed a month in
    assert not isinstance(closed, Refused)
    later = T0 + 510 * DAY  # 17 months after the churn
    recorded = closed.after.record_return(
        later, returned_at=later, by_activity=False, playbook=pb, horizon=pb.return_horizon
    )
    assert not isinstance(recorded, Refused)
    assert recorded.after.returned_at == later
    too_late = T0 + 541 * DAY
    refused = closed.after.record_return(
        too_late, returned_at=too_late, by_activity=False, playbook=pb, horizon=pb.return_horizon
    )
    assert isinstance(refused, Refused)
    assert refused.code == "outside_horizon"
