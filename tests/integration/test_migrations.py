"""The schema comes from Alembic: up from empty, down to nothing, and equal to the models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared.db import migrate
from shared.db.engine import make_engine
from shared.db.tables import metadata

pytestmark = pytest.mark.integration


async def test_migrations_go_up_from_empty_and_down_cleanly(
    new_database: Callable[[], Awaitable[str]],
) -> None:
    url = await new_database()
    await migrate.upgrade_async(url)
    engine = make_engine(url, pool_size=1)
    async with engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert set(metadata.tables) <= tables
        diff = await conn.run_sync(
            lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), metadata
            )
        )
    assert diff == [], f"the migrated schema differs from shared/db/tables.py: {diff}"

    await migrate.downgrade_async(url, "base")
    async with engine.connect() as conn:
        left = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        version = await conn.scalar(text("SELECT count(*) FROM alembic_version"))
    await engine.dispose()
    assert left == {"alembic_version"}
    assert version == 0

    await migrate.upgrade_async(url)  # and up again
