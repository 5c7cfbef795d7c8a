"""The transactional outbox: PostgresBackend.enqueue_many_in stores tasks if and only if the caller's own
transaction commits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from lifecycle.asynctask import BackendError, DuplicateTaskError, TaskState, TransactionalBackend
from lifecycle.asynctask.postgres import PostgresBackend

from ._support import OpenPostgres, make_task

# Marked at collection time (the root conftest marks anyio tests only after collection, too late for the
# anyio_backend override in conftest.py to take effect).
pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def backend(open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str) -> PostgresBackend:
    """An opened backend, plus an application table ``orders`` in the test's schema."""
    opened = await open_pg()
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        await connection.execute(
            sql.SQL("CREATE TABLE {} (id text PRIMARY KEY)").format(sql.Identifier(pg_schema, "orders"))
        )
    return opened


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """The application's own connection, in psycopg's default (non-autocommit) mode."""
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as connection:
        yield connection


def _orders(schema: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(schema, "orders"))


async def _order_ids(dsn: str, schema: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(schema, "orders"))
        )
        return [str(row[0]) for row in await cursor.fetchall()]


async def test_the_backend_is_a_transactional_backend(backend: PostgresBackend) -> None:
    assert isinstance(backend, TransactionalBackend)


async def test_tasks_are_stored_when_the_callers_transaction_commits(
    backend: PostgresBackend,
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    pg_schema: str,
    postgres_dsn: str,
) -> None:
    async with conn.transaction():
        await conn.execute(_orders(pg_schema), ("order-1",))
        assert await backend.enqueue_many_in(conn, [make_task("ship-1"), make_task("mail-1")]) == [
            "ship-1",
            "mail-1",
        ]
        assert await backend.get("ship-1") is None, "not visible to others before the commit"
    assert await _order_ids(postgres_dsn, pg_schema) == ["order-1"]
    record = await backend.get("ship-1")
    assert record is not None
    assert record.state is TaskState.PENDING
    now = time.time()
    claimed = await backend.claim(["default"], 10, now=now, lease_until=now + 30)
    assert [c.record.id for c in claimed] == ["ship-1", "mail-1"]


async def test_tasks_vanish_when_the_callers_transaction_rolls_back(
    backend: PostgresBackend,
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    pg_schema: str,
    postgres_dsn: str,
) -> None:
    class PaymentDeclined(Exception):
        pass

    async def place_order() -> None:
        async with conn.transaction():
            await conn.execute(_orders(pg_schema), ("order-2",))
            await backend.enqueue_many_in(conn, [make_task("ship-2")])
            raise PaymentDeclined

    with pytest.raises(PaymentDeclined):
        await place_order()
    assert await backend.get("ship-2") is None
    assert await _order_ids(postgres_dsn, pg_schema) == []
    assert await backend.stats() == {}


async def test_an_enqueue_as_the_first_statement_joins_the_transaction_it_starts(
    backend: PostgresBackend,
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    pg_schema: str,
    postgres_dsn: str,
) -> None:
    # No statement ran on the connection yet and no transaction block is open: the enqueue must not
    # commit by itself, or a later rollback would leave the task behind.
    await backend.enqueue_many_in(conn, [make_task("first")])
    await conn.execute(_orders(pg_schema), ("order-3",))
    await conn.rollback()
    assert await backend.get("first") is None
    assert await _order_ids(postgres_dsn, pg_schema) == []
    await backend.enqueue_many_in(conn, [make_task("second")])
    await conn.commit()
    assert await backend.get("second") is not None


async def test_a_duplicate_leaves_the_callers_transaction_usable(
    backend: PostgresBackend,
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    pg_schema: str,
    postgres_dsn: str,
) -> None:
    await backend.enqueue_many([make_task("busy")])
    async with conn.transaction():
        await conn.execute(_orders(pg_schema), ("order-4",))
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many_in(conn, [make_task("fresh"), make_task("busy")])
        assert raised.value.task_ids == ("busy",)
        # Only the savepoint was rolled back: the order row and the transaction are intact.
        await conn.execute(_orders(pg_schema), ("order-5",))
        assert await backend.enqueue_many_in(
            conn, [make_task("fresh"), make_task("busy")], if_exists="skip"
        ) == ["fresh"]
    assert await _order_ids(postgres_dsn, pg_schema) == ["order-4", "order-5"]
    assert await backend.get("fresh") is not None
    assert sum((await backend.stats())["default"].values()) == 2


async def test_a_finished_task_id_is_replaced_inside_the_transaction(
    backend: PostgresBackend, conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    await backend.enqueue_many([make_task("again")])
    assert await backend.cancel(["again"], now=time.time()) == ["again"]
    async with conn.transaction():
        assert await backend.enqueue_many_in(conn, [make_task("again")]) == ["again"]
    record = await backend.get("again")
    assert record is not None
    assert record.state is TaskState.PENDING


async def test_on_an_autocommit_connection_the_tasks_are_committed_at_once(
    backend: PostgresBackend, postgres_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        assert await backend.enqueue_many_in(conn, [make_task("now")]) == ["now"]
        assert await backend.get("now") is not None


async def test_the_callers_row_factory_and_search_path_do_not_matter(
    backend: PostgresBackend, postgres_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn, row_factory=dict_row) as conn:
        await conn.execute("SET search_path TO pg_catalog")
        async with conn.transaction():
            assert await backend.enqueue_many_in(conn, [make_task("dicts")]) == ["dicts"]
    assert await backend.get("dicts") is not None


async def test_the_backend_need_not_be_open_but_its_tables_must_exist(
    backend: PostgresBackend,
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    postgres_dsn: str,
    pg_schema: str,
    unique_name: str,
) -> None:
    producer = PostgresBackend(postgres_dsn, schema=pg_schema)  # never opened: the web process only enqueues
    async with conn.transaction():
        assert await producer.enqueue_many_in(conn, [make_task("from-web")]) == ["from-web"]
    assert await backend.get("from-web") is not None

    missing = PostgresBackend(postgres_dsn, schema=f"{unique_name}_missing")
    async with conn.transaction():
        await conn.execute(_orders(pg_schema), ("order-6",))
        with pytest.raises(BackendError, match="do not exist in this database"):
            await missing.enqueue_many_in(conn, [make_task("lost")])
        await conn.execute(_orders(pg_schema), ("order-7",))  # the transaction is still usable
    assert await _order_ids(postgres_dsn, pg_schema) == ["order-6", "order-7"]


async def test_only_an_async_psycopg_connection_is_accepted(
    backend: PostgresBackend, postgres_dsn: str
) -> None:
    with (
        psycopg.connect(postgres_dsn) as sync_connection,
        pytest.raises(TypeError, match=r"needs a psycopg\.AsyncConnection"),
    ):
        await backend.enqueue_many_in(sync_connection, [make_task("x")])
    with pytest.raises(ValueError, match="if_exists"):
        await backend.enqueue_many_in(object(), [make_task("x")], if_exists="replace")  # type: ignore[arg-type]
