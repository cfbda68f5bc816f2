"""The pure cores import no I/O: no database, broker, HTTP, event loop or clock of their own.

The check reads each module's import statements (``ast``), so a new ``import sqlalchemy`` in
the scheduler's domain fails here, not in review. The loader may read playbook files
(``pathlib``, ``yaml``): parsing files is its job; it still opens no connection.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = sorted(
    [
        *(ROOT / "services/scheduler/domain").glob("*.py"),
        ROOT / "services/ingest/customer.py",
        ROOT / "services/ingest/reasons.py",
        ROOT / "services/ingest/events.py",
        ROOT / "shared/channels.py",
        ROOT / "shared/churn.py",
        ROOT / "shared/localtime.py",
    ]
)
FORBIDDEN = (
    "asyncio",
    "asyncpg",
    "aiokafka",
    "sqlalchemy",
    "httpx",
    "fastapi",
    "starlette",
    "socket",
    "subprocess",
    "time",
    "random",
    "shared.db",
    "shared.messaging",
    "shared.http",
    "shared.runtime",
    "shared.clock",
    "services.scheduler.store",
    "services.ingest.store",
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = sorted(name for name in imported_modules(path) if forbidden(name))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_check_catches_an_io_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom sqlalchemy.ext.asyncio import AsyncEngine\nimport time\n")
    assert sorted(n for n in imported_modules(module) if forbidden(n)) == [
        "sqlalchemy.ext.asyncio",
        "time",
    ]
    assert len(PURE) > 10  # the glob found the domain package
