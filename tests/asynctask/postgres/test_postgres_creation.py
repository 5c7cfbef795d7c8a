"""Looking at tasks never creates a schema or a table: ``open(create=False)`` refuses a schema without the
task tables, and ``open(create="on_enqueue")`` (``AsyncTasks(..., execution=False)``) creates them only at the
first enqueue. Each test checks afterwards that its schema does (or does not) exist."""

from __future__ import annotations

import time

import psycopg
import psycopg.conninfo
import pytest
from psycopg import sql

from lifecycle.asynctask import AsyncTasks, BackendError, TaskState
from lifecycle.asynctask.postgres import PostgresBackend

from ._support import make_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def _schema_exists(dsn: str, schema: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        return await cursor.fetchone() is not None


def _with_password(dsn: str, password: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}password={password}"


async def test_open_without_create_refuses_a_missing_schema_and_creates_nothing(
    postgres_dsn: str, pg_schema: str
) -> None:
    backend = PostgresBackend(_with_password(postgres_dsn, "pw-in-dsn"), schema=pg_schema)
    with pytest.raises(BackendError) as caught:
        await backend.open(create=False)
    message = str(caught.value)
    assert f"no task tables in PostgreSQL schema {pg_schema!r}" in message
    assert "pw-in-dsn" not in message
    assert not await _schema_exists(postgres_dsn, pg_schema)
    await backend.close()


async def test_open_without_create_refuses_a_schema_without_task_tables(
    postgres_dsn: str, pg_schema: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        await connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
    backend = PostgresBackend(postgres_dsn, schema=pg_schema)
    with pytest.raises(BackendError, match="no task tables"):
        await backend.open(create=False)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (pg_schema,)
        )
        assert await cursor.fetchone() == (0,)


async def test_open_without_create_uses_existing_tables(postgres_dsn: str, pg_schema: str) -> None:
    writer = PostgresBackend(postgres_dsn, schema=pg_schema)
    await writer.open()
    await writer.enqueue_many([make_task("a", delay=3600)])
    await writer.close()
    reader = PostgresBackend(postgres_dsn, schema=pg_schema)
    await reader.open(create=False)
    try:
        assert await reader.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await reader.close()


async def test_on_enqueue_creates_the_tables_at_the_first_enqueue_only(
    postgres_dsn: str, pg_schema: str
) -> None:
    backend = PostgresBackend(postgres_dsn, schema=pg_schema)
    await backend.open(create="on_enqueue")
    try:
        assert await backend.get("nope") is None
        assert await backend.list_records() == []
        assert await backend.stats() == {}
        assert await backend.cancel(["nope"], now=time.time()) == []
        assert await backend.requeue(["nope"], now=time.time()) == 0
        assert await backend.requeue(None, now=time.time()) == 0
        assert await backend.purge(states=[TaskState.DEAD]) == 0
        assert not await _schema_exists(postgres_dsn, pg_schema)

        assert await backend.enqueue_many([make_task("a", delay=3600)]) == ["a"]
        assert await _schema_exists(postgres_dsn, pg_schema)
        assert await backend.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await backend.close()


async def test_on_enqueue_finds_tables_another_process_created_meanwhile(
    postgres_dsn: str, pg_schema: str
) -> None:
    producer = PostgresBackend(postgres_dsn, schema=pg_schema)
    await producer.open(create="on_enqueue")
    try:
        assert await producer.stats() == {}
        worker = PostgresBackend(postgres_dsn, schema=pg_schema)
        await worker.open()
        await worker.enqueue_many([make_task("from-worker", delay=3600)])
        await worker.close()
        assert await producer.cancel(["from-worker"], now=time.time()) == ["from-worker"]
    finally:
        await producer.close()


async def test_on_enqueue_creates_the_tables_for_an_outbox_enqueue(postgres_dsn: str, pg_schema: str) -> None:
    backend = PostgresBackend(postgres_dsn, schema=pg_schema)
    await backend.open(create="on_enqueue")
    try:
        outbox = [make_task("outbox", delay=3600)]
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as connection:
            await connection.execute("SELECT 1")  # the caller's transaction is open
            assert await backend.enqueue_many_in(connection, outbox) == ["outbox"]
            await connection.commit()
        record = await backend.get("outbox")
        assert record is not None
        assert record.state is TaskState.PENDING
    finally:
        await backend.close()


async def test_an_enqueue_only_asynctasks_inspects_without_creating(
    postgres_dsn: str, pg_schema: str
) -> None:
    tasks = AsyncTasks(PostgresBackend(postgres_dsn, schema=pg_schema), execution=False)

    @tasks.register(name="tests.job")
    async def job() -> None: ...

    async with tasks:
        assert await tasks.stats() == {}
        assert await tasks.list() == []
        assert await tasks.info("nope") is None
        assert await tasks.requeue_dead() == 0
        assert not await _schema_exists(postgres_dsn, pg_schema)
        task_id = await tasks.enqueue(job)
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.PENDING


async def test_a_role_that_may_only_read_can_open_and_inspect(postgres_dsn: str, pg_schema: str) -> None:
    writer = PostgresBackend(postgres_dsn, schema=pg_schema)
    await writer.open()
    await writer.enqueue_many([make_task("a", delay=3600)])
    await writer.close()
    role = sql.Identifier(pg_schema)  # a role of the test's own, dropped below
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        try:
            await admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {0} TO {0}").format(role))
            await admin.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {0} TO {0}").format(role))
            params = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
            params.update(user=pg_schema, password=None)
            reader = PostgresBackend(psycopg.conninfo.make_conninfo("", **params), schema=pg_schema)
            await reader.open(create=False)
            try:
                assert await reader.stats() == {"default": {TaskState.PENDING: 1}}
            finally:
                await reader.close()
        finally:
            await admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(role))
            await admin.execute(sql.SQL("DROP ROLE {}").format(role))
