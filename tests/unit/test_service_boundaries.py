"""Services do not import each other: each talks to the others through ``shared/`` (contracts,
the channel registry, the template catalogue) and the broker, never through another service's
modules. Only the composition root (``services/cli.py``, ``services/demo.py``) imports them all.

The check reads every module's import statements with ``ast`` (relative imports resolved), so
a new ``from services.scheduler ...`` in the dispatcher fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
COMPOSITION_ROOT = {"services.cli", "services.demo", "services.validate"}


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path) -> set[str]:
    """Every module name ``path`` imports (``from a import b`` counts as ``a.b`` and ``a``)."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _service(module: str) -> str | None:
    """``services.dispatcher.sender`` → ``dispatcher``; ``None`` outside ``services``."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2:
        return None
    return parts[1]


def _modules() -> list[Path]:
    return sorted(p for p in SERVICES.rglob("*.py") if _module(p) not in COMPOSITION_ROOT)


def crossings(path: Path, root: Path = ROOT) -> list[str]:
    """The other services' modules ``path`` (a module under ``root/services``) imports."""
    own = _service(_module(path, root))
    services = root / "services"
    return sorted(
        name
        for name in _imports(path, root)
        if (other := _service(name)) is not None
        and other != own
        and ((services / other).is_dir() or (services / f"{other}.py").is_file())
    )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_service_imports_no_other_service(path: Path) -> None:
    assert crossings(path) == [], f"{_module(path)} imports another service"


def test_the_check_sees_absolute_relative_and_package_imports(tmp_path: Path) -> None:
    for package in ("dispatcher", "scheduler", "ingest"):
        (tmp_path / "services" / package).mkdir(parents=True)
    (tmp_path / "services" / "relay.py").write_text("", encoding="utf-8")
    probe = tmp_path / "services" / "dispatcher" / "probe.py"
    probe.write_text(
        "from services.scheduler.domain import Playbook\n"
        "from services import ingest\n"
        "from ..scheduler import store\n"
        "import services.relay\n"
        "from services.dispatcher import model\n"
        "from . import compose\n"
        "from shared import channels\n",
        encoding="utf-8",
    )
    assert crossings(probe, tmp_path) == [
        "services.ingest",
        "services.relay",
        "services.scheduler",
        "services.scheduler.domain",
        "services.scheduler.domain.Playbook",
        "services.scheduler.store",
    ]
