"""The scheduler's route modules stay thin: they translate HTTP into a call of a query module
(``services/scheduler/queries``) or a command (``services/scheduler/commands.py``) and write no
SQL of their own; and a route's helper never leaks into the OpenAPI document as a parameter
(a loop's default argument once became ``?_action=``)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from services.scheduler import api, reports, simulate
from shared.http.app import create_app

ROOT = Path(__file__).resolve().parents[3]
ROUTES = [
    ROOT / "services/scheduler/api.py",
    ROOT / "services/scheduler/reports.py",
    ROOT / "services/scheduler/simulate.py",
]
# types only: a route may name a row or a connection it passes on, not build a statement
ALLOWED_SQLALCHEMY = {"Row", "AsyncConnection"}


def sql_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("shared.db"):
                found.append(node.module)
            elif node.module.split(".")[0] == "sqlalchemy":
                found += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if a.name not in ALLOWED_SQLALCHEMY
                ]
    return found


@pytest.mark.parametrize("path", ROUTES, ids=lambda p: p.name)
def test_route_modules_write_no_sql(path: Path) -> None:
    assert sql_imports(path) == []


def test_the_check_catches_a_statement(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from sqlalchemy import Row, select\n"
        "from shared.db.tables import cases\n"
        "import sqlalchemy\n"
    )
    assert sql_imports(module) == ["sqlalchemy.select", "shared.db.tables", "sqlalchemy"]


def document() -> dict[str, Any]:
    app = create_app(
        "test",
        checks=[],
        routers=[api.router(), reports.router(), simulate.router()],
        api_keys=["x" * 32],
    )
    return app.openapi()


def test_control_routes_take_only_the_case_id() -> None:
    paths = document()["paths"]
    for action in api.ACTIONS:
        operation = paths[f"/v1/cases/{{case_id}}/{action}"]["post"]
        assert [(p["name"], p["in"]) for p in operation["parameters"]] == [("case_id", "path")]
        assert operation["operationId"] == f"{action}Case"


def test_no_dependency_leaks_into_the_parameters() -> None:
    names = {
        p["name"]
        for item in document()["paths"].values()
        for operation in item.values()
        for p in operation.get("parameters", [])
    }
    assert not {"engine", "clock", "settings", "work", "migrator", "request"} & names
    assert not [n for n in names if n.startswith("_")]
