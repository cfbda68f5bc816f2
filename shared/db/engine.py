"""The async SQLAlchemy engine (asyncpg driver)."""

from __future__ import annotations

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def normalise_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` instead, its query kept: a Unix-socket URL
    (``postgresql+asyncpg://user@/postgres?host=/run/pg``) keeps its socket path."""
    head, _, query = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        normalise_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
    )


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
