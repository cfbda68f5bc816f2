"""``docs/asyncapi.yaml`` passes the official AsyncAPI validator (``asyncapi validate`` of
``@asyncapi/cli``, the parser and the AsyncAPI ruleset), warnings included — and the validator
refuses a broken copy, so a pass means something.

The CLI comes from ``scripts/ci-tools`` (npm, into ``~/.cache/winback``); a missing CLI fails
the test, it never skips. Analytics are off and go nowhere (``ASYNCAPI_METRICS_CONFIG_PATH``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
CI_TOOLS = ROOT / "scripts" / "ci-tools"
TIMEOUT = 180


def _version() -> str:
    found = re.search(
        r'ASYNCAPI_CLI_VERSION="\$\{WINBACK_CI_ASYNCAPI_CLI_VERSION:-([0-9.]+)\}"',
        CI_TOOLS.read_text(),
    )
    assert found, "scripts/ci-tools names no AsyncAPI CLI version"
    return os.environ.get("WINBACK_CI_ASYNCAPI_CLI_VERSION") or found.group(1)


def _cli() -> str:
    """The ``asyncapi`` that scripts/ci-tools installed (or one on PATH)."""
    cache = os.environ.get("WINBACK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "winback"
    )
    installed = Path(cache) / f"asyncapi-cli-{_version()}" / "node_modules" / ".bin" / "asyncapi"
    if installed.is_file() and os.access(installed, os.X_OK):
        return str(installed)
    on_path = shutil.which("asyncapi")
    if on_path:
        return on_path
    pytest.fail(
        f"the AsyncAPI CLI is not installed ({installed}): run `bash scripts/ci-tools` "
        f"(npm install @asyncapi/cli@{_version()})",
        pytrace=False,
    )


def validate(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    metrics = tmp_path / "asyncapi-analytics.json"
    metrics.write_bytes(
        orjson.dumps(
            {"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "winback-test"}
        )
    )
    env = {**os.environ, "ASYNCAPI_METRICS_CONFIG_PATH": str(metrics), "CI": "true"}
    return subprocess.run(
        [_cli(), "validate", str(path), "--fail-severity", "warn", "--diagnostics-format", "text"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )


def test_the_committed_document_is_valid_asyncapi(tmp_path: Path) -> None:
    out = validate(DOCUMENT, tmp_path)
    assert out.returncode == 0, f"asyncapi validate failed:\n{out.stdout}\n{out.stderr}"
    assert "is valid" in out.stdout, out.stdout


def test_the_validator_refuses_a_broken_document(tmp_path: Path) -> None:
    doc = yaml.safe_load(DOCUMENT.read_text())
    del doc["components"]["schemas"]["DispatchCommand"]  # a dangling $ref
    doc["operations"]["scheduler.send.dispatch"]["action"] = "publish"  # AsyncAPI 2 wording
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = validate(broken, tmp_path)
    assert out.returncode != 0, out.stdout
    assert "DispatchCommand" in out.stdout + out.stderr
