"""Since schema version 8 the bulk enqueue's binary COPY inserts its rows one by one instead of buffering
up to 1 000 of them (see ``_schema._V8``): the volatile default of ``attempts`` makes it so. The test reads
the WAL records the COPY writes (``pg_walinspect``), in a database of this module's own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask._backends.postgres import _ops
from lifecycle.asynctask._backends.postgres import _schema as schema_module
from lifecycle.asynctask._records import NewTask
from tests.conftest import POSTGRES_DSN, require_service

from ._support import OpenPostgres

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """A database of this module's own with ``pg_walinspect`` in it, dropped after it (the extension is
    created nowhere else)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"lifecycle_copy_rows_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = POSTGRES_DSN.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            try:
                connection.execute("CREATE EXTENSION pg_walinspect")
            except psycopg.Error as exc:
                pytest.skip(f"pg_walinspect is not available on this server ({type(exc).__name__})")
        yield dsn
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _tasks(count: int, prefix: str) -> list[NewTask]:
    now = time.time()
    return [NewTask(f"{prefix}{n}", "tests.job", "default", b"[]", 0, None, now, now) for n in range(count)]


async def _heap_records(dsn: str, schema: str, start: str, end: str) -> dict[str, int]:
    """The task table's heap WAL records between ``start`` and ``end``, counted by type."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT record_type, count(*) FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn) "
            "WHERE resource_manager IN ('Heap', 'Heap2') AND block_ref LIKE '%%/' || "
            "pg_relation_filenode(%s::regclass) || ' %%' GROUP BY record_type",
            (start, end, f'"{schema}".{schema_module.TASKS_TABLE}'),
        )
        return {str(kind): int(count) for kind, count in await cursor.fetchall()}


async def _lsn(dsn: str, which: str) -> str:
    """The server's current WAL ``insert`` or ``flush`` position (pg_walinspect reads up to the latter)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(f"SELECT pg_current_wal_{which}_lsn()::text")
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])


async def test_a_bulk_copy_inserts_its_rows_one_by_one(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied: list[int] = []
    real = _ops._copy_new

    async def spy(connection: Any, st: Any, tasks: Any) -> bool:
        copied.append(len(tasks))
        return await real(connection, st, tasks)

    monkeypatch.setattr(_ops, "_copy_new", spy)
    backend = await open_pg(pool_size=1)
    tasks = _tasks(600, "c")
    start = await _lsn(postgres_dsn, "insert")
    assert await backend.enqueue_many(tasks) == [task.id for task in tasks]
    records = await _heap_records(postgres_dsn, pg_schema, start, await _lsn(postgres_dsn, "flush"))
    assert copied == [600], "the batch went by COPY"
    # One INSERT record per row (INSERT+INIT when it opens a page), no MULTI_INSERT of buffered rows.
    assert not any(kind.startswith("MULTI_INSERT") for kind in records), records
    assert sum(count for kind, count in records.items() if kind.startswith("INSERT")) == 600, records
    record = await backend.get("c599")
    assert record is not None
    assert record.attempts == 0


async def test_a_store_of_schema_version_7_is_migrated_to_the_volatile_attempts_default(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 7)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == 7
    assert await _attempts_default(postgres_dsn, pg_schema) == "0"
    monkeypatch.undo()
    backend = await open_pg(pool_size=1)  # migrates
    assert await _attempts_default(postgres_dsn, pg_schema) == "((random() * (0)::double precision))::integer"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, schema_module.SCHEMA_TABLE))
        )
        assert await cursor.fetchall() == [(schema_module.SCHEMA_VERSION,)]
    tasks = _tasks(300, "m")
    assert await backend.enqueue_many(tasks) == [task.id for task in tasks]
    records = [await backend.get(task.id) for task in (tasks[0], tasks[-1])]
    assert [None if record is None else record.attempts for record in records] == [0, 0]


async def _attempts_default(dsn: str, schema: str) -> object:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef AS d JOIN pg_attribute AS a "
            "ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = %s::regclass "
            "AND a.attname = 'attempts'",
            (f'"{schema}".{schema_module.TASKS_TABLE}',),
        )
        [(expression,)] = await cursor.fetchall()
        return expression
