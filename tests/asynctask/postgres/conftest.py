"""Fixtures for the PostgresBackend tests: asyncio only, one fresh schema per test, dropped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask.postgres import PostgresBackend

from ._support import OpenPostgres


@pytest.fixture(params=["asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """psycopg's async support is asyncio-only, so these tests run on asyncio alone. (Parametrised with one
    value: a plain override of the root conftest's parametrised fixture would still run every test twice.)"""
    return str(request.param)


@pytest.fixture
def pg_schema(postgres_dsn: str, unique_name: str) -> Iterator[str]:
    """A schema name unique to this test; the schema is dropped (CASCADE) after the test."""
    yield unique_name
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique_name)))


@pytest.fixture
async def open_pg(postgres_dsn: str, pg_schema: str) -> AsyncIterator[OpenPostgres]:
    """Open PostgresBackend objects over the test's schema (``dsn`` and keyword options may be given); all
    are closed after the test."""
    opened: list[PostgresBackend] = []

    async def factory(*, dsn: str = postgres_dsn, **options: Any) -> PostgresBackend:
        options.setdefault("schema", pg_schema)
        backend = PostgresBackend(dsn, **options)
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        await backend.close()
