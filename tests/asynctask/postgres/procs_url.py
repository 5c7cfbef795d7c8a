"""A fresh PostgreSQL backend URL for the multi-process harness (``tests/asynctask/test_processes.py``).

Plug it in with::

    from postgres.procs_url import postgres_url
    BACKENDS["postgres"] = postgres_url
    WORKER_LIBRARIES["postgres"] = ("asyncio", "asyncio", "asyncio")  # PostgresBackend is asyncio-only
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

__all__ = ["postgres_url"]


def postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yield ``postgresql://...?schema=<fresh>`` on the shared server (skips, or fails under
    LIFECYCLE_REQUIRE_SERVICES=1, when it is down); the schema is dropped after the test."""
    dsn = str(request.getfixturevalue("postgres_dsn"))  # checks that the shared server is up
    schema = f"t_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in dsn else "?"
    yield f"{dsn}{separator}schema={schema}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
