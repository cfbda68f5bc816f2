"""Every figure of the results reports is documented in the OpenAPI document: each property of
each report schema has a description (the formula), and the new routes are there."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from services.scheduler import reports

REPORT_SCHEMAS = (
    "WinbackReport",
    "GroupOut",
    "ArmOut",
    "LiftOut",
    "EconomicsOut",
    "ArmMoneyOut",
    "MoneyViewOut",
    "RechurnOut",
    "DaysToReturnOut",
    "RevenueOut",
    "IntervalOut",
    "ReonboardingOut",
    "ReonboardingArmOut",
    "RechurnPreventedOut",
    "MessagesReport",
    "EngagementOut",
    "CohortsReport",
    "CohortOut",
    "StillActiveOut",
    "OwnersReport",
    "OwnerOut",
    "FiltersOut",
)


def document() -> dict[str, Any]:
    app = FastAPI()
    app.include_router(reports.router())
    return app.openapi()


DOCUMENT = document()


@pytest.mark.parametrize("name", REPORT_SCHEMAS)
def test_every_report_field_has_a_description(name: str) -> None:
    schemas = DOCUMENT["components"]["schemas"]
    schema = schemas.get(name) or schemas[f"{name}-Output"]
    missing = [p for p, s in schema["properties"].items() if not s.get("description")]
    assert missing == [], f"{name}: {missing}"


def test_the_report_routes_and_their_parameters() -> None:
    paths = DOCUMENT["paths"]
    assert {"/v1/reports/winback", "/v1/reports/cohorts", "/v1/reports/owners"} <= set(paths)
    winback = {p["name"]: p for p in paths["/v1/reports/winback"]["get"]["parameters"]}
    assert "crm_owner" in winback["group_by"]["schema"]["enum"]
    assert winback["revenue_months"]["schema"]["maximum"] == 60
    owners = paths["/v1/reports/owners"]["get"]
    assert "text/csv" in owners["responses"]["200"]["content"]
    cohorts = {p["name"]: p for p in paths["/v1/reports/cohorts"]["get"]["parameters"]}
    assert cohorts["period"]["schema"]["enum"] == ["month", "quarter"]
