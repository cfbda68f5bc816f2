"""Deriving a per-run database URL keeps everything but the database name."""

from __future__ import annotations

import pytest

from shared.db.engine import with_database


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://postgres@/postgres?host=/tmp/devinfra/pg",
            "postgresql+asyncpg://postgres@/bench_1?host=/tmp/devinfra/pg",
        ),
        (
            "postgresql+asyncpg://u:p@127.0.0.1:5432/winback",
            "postgresql+asyncpg://u:p@127.0.0.1:5432/bench_1",
        ),
        (
            "postgresql+asyncpg://u@db/winback?host=/run/pg&sslmode=disable",
            "postgresql+asyncpg://u@db/bench_1?host=/run/pg&sslmode=disable",
        ),
    ],
)
def test_with_database_replaces_only_the_name(url: str, expected: str) -> None:
    assert with_database(url, "bench_1") == expected
