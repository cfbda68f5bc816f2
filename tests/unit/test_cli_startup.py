"""Every expected start-up failure of ``winback`` is one clear line on stderr and a documented
exit code, never a traceback: run as the operator would, as a process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from services.cli import EXIT_CONFIG, EXIT_UNAVAILABLE
from tests.support.procs import winback_executable


def winback(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``winback ARGS`` with a clean environment (no ``WINBACK_`` variables but ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("WINBACK_")}
    return subprocess.run(
        [winback_executable(), *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def free_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    proc = winback("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"winback {metadata.version('winback')}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"plan": ', "winback: --data: not valid JSON: "),
        ("[1, 2]", "winback: --data: must be a JSON object ({...}), not list"),
    ],
)
def test_bad_json_to_publish_test_event_names_the_option(
    tmp_path: Path, data: str, expected: str
) -> None:
    env = {"WINBACK_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    proc = winback("publish-test-event", "--data", data, cwd=tmp_path, env=env)
    assert proc.returncode == EXIT_CONFIG == 2
    assert one_line(proc).startswith(expected)


def test_an_unreachable_broker_is_one_line_and_exit_69(tmp_path: Path) -> None:
    servers = f"127.0.0.1:{free_port()}"
    proc = winback(
        "publish-test-event", cwd=tmp_path, env={"WINBACK_KAFKA__BOOTSTRAP_SERVERS": servers}
    )
    assert proc.returncode == EXIT_UNAVAILABLE == 69
    assert one_line(proc).startswith(f"winback: the broker did not answer ({servers}): ")
    assert proc.stdout == ""  # no event printed: none was sent


def test_a_database_that_is_down_during_migrate_is_one_line_and_exit_69(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://winback:secret-pw@127.0.0.1:{free_port()}/winback"
    proc = winback("migrate", cwd=tmp_path, env={"WINBACK_DATABASE__URL": url})
    assert proc.returncode == EXIT_UNAVAILABLE
    line = one_line(proc)
    assert line.startswith("winback: the database did not answer (postgresql+asyncpg://winback:")
    assert "secret-pw" not in line


def test_a_typo_in_a_setting_stops_start_up_with_its_name(tmp_path: Path) -> None:
    proc = winback("migrate", cwd=tmp_path, env={"WINBACK_SCHEDULER__CAP_PER_WEK": "1"})
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr.splitlines() == [
        "winback: invalid configuration:",
        "  environment variable WINBACK_SCHEDULER__CAP_PER_WEK: no such setting "
        "(did you mean WINBACK_SCHEDULER__CAP_PER_WEEK?)",
    ]


def without_pgserver(tmp_path: Path) -> dict[str, str]:
    """``PYTHONPATH`` with a ``pgserver`` that is not there (as in the production image)."""
    fake = tmp_path / "no-pgserver" / "pgserver"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pgserver'\", name='pgserver')\n"
    )
    return {"PYTHONPATH": str(fake.parent)}


def test_without_pgserver_the_cli_works_and_run_says_how_to_install_it(tmp_path: Path) -> None:
    env = without_pgserver(tmp_path)
    assert winback("--help", cwd=tmp_path, env=env).returncode == 0
    proc = winback("run", cwd=tmp_path, env=env)
    assert proc.returncode == EXIT_CONFIG
    line = one_line(proc)
    assert line.startswith("winback: database.url (WINBACK_DATABASE__URL) is empty and the ")
    assert "uv sync --extra local" in line
    assert "pip install 'winback[local]'" in line
    assert not (tmp_path / ".winback" / "pgdata").exists()


def test_a_local_broker_that_cannot_start_is_one_line_and_exit_69(tmp_path: Path) -> None:
    # no Java and no Maven on PATH, no jars in the cache: the local broker cannot start
    env = {
        "PATH": str(Path(winback_executable()).parent),
        "WINBACK_CACHE_DIR": str(tmp_path / "cache"),
        "WINBACK_DATABASE__URL": f"postgresql+asyncpg://winback@127.0.0.1:{free_port()}/winback",
    }
    proc = winback("run", "--local-kafka", cwd=tmp_path, env=env)
    assert proc.returncode == EXIT_UNAVAILABLE
    assert one_line(proc).startswith("winback: --local-kafka: ")


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_the_log_format_setting_reaches_the_command_logs(tmp_path: Path, log_format: str) -> None:
    # stderr is a pipe: JSON unless WINBACK_LOG_FORMAT says otherwise
    url = f"postgresql+asyncpg://winback@127.0.0.1:{free_port()}/winback"
    env = {"WINBACK_DATABASE__URL": url, "WINBACK_LOG_FORMAT": log_format}
    proc = winback("migrate", "--wait", "1", cwd=tmp_path, env=env)
    assert proc.returncode == EXIT_UNAVAILABLE
    *logged, last = proc.stderr.splitlines()
    assert last.startswith("winback: the database did not answer within 1 s (")
    retry = next(line for line in logged if "reaching the database failed; retrying" in line)
    if log_format == "console":
        assert re.match(r"^\S+Z WARNING winback\.migrate: reaching the database failed", retry)
    else:
        assert json.loads(retry)["level"] == "WARNING"


def test_a_port_that_is_taken_ends_start_up_with_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            # start-up waits for these in the background; the port fails first
            "WINBACK_DATABASE__URL": f"postgresql+asyncpg://winback@127.0.0.1:{free_port()}/w",
            "WINBACK_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "WINBACK_HTTP__RELAY_PORT": str(port),
        }
        proc = winback("relay", cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"winback: relay: start-up failed: OSError: cannot listen on 127.0.0.1:{port} "
        "(see the log; WINBACK_HTTP__RELAY_PORT)"
    )


def test_the_production_install_leaves_pgserver_out() -> None:
    # the image runs `uv sync --frozen --no-dev` (no extras): pgserver is only in the `local`
    # extra and the dev group of the lock file
    root = Path(__file__).resolve().parents[2]
    lock = tomllib.loads((root / "uv.lock").read_text())
    (winback_pkg,) = [p for p in lock["package"] if p["name"] == "winback"]
    assert "pgserver" not in {d["name"] for d in winback_pkg["dependencies"]}
    assert {d["name"] for d in winback_pkg["optional-dependencies"]["local"]} == {"pgserver"}
    assert "pgserver" in {d["name"] for d in winback_pkg["dev-dependencies"]["dev"]}
    dockerfile = (root / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev --no-editable" in dockerfile
    assert "--extra" not in dockerfile  # --extra local, --all-extras
