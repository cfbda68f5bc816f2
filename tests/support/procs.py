"""``winback`` commands as OS processes, for the benches and the fault suite.

Start one (its output appended to a log file), read its CPU time and peak memory from /proc,
stop it gently (SIGTERM: it finishes its batch and leaves its groups) or kill it as a crash
would (SIGKILL), and start it again with the same environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def winback_executable() -> str:
    """The ``winback`` script next to this interpreter (the project's virtual environment)."""
    return str(Path(sys.executable).with_name("winback"))


def spawn_winback(
    command: str, env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``winback <command>`` with ``env``, stdout and stderr appended to ``log``. A session of
    its own, so a Ctrl-C meant for the caller does not reach it as well."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [winback_executable(), command],
            env=dict(env),
            stdout=out,
            stderr=out,
            cwd=cwd,
            start_new_session=True,
        )


def as_env(overrides: Mapping[str, Any], prefix: str = "WINBACK_") -> dict[str, str]:
    """Nested settings as ``WINBACK_`` environment variables (``__`` nests)."""
    env: dict[str, str] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping):
            env.update(as_env(value, name + "__"))
        else:
            env[name] = str(value)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (live ones from /proc, ended ones as the
    process counted them): a PostgreSQL postmaster and its backends, say."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(child[1]) == pid:
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class WinbackProcess:
    """One ``winback <command>`` process that can be killed and started again."""

    def __init__(
        self, name: str, command: str, env: Mapping[str, str], logs: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.command = command
        self.env = dict(env)
        self.log = logs / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WinbackProcess:
        self.proc = spawn_winback(self.command, self.env, self.log, self.cwd)
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no batch finished, no group left, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def exited(self) -> int | None:
        """The exit code if the process ended on its own (it was not killed by us)."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""
