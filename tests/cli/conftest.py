"""Fixtures of the command-line tests: a fresh store on every backend the CLI speaks to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.cli.cli_support import seed


@pytest.fixture(params=["sqlite", "redis", "postgres", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Path, unique_name: str) -> Iterator[str]:
    """A backend URL of a fresh, empty store, created here (the commands refuse a store that does not
    exist); the Redis keys, the PostgreSQL schema and the NATS streams are removed afterwards."""
    kind = request.param
    if kind == "sqlite":
        path = tmp_path / "tasks.db"
        url = f"sqlite:///{path}"
        seed(url)  # creates the database file (the CLI refuses to create one from a typo)
        yield url
        return
    if kind == "redis":
        base = request.getfixturevalue("redis_url")
        seed(f"{base}?prefix={unique_name}")
        yield f"{base}?prefix={unique_name}"

        async def clear() -> None:
            from lifecycle.asynctask.redis import RedisBackend

            backend = RedisBackend(base, prefix=unique_name)
            await backend.open()
            try:
                await backend.clear()
            finally:
                await backend.close()

        anyio.run(clear, backend="asyncio")
        return
    if kind == "nats":
        base = request.getfixturevalue("nats_url")
        seed(f"{base}?prefix={unique_name}")
        yield f"{base}?prefix={unique_name}"
        from tests.asynctask.nats.nats_servers import delete_streams

        anyio.run(delete_streams, base, unique_name, backend="asyncio")
        return
    dsn = request.getfixturevalue("postgres_dsn")
    seed(f"{dsn}?schema={unique_name}")
    yield f"{dsn}?schema={unique_name}"
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique_name)))
