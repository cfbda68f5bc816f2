"""An embedded PostgreSQL 16 from the ``pgserver`` package (the ``local`` extra, not in the
production image), for local runs and tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from shared.errors import ConfigError

# pgserver looks up a runtime directory through platformdirs, which warns when
# XDG_RUNTIME_DIR is unset (as it is in CI); give it a private one.
os.environ.setdefault("XDG_RUNTIME_DIR", str(Path.home() / ".cache" / "winback" / "run"))
Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)


NOT_INSTALLED = (
    "database.url (WINBACK_DATABASE__URL) is empty and the embedded PostgreSQL is not "
    "installed: install the local extra (uv sync --extra local, or pip install "
    "'winback[local]') or set WINBACK_DATABASE__URL"
)


def start_embedded(data_dir: Path, cleanup: str | None = "stop") -> tuple[str, Any]:
    """Start (or reuse) the server on ``data_dir``; return its asyncpg URL and the handle.
    ``pgserver`` is an optional dependency (the ``local`` extra): without it, a
    ``ConfigError`` saying how to install it."""
    try:
        import pgserver
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode=cleanup)  # type: ignore[attr-defined]
    return to_asyncpg_url(server.get_uri()), server


def to_asyncpg_url(uri: str) -> str:
    """``postgresql://user:@/db?host=/sock`` → ``postgresql+asyncpg://user@/db?host=/sock``."""
    parsed = urlparse(uri)
    host = parse_qs(parsed.query).get("host", [""])[0]
    user = parsed.username or "postgres"
    db = parsed.path.lstrip("/") or "postgres"
    if host:
        return f"postgresql+asyncpg://{user}@/{db}?host={host}"
    netloc = parsed.netloc.split("@")[-1]
    return f"postgresql+asyncpg://{user}@{netloc}/{db}"


def crash(server: Any) -> None:
    """Stop the server at once, as a crash would: ``pg_ctl stop -m immediate`` (no shutdown
    checkpoint; every connection drops; the next start runs crash recovery)."""
    import pgserver

    pgserver.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "stop", "-m", "immediate"], pgdata=server.pgdata, user=server.system_user
    )


def restart(server: Any) -> None:
    """Start the server again on its data directory, on the same socket (after ``crash``)."""
    server.ensure_postgres_running()
