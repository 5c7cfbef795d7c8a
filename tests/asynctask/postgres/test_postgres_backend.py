"""What only PostgresBackend has: configuration checks, asyncio only, the versioned schema, quoting, SKIP
LOCKED claims, LISTEN/NOTIFY wake-ups and reconnecting after the server dropped a connection."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import psycopg.conninfo
import pytest
import trio
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from lifecycle.asynctask import (
    BackendError,
    DuplicateTaskError,
    NewTask,
    Settlement,
    TaskState,
    backend_from_url,
)
from lifecycle.asynctask._backends.postgres import _schema as schema_module
from lifecycle.asynctask._backends.postgres._arrays import (
    BytesArray,
    FloatArray,
    Int8Array,
    IntArray,
    TextArray,
)
from lifecycle.asynctask._backends.postgres._arrays import register as register_arrays
from lifecycle.asynctask.postgres import PostgresBackend

from ._support import OpenPostgres, make_task, start_listening

# Marked at collection time (the root conftest marks anyio tests only after collection, too late for the
# anyio_backend override in conftest.py to take effect).
pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _with_app_name(dsn: str, name: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


async def _execute(
    dsn: str, query: sql.Composable | str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(query, params)  # type: ignore[arg-type]
        return await cursor.fetchall() if cursor.description else []


# -- configuration ----------------------------------------------------------------------------------------


def test_constructor_rejects_bad_arguments_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="cannot parse the connection string"):
        PostgresBackend("host=127.0.0.1 port")
    with pytest.raises(ValueError, match="63-byte limit"):
        PostgresBackend("postgresql://127.0.0.1/test", schema="s" * 64)
    with pytest.raises(ValueError, match="non-empty"):
        PostgresBackend("postgresql://127.0.0.1/test", schema="")
    with pytest.raises(ValueError, match="pool_size"):
        PostgresBackend("postgresql://127.0.0.1/test", pool_size=0)
    with pytest.raises(ValueError, match="poll_interval"):
        PostgresBackend("postgresql://127.0.0.1/test", poll_interval=0)
    with pytest.raises(ValueError, match=r"connect_timeout=...\) must be a finite number of seconds"):
        PostgresBackend("postgresql://127.0.0.1/test", connect_timeout=float("inf"))
    with pytest.raises(TypeError, match="connection string"):
        PostgresBackend(b"postgresql://127.0.0.1/test")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"PostgresBackend\(schema=...\) must be a non-empty string, got 5"):
        PostgresBackend("postgresql://127.0.0.1/test", schema=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"PostgresBackend\(pool_size=...\) must be a whole number"):
        PostgresBackend("postgresql://127.0.0.1/test", pool_size=2.0)  # type: ignore[arg-type]


def test_repr_never_shows_the_password() -> None:
    backend = PostgresBackend("postgresql://app:s3cret-pw@127.0.0.1:5432/test", schema="app")
    assert "s3cret-pw" not in repr(backend)
    assert "127.0.0.1" in repr(backend)
    assert "app" in repr(backend)


def test_opening_under_trio_raises_a_clear_backend_error(postgres_dsn: str) -> None:
    backend = PostgresBackend(postgres_dsn, schema="never_created")

    async def open_under_trio() -> None:
        await backend.open()

    with pytest.raises(BackendError, match=r"needs asyncio, but it runs under trio"):
        trio.run(open_under_trio)


async def test_an_unreachable_server_raises_backend_error_without_the_password() -> None:
    with anyio.fail_after(30):
        with pytest.raises(BackendError, match="cannot connect to PostgreSQL") as raised:
            # Port 1 on the loopback interface: nothing listens there, the connection is refused at once.
            await PostgresBackend("postgresql://app:s3cret-pw@127.0.0.1:1/test", connect_timeout=5).open()
    assert "s3cret-pw" not in str(raised.value)
    assert "127.0.0.1:1" in str(raised.value)  # the DSN as given, password masked


async def test_calls_before_open_raise_a_clear_error(postgres_dsn: str, pg_schema: str) -> None:
    backend = PostgresBackend(postgres_dsn, schema=pg_schema)
    with pytest.raises(BackendError, match=r"is not open: call `await backend.open\(\)` first"):
        await backend.get("x")
    await backend.close()  # closing a backend that was never opened is fine


async def test_backend_from_url_builds_a_postgres_backend_with_the_schema_option(
    postgres_dsn: str, pg_schema: str
) -> None:
    backend = backend_from_url(f"{postgres_dsn}?schema={pg_schema}")
    assert isinstance(backend, PostgresBackend)
    assert backend.schema == pg_schema
    await backend.open()
    try:
        assert await backend.enqueue_many([make_task("via-url")]) == ["via-url"]
    finally:
        await backend.close()
    rows = await _execute(
        postgres_dsn, sql.SQL("SELECT id FROM {}").format(sql.Identifier(pg_schema, "lifecycle_tasks"))
    )
    assert rows == [("via-url",)]


# -- schema -----------------------------------------------------------------------------------------------


async def test_open_creates_a_versioned_schema(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    await open_pg()
    rows = await _execute(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    )
    assert rows == [(schema_module.SCHEMA_VERSION,)]
    await open_pg()  # a second object over the same schema opens it as it is
    assert (
        len(
            await _execute(
                postgres_dsn,
                sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema")),
            )
        )
        == 1
    )


async def test_many_processes_may_create_the_schema_at_once(open_pg: OpenPostgres) -> None:
    opened: list[PostgresBackend] = []

    async def open_one() -> None:
        opened.append(await open_pg())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(open_one)
    assert len(opened) == 5
    await opened[0].enqueue_many([make_task("after-racing-opens")])
    assert (await opened[4].get("after-racing-opens")) is not None


async def test_a_schema_written_by_a_newer_version_is_refused(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    await open_pg()
    newer = schema_module.SCHEMA_VERSION + 1
    await _execute(
        postgres_dsn,
        sql.SQL("UPDATE {} SET version = %s").format(sql.Identifier(pg_schema, "lifecycle_schema")),
        (newer,),
    )
    with pytest.raises(BackendError, match=rf"newer anyio-lifecycle \(schema version {newer}"):
        await open_pg()


async def test_a_foreign_tasks_table_is_refused(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    await _execute(postgres_dsn, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
    await _execute(
        postgres_dsn,
        sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(pg_schema, "lifecycle_tasks")),
    )
    with pytest.raises(BackendError, match="did not create"):
        await open_pg()


async def test_an_older_schema_is_migrated_step_by_step(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await open_pg()
    await (await open_pg()).enqueue_many([make_task("kept")])
    steps: list[int] = []

    async def add_column(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
        steps.append(1)
        table = sql.Identifier(schema, "lifecycle_tasks")
        await cursor.execute(sql.SQL("ALTER TABLE {} ADD COLUMN added_by_the_test integer").format(table))

    current = schema_module.SCHEMA_VERSION
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(schema_module._MIGRATIONS, current, add_column)
    migrated = await open_pg()
    assert steps == [1]
    versions = await _execute(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    )
    assert versions == [(current + 1,)]
    columns = await _execute(
        postgres_dsn,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND column_name = %s",
        (pg_schema, "added_by_the_test"),
    )
    assert columns == [("added_by_the_test",)]
    assert (await migrated.get("kept")) is not None, "a migration keeps the stored tasks"
    await open_pg()
    assert steps == [1], "a migrated schema is not migrated again"


async def _function_settings(dsn: str, schema: str) -> dict[str, list[str]]:
    rows = await _execute(
        dsn,
        "SELECT p.proname, p.proconfig FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s",
        (schema,),
    )
    return {str(name): list(config or []) for name, config in rows}  # type: ignore[call-overload]


async def test_a_store_of_schema_version_3_is_migrated_to_claims_without_jit(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Version 3 as the previous release created it, with a task in it.
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 3)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == 3
    before = await _function_settings(postgres_dsn, pg_schema)
    assert "jit=off" not in before["lifecycle_claim"]
    assert "jit=off" not in before["lifecycle_claim_limited"]
    old = PostgresBackend(postgres_dsn, schema=pg_schema)
    await old.open()
    try:
        await old.enqueue_many([make_task("kept")])
    finally:
        await old.close()
    monkeypatch.undo()

    backend = await open_pg()  # migrates (through version 4 and on)
    versions = await _execute(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    )
    assert versions == [(schema_module.SCHEMA_VERSION,)]
    after = await _function_settings(postgres_dsn, pg_schema)
    for name in ("lifecycle_claim", "lifecycle_claim_limited"):
        assert "jit=off" in after[name], name
        # The settings version 3 gave them are kept.
        assert set(before[name]) <= set(after[name]), name
    claimed = await backend.claim(["default"], 5, now=time.time() + 1, lease_until=time.time() + 60)
    assert [c.record.id for c in claimed] == ["kept"]


async def _claim_source(dsn: str, schema: str) -> str:
    [(source,)] = await _execute(
        dsn,
        "SELECT p.prosrc FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname = 'lifecycle_claim'",
        (schema,),
    )
    return str(source)


async def test_a_store_of_schema_version_4_is_migrated_to_the_claim_that_enters_groups_at_their_head(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Version 4 as the previous release created it, with due tasks of two priorities in it.
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 4)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == 4
    assert "first_run" not in await _claim_source(postgres_dsn, pg_schema)
    old = PostgresBackend(postgres_dsn, schema=pg_schema)
    await old.open()
    try:
        await old.enqueue_many([make_task("low-1"), make_task("low-2")])
        await old.enqueue_many([dataclasses.replace(make_task("high"), priority=5)])
    finally:
        await old.close()
    monkeypatch.undo()

    backend = await open_pg()  # migrates
    versions = await _execute(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    )
    assert versions == [(schema_module.SCHEMA_VERSION,)]
    assert "first_run" in await _claim_source(postgres_dsn, pg_schema)
    settings = await _function_settings(postgres_dsn, pg_schema)
    assert "jit=off" in settings["lifecycle_claim"], "the replaced claim keeps version 4's setting"
    assert "plan_cache_mode=force_generic_plan" in settings["lifecycle_claim"]
    now = time.time() + 1
    claimed = await backend.claim(["default"], 2, now=now, lease_until=now + 60)
    assert [c.record.id for c in claimed] == ["high", "low-1"]


async def _state_checks(dsn: str, schema: str) -> list[Any]:
    return await _execute(
        dsn,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'c'",
        (f'"{schema}".lifecycle_tasks',),
    )


_ONE_ARRAY_CHECK = [
    (
        "lifecycle_tasks_state_check",
        "CHECK ((state = ANY ('{pending,active,succeeded,dead,cancelled}'::text[]))) NOT VALID",
    )
]

_DOMAIN_CHECK = [
    (
        "lifecycle_state_check",
        "CHECK ((VALUE = ANY ('{pending,active,succeeded,dead,cancelled}'::text[]))) NOT VALID",
    )
]


async def _domain_checks(dsn: str, schema: str) -> list[Any]:
    """The CHECKs of the domain that is the type of the task table's state column."""
    return await _execute(
        dsn,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contypid = (SELECT atttypid FROM pg_attribute WHERE attrelid = %s::regclass "
        "AND attname = 'state') AND contype = 'c'",
        (f'"{schema}".lifecycle_tasks',),
    )


async def _state_type(dsn: str, schema: str) -> object:
    [(name,)] = await _execute(
        dsn,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
        "AND attname = 'state'",
        (f'"{schema}".lifecycle_tasks',),
    )
    return name


async def _index_definitions(dsn: str, schema: str) -> list[Any]:
    return await _execute(
        dsn,
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
        "WHERE indrelid = %s::regclass ORDER BY 1",
        (f'"{schema}".lifecycle_tasks',),
    )


async def _open_at_version(
    postgres_dsn: str, pg_schema: str, version: int, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """A store at ``version`` as that release created it, with a pending and a claimed task in it; returns
    the claimed task."""
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", version)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == version
    old = PostgresBackend(postgres_dsn, schema=pg_schema)
    await old.open()
    try:
        await old.enqueue_many([make_task("first"), make_task("second")])
        now = time.time() + 1
        (held,) = await old.claim(["default"], 1, now=now, lease_until=now + 60)
    finally:
        await old.close()
    monkeypatch.undo()
    return held


async def _assert_the_migrated_store_works(
    backend: PostgresBackend, postgres_dsn: str, pg_schema: str, held: Any
) -> None:
    versions = await _execute(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    )
    assert versions == [(schema_module.SCHEMA_VERSION,)]
    assert await _state_checks(postgres_dsn, pg_schema) == []
    assert await _domain_checks(postgres_dsn, pg_schema) == _DOMAIN_CHECK
    now = time.time() + 1
    settled = Settlement(task_id=held.record.id, token=held.token, state=TaskState.SUCCEEDED, at=now)
    assert await backend.settle([settled]) == set()
    claimed = await backend.claim(["default"], 5, now=now, lease_until=now + 60)
    assert [c.record.id for c in claimed] == ["second"]
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 1, TaskState.ACTIVE: 1}}
    with pytest.raises(psycopg.errors.CheckViolation):
        await _execute(
            postgres_dsn,
            sql.SQL("UPDATE {} SET state = 'paused' WHERE id = 'second'").format(
                sql.Identifier(pg_schema, "lifecycle_tasks")
            ),
        )


async def test_a_store_of_schema_version_5_is_migrated_to_the_state_check_on_the_domain(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = await _open_at_version(postgres_dsn, pg_schema, 5, monkeypatch)
    [(name, before)] = await _state_checks(postgres_dsn, pg_schema)
    assert name == "lifecycle_tasks_state_check"
    assert "ARRAY['pending'::text" in before, before
    backend = await open_pg()  # migrates through version 6
    await _assert_the_migrated_store_works(backend, postgres_dsn, pg_schema, held)


async def test_a_store_of_schema_version_6_is_migrated_to_the_state_check_on_the_domain_in_place(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 7 makes the state column the domain ``lifecycle_state`` and moves the table's CHECK onto it:
    the table is not rewritten (its file stays), every index keeps its definition (the six partial ones are
    rebuilt: their predicates read the column)."""
    held = await _open_at_version(postgres_dsn, pg_schema, 6, monkeypatch)
    assert await _state_checks(postgres_dsn, pg_schema) == _ONE_ARRAY_CHECK
    assert await _state_type(postgres_dsn, pg_schema) == "text"
    table_file = "SELECT pg_relation_filenode(%s::regclass)"
    table = (f'"{pg_schema}".lifecycle_tasks',)
    before_file = await _execute(postgres_dsn, table_file, table)
    before_indexes = await _index_definitions(postgres_dsn, pg_schema)

    backend = await open_pg()  # migrates
    assert await _state_type(postgres_dsn, pg_schema) == f"{pg_schema}.lifecycle_state"
    assert await _execute(postgres_dsn, table_file, table) == before_file
    # The predicates read the domain as its base type: (state)::text where the text column was state.
    after_indexes = await _index_definitions(postgres_dsn, pg_schema)
    assert [(name, text.replace("(state)::text", "state")) for name, text in after_indexes] == before_indexes
    assert sum("(state)::text" in text for _, text in after_indexes) == 6
    await _assert_the_migrated_store_works(backend, postgres_dsn, pg_schema, held)
    record = await backend.get("second")
    assert record is not None
    assert record.state is TaskState.ACTIVE
    # The server describes a domain column by its base type: readers decode the state as text, as before.
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        query = sql.SQL("SELECT state FROM {} WHERE id = 'second'")
        cursor = await connection.execute(query.format(sql.Identifier(pg_schema, "lifecycle_tasks")))
        assert cursor.description is not None
        assert cursor.description[0].type_code == 25  # text
        assert await cursor.fetchall() == [("active",)]


async def test_a_new_store_has_the_state_check_on_the_domain(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    await open_pg()
    assert await _state_checks(postgres_dsn, pg_schema) == []
    assert await _domain_checks(postgres_dsn, pg_schema) == _DOMAIN_CHECK
    assert await _state_type(postgres_dsn, pg_schema) == f"{pg_schema}.lifecycle_state"


async def test_a_new_store_has_claims_without_jit(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    await open_pg()
    settings = await _function_settings(postgres_dsn, pg_schema)
    assert "jit=off" in settings["lifecycle_claim"]
    assert "jit=off" in settings["lifecycle_claim_limited"]


async def test_odd_schema_names_are_quoted_safely(postgres_dsn: str, unique_name: str) -> None:
    name = f'Odd "Schema"; DROP TABLE x; -- {unique_name}'  # unique: the test drops it afterwards
    backend = PostgresBackend(postgres_dsn, schema=name)
    try:
        await backend.open()
        await backend.enqueue_many([make_task("quoted")])
        now = time.time()
        (claimed,) = await backend.claim(["default"], 5, now=now, lease_until=now + 30)
        assert claimed.record.id == "quoted"
        with anyio.fail_after(10):
            await backend.wait_for_work(["default"], timeout=0)
    finally:
        await backend.close()
        await _execute(postgres_dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- claims -----------------------------------------------------------------------------------------------


async def test_claim_skips_rows_locked_by_another_transaction_instead_of_waiting(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg()
    start = time.time() - 10
    await backend.enqueue_many([make_task(f"t{n}", at=start + n) for n in range(3)])
    table = sql.Identifier(pg_schema, "lifecycle_tasks")
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as locker:
        # Another session holds the oldest task's row lock (as a concurrent claimer would, mid-statement).
        await locker.execute(sql.SQL("SELECT id FROM {} WHERE id = 't0' FOR UPDATE").format(table))
        with anyio.fail_after(10):
            now = time.time()
            claimed = await backend.claim(["default"], 10, now=now, lease_until=now + 30)
        assert [c.record.id for c in claimed] == ["t1", "t2"], "a locked row is skipped, not waited for"
        await locker.rollback()
    now = time.time()
    assert [c.record.id for c in await backend.claim(["default"], 10, now=now, lease_until=now + 30)] == [
        "t0"
    ]


async def test_a_large_batch_is_enqueued_claimed_and_settled(open_pg: OpenPostgres) -> None:
    from lifecycle.asynctask import Settlement

    backend = await open_pg()
    now = time.time()
    ids = await backend.enqueue_many([make_task(f"big{n:05d}", at=now) for n in range(5000)])
    assert len(ids) == 5000
    claimed = await backend.claim(["default"], 5000, now=now + 1, lease_until=now + 60)
    assert [c.record.id for c in claimed] == ids, "one claim takes the whole batch, in enqueue order"
    verdicts = [
        Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=now + 2) for c in claimed
    ]
    assert await backend.settle(verdicts) == set()
    assert (await backend.stats())["default"] == {TaskState.SUCCEEDED: 5000}


# -- LISTEN / NOTIFY --------------------------------------------------------------------------------------


async def _start_waiter(
    group: anyio.abc.TaskGroup, backend: PostgresBackend, queue: str, returned: anyio.Event
) -> None:
    async def wait() -> None:
        await backend.wait_for_work([queue], timeout=120)
        returned.set()

    group.start_soon(wait)
    await anyio.wait_all_tasks_blocked()


async def test_an_enqueue_wakes_an_idle_worker_through_notify_not_polling(open_pg: OpenPostgres) -> None:
    waiter = await open_pg(poll_interval=3600)  # polling would take an hour: only NOTIFY can wake it
    producer = await open_pg()
    returned = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "default", returned)
            await producer.enqueue_many([make_task("wake")])
            await returned.wait()


async def test_a_notify_for_another_queue_does_not_wake_the_worker(open_pg: OpenPostgres) -> None:
    waiter = await open_pg(poll_interval=3600)
    producer = await open_pg()
    default_returned, other_returned = anyio.Event(), anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "default", default_returned)
            await _start_waiter(group, waiter, "other", other_returned)
            await producer.enqueue_many([make_task("elsewhere", queue="other")])
            await other_returned.wait()
            await anyio.wait_all_tasks_blocked()
            assert not default_returned.is_set(), "a task in queue 'other' must not wake a 'default' worker"
            await producer.enqueue_many([make_task("here")])
            await default_returned.wait()


async def test_a_delayed_task_caps_the_wait_even_with_a_long_poll_interval(open_pg: OpenPostgres) -> None:
    waiter = await open_pg(poll_interval=3600)
    producer = await open_pg()
    await producer.enqueue_many([make_task("soon", delay=0.3)])
    with anyio.fail_after(10):
        while True:
            now = time.time()
            if await waiter.claim(["default"], 1, now=now, lease_until=now + 30):
                break
            await waiter.wait_for_work(["default"], timeout=120)


async def _notifications_delivered(backend: PostgresBackend, dsn: str) -> None:
    """Return once every notification committed so far has reached ``backend``'s listener: they arrive in
    commit order, so it is enough to see a marker sent now."""
    returned = anyio.Event()
    async with anyio.create_task_group() as group:
        await _start_waiter(group, backend, "marker", returned)
        await _execute(dsn, "SELECT pg_notify(%s, 'marker')", (backend.channel,))
        await returned.wait()


async def test_a_due_task_is_reported_once_so_a_caller_that_cannot_claim_it_does_not_spin(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    backend = await open_pg(poll_interval=3600)
    await backend.enqueue_many([make_task("due")])
    with anyio.fail_after(10):
        await _notifications_delivered(backend, postgres_dsn)  # the enqueue's own NOTIFY is no news later
        await backend.wait_for_work(["default"], timeout=120)  # due now: returns at once
    started = anyio.current_time()
    await backend.wait_for_work(["default"], timeout=0.3)  # nothing changed: waits for the timeout
    assert anyio.current_time() - started >= 0.29


async def test_notifications_are_sent_on_commit_only(open_pg: OpenPostgres, postgres_dsn: str) -> None:
    waiter = await open_pg(poll_interval=3600)
    producer = await open_pg()
    default_returned = anyio.Event()
    # A connection in psycopg's default mode (not autocommit), with no statement run yet: the enqueue
    # itself starts the transaction, which must stay open until the commit below.
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as outbox:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                await _start_waiter(group, waiter, "default", default_returned)
                await producer.enqueue_many_in(outbox, [make_task("in-transaction")])
                # Notifications arrive in commit order: once a later one is in, an early one would be too.
                await _notifications_delivered(waiter, postgres_dsn)
                await anyio.wait_all_tasks_blocked()
                assert not default_returned.is_set(), "an uncommitted enqueue must not wake workers"
                await outbox.commit()
                await default_returned.wait()


async def _reconnected(backend: PostgresBackend) -> None:
    # The listener reconnects in a background task with its own backoff; there is no event to wait on
    # from outside, so look at its state at each turn, bounded by the caller's deadline.
    while not backend.listening:
        await anyio.sleep(0.02)


async def test_the_listen_connection_reconnects_after_the_server_dropped_it(
    open_pg: OpenPostgres, postgres_dsn: str, unique_name: str
) -> None:
    app = f"lc_listen_{unique_name}"
    waiter = await open_pg(poll_interval=3600, dsn=_with_app_name(postgres_dsn, app))
    producer = await open_pg()
    with anyio.fail_after(20):
        await start_listening(waiter)
    terminated = await _execute(
        postgres_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
        (app,),
    )
    assert terminated == [(True,)]
    with anyio.fail_after(20):
        # Losing the connection wakes idle workers (notifications may have been missed) ...
        await waiter.wait_for_work(["default"], timeout=120)
        await _reconnected(waiter)
        # ... and once it is back, notifications wake them again.
        returned = anyio.Event()
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "default", returned)
            await producer.enqueue_many([make_task("after-reconnect")])
            await returned.wait()


async def _terminate(dsn: str, select_pids: str, app: str) -> list[int]:
    """End the sessions ``select_pids`` selects (given ``app``) and return once they are gone: the server
    ends a session when its process handles the signal, a moment after ``pg_terminate_backend`` returns.
    (Its wait argument needs PostgreSQL 14, and 13 is supported.) Bound it with the caller's fail_after."""
    pids = [int(str(row[0])) for row in await _execute(dsn, select_pids, (app,))]
    assert pids
    for pid in pids:
        assert await _execute(dsn, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    while await _execute(dsn, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)):
        await anyio.sleep(0.01)
    return pids


async def test_pooled_connections_dropped_by_the_server_are_replaced(
    open_pg: OpenPostgres, postgres_dsn: str, unique_name: str
) -> None:
    app = f"lc_pool_{unique_name}"
    backend = await open_pg(dsn=_with_app_name(postgres_dsn, app))
    await backend.enqueue_many([make_task("before")])
    with anyio.fail_after(20):
        await _terminate(
            postgres_dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query NOT LIKE 'LISTEN%%'",
            app,
        )
        assert (await backend.get("before")) is not None
        assert await backend.enqueue_many([make_task("after")]) == ["after"]


async def test_a_healthy_pooled_connection_is_handed_out_without_a_liveness_round_trip(
    open_pg: OpenPostgres, postgres_dsn: str, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[object] = []
    full_check = AsyncConnectionPool.check_connection

    async def counting_check(connection: psycopg.AsyncConnection[object]) -> None:
        checked.append(connection)
        await full_check(connection)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", counting_check)
    app = f"lc_check_{unique_name}"
    backend = await open_pg(dsn=_with_app_name(postgres_dsn, app), pool_size=1)
    for n in range(5):
        await backend.enqueue_many([make_task(f"t{n}")])
        assert await backend.get(f"t{n}") is not None
    assert checked == [], "a connection the server said nothing to is handed out as it is"

    with anyio.fail_after(20):
        pids = await _terminate(
            postgres_dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query NOT LIKE 'LISTEN%%'",
            app,
        )
        assert len(pids) == 1
        # The server's goodbye made the idle socket readable: the check runs, fails, and the pool replaces
        # the connection, so the caller never sees the broken one.
        assert await backend.get("t0") is not None
    assert len(checked) == 1


@contextlib.asynccontextmanager
async def _round_trips(
    backend: PostgresBackend, kinds: tuple[str, ...] = ("Sync", "Query")
) -> AsyncIterator[list[str]]:
    """The messages the one pooled connection of ``backend`` (``pool_size=1``) sends meanwhile that end a
    round trip (``Sync`` of a statement, ``Query`` of a simple query), or those of ``kinds``, read from
    libpq's protocol trace."""
    sent: list[str] = []
    with tempfile.TemporaryFile() as trace:
        async with backend._connection() as connection:
            connection.pgconn.trace(trace.fileno())
            connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            async with backend._connection() as connection:
                connection.pgconn.untrace()
            trace.seek(0)
            for line in trace.read().decode(errors="replace").splitlines():
                fields = line.split("\t")
                if fields[0] == "F" and fields[2] in kinds:
                    sent.append(fields[2])


async def test_a_single_enqueue_is_one_round_trip_wake_up_included(open_pg: OpenPostgres) -> None:
    waiter = await open_pg(poll_interval=3600)
    backend = await open_pg(pool_size=1)
    await backend.enqueue_many([make_task("warm-up")])
    returned = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "wake", returned)
            async with _round_trips(backend) as sent:
                assert await backend.enqueue_many([make_task("one", queue="wake")]) == ["one"]
            await returned.wait()  # its NOTIFY was sent, by the same statement's commit
    assert sent == ["Sync"]
    async with _round_trips(backend) as sent:
        stored = await backend.enqueue_many([make_task("one"), make_task("two")], if_exists="skip")
    assert stored == ["two"]
    assert sent == ["Sync"], "a batch of skip has nothing to undo: one statement too"
    record = await backend.get("two")
    assert record is not None
    assert record.state is TaskState.PENDING


async def test_a_batch_of_new_tasks_is_one_round_trip_wake_up_included(open_pg: OpenPostgres) -> None:
    # A batch of error below the COPY size (the coalesced single enqueues): one statement in autocommit,
    # all or nothing, without BEGIN and COMMIT.
    waiter = await open_pg(poll_interval=3600)
    backend = await open_pg(pool_size=1)
    await backend.enqueue_many([make_task("warm-up")])
    batch = [make_task(f"n{n:02d}", queue="wake") for n in range(40)]
    returned = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "wake", returned)
            async with _round_trips(backend) as sent:
                assert await backend.enqueue_many(batch) == [task.id for task in batch]
            await returned.wait()
    assert sent == ["Sync"]
    record = await backend.get("n39")
    assert record is not None
    assert record.state is TaskState.PENDING


async def test_a_single_enqueue_of_a_live_id_stores_nothing_and_raises(open_pg: OpenPostgres) -> None:
    backend = await open_pg(pool_size=1)
    await backend.enqueue_many([make_task("taken", delay=60)])
    with pytest.raises(DuplicateTaskError, match="taken"):
        await backend.enqueue_many([make_task("taken")])
    record = await backend.get("taken")
    assert record is not None
    assert record.run_at > time.time() + 30, "the stored task is left as it was"
    # A batch of "error" keeps its transaction: nothing of it is stored when one id is taken.
    with pytest.raises(DuplicateTaskError, match="taken"):
        await backend.enqueue_many([make_task("fresh"), make_task("taken")])
    assert await backend.get("fresh") is None


async def test_a_single_enqueue_is_a_prepared_statement(open_pg: OpenPostgres) -> None:
    # psycopg prepares a statement after five executions of the same text on a connection: the single
    # enqueue's text never changes, so from then on the server neither parses nor plans it again.
    backend = await open_pg(pool_size=1)
    for n in range(8):
        await backend.enqueue_many([make_task(f"p{n}")])
    async with backend._connection() as connection:
        cursor = await connection.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [str(row[0]) for row in await cursor.fetchall()]
    assert any("INSERT INTO" in text and "VALUES" in text for text in prepared), prepared


async def test_the_settlements_arrays_reach_the_server_as_given(postgres_dsn: str) -> None:
    # The array classes of _arrays, dumped in one pass on a pooled connection and as plain lists elsewhere.
    values: list[tuple[Any, str]] = [
        (TextArray(["a", None, "", "é ☃", '{a,"b"}', "NULL"]), "text[]"),
        (TextArray(), "text[]"),
        (BytesArray([b"\x00\xff", None, b""]), "bytea[]"),
        (IntArray([0, -1, 2147483647, None]), "int4[]"),
        (Int8Array([0, -1, 9223372036854775807, -(10**15), None]), "int8[]"),
        # One value throughout: packed once.
        (TextArray(["é", "é", "é"]), "text[]"),
        (TextArray([None, None]), "text[]"),
        (IntArray([7, 7, 7]), "int4[]"),
        (Int8Array([None, None, None]), "int8[]"),
        (FloatArray([2.5, 2.5]), "float8[]"),
        (FloatArray([None]), "float8[]"),
        (FloatArray([1.5, None, 1796598127.3867579, float("inf"), 3.0]), "float8[]"),
    ]
    for registered in (True, False):
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
            if registered:
                register_arrays(connection.adapters)
            for value, kind in values:
                cursor = await connection.execute(
                    sql.SQL("SELECT %s::{}, cardinality(%s::{})").format(sql.SQL(kind), sql.SQL(kind)),
                    (value, value),
                )
                row = await cursor.fetchone()
                assert row == ((list(value) or []), len(value)), (registered, kind)


async def test_a_batch_with_a_number_out_of_its_columns_range_is_refused_whole(open_pg: OpenPostgres) -> None:
    # The new tasks' integer columns go as binary int4/int8 arrays only when every value fits; otherwise as
    # before (a plain list), so the server refuses the value with its usual error and stores nothing.
    backend = await open_pg(pool_size=1)
    for n in range(2):  # the pooled connection's arrays, and again after the refusal
        batch = [make_task(f"r{n}{i}") for i in range(3)]
        batch[1] = dataclasses.replace(batch[1], max_retries=2**31)
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):
            await backend.enqueue_many(batch)
        assert await backend.get(f"r{n}0") is None
    fits = [
        dataclasses.replace(make_task(f"f{i}"), max_retries=2**31 - 1, priority=10**15 - 1) for i in range(3)
    ]
    assert await backend.enqueue_many(fits) == ["f0", "f1", "f2"]
    record = await backend.get("f1")
    assert record is not None
    assert (record.max_retries, record.priority) == (2**31 - 1, 10**15 - 1)


async def test_zeros_of_both_signs_reach_the_server_as_given(postgres_dsn: str) -> None:
    # 0.0 == -0.0, so an array of them is not "one value throughout": each keeps its sign.
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        register_arrays(connection.adapters)
        for values in ([-0.0, 0.0], [0.0, -0.0], [-0.0, -0.0], [0, -0.0]):
            cursor = await connection.execute("SELECT %s::float8[]", (FloatArray(values),))
            row = await cursor.fetchone()
            assert row is not None
            assert [math.copysign(1, value) for value in row[0]] == [math.copysign(1, v) for v in values]


# -- large batches by binary COPY -------------------------------------------------------------------------


def _full_task(task_id: str, now: float, **fields: object) -> NewTask:
    """A task with every optional field set, due at ``now``."""
    values: dict[str, Any] = {
        "id": task_id,
        "name": "tests.job",
        "queue": "bulk",
        "payload": b"\x00bytes " + task_id.encode(),
        "max_retries": 7,
        "timeout": 2.5,
        "enqueued_at": now,
        "run_at": now,
        "meta": '{"tenant":"acme"}',
        "priority": 3,
        "concurrency_key": "user-1",
        "expires_at": now + 3600,
    }
    values.update(fields)
    return NewTask(**values)


async def test_a_large_batch_is_copied_in_batch_order_with_every_field_and_wakes_a_worker(
    open_pg: OpenPostgres,
) -> None:
    waiter = await open_pg(poll_interval=3600)  # only NOTIFY can wake it in time
    producer = await open_pg(pool_size=1)
    now = time.time()
    # Enqueue times decreasing: the claim order (same priority and run_at) is the batch's order, by seq.
    batch = [_full_task(f"c{n:03d}", now, enqueued_at=now - n) for n in range(300)]
    returned = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, "bulk", returned)
            async with _round_trips(producer, ("CopyData", "CopyDone")) as sent:
                assert await producer.enqueue_many(batch) == [task.id for task in batch]
            await returned.wait()
    assert "CopyDone" in sent, "a batch this large goes by COPY"
    record = await producer.get("c005")
    assert record is not None
    assert (record.state, record.attempts, record.queue, record.payload) == (
        TaskState.PENDING,
        0,
        "bulk",
        b"\x00bytes c005",
    )
    assert (record.max_retries, record.timeout, record.enqueued_at, record.run_at) == (7, 2.5, now - 5, now)
    assert (record.meta, record.priority, record.concurrency_key, record.expires_at) == (
        '{"tenant":"acme"}',
        3,
        "user-1",
        now + 3600,
    )
    assert (record.group_id, record.fault) == (None, None)
    claimed = await waiter.claim(["bulk"], 400, now=now + 1, lease_until=now + 60)
    assert [c.record.id for c in claimed] == [task.id for task in batch]


@pytest.mark.parametrize("size", [40, 280], ids=["one-statement", "copy"])
async def test_a_batch_with_a_taken_or_repeated_id_is_sorted_out_as_a_small_one_is(
    open_pg: OpenPostgres, size: int
) -> None:
    from lifecycle.asynctask import Settlement

    backend = await open_pg(pool_size=1)
    now = time.time()
    await backend.enqueue_many([make_task("live", delay=60), make_task("done", at=now)])
    (done,) = await backend.claim(["default"], 5, now=now + 1, lease_until=now + 60)
    await backend.settle([Settlement("done", done.token, TaskState.SUCCEEDED, at=now + 2)])
    batch = [make_task(f"b{n:03d}", at=now) for n in range(size)]

    with pytest.raises(DuplicateTaskError, match="live"):
        await backend.enqueue_many([*batch, make_task("live")])
    assert await backend.get("b000") is None, "nothing of a refused batch is stored"
    with pytest.raises(DuplicateTaskError, match="b003"):
        await backend.enqueue_many([*batch, make_task("b003")])
    assert await backend.get("b000") is None
    with pytest.raises(ValueError, match="contains a NUL character"):
        await backend.enqueue_many([*batch, make_task("nul\x00")])
    assert await backend.get("b000") is None

    # A finished record's id is taken over, as by a batch of one.
    stored = await backend.enqueue_many([*batch, make_task("done", at=now + 3)])
    assert stored == [*(task.id for task in batch), "done"]
    record = await backend.get("done")
    assert record is not None
    assert (record.state, record.enqueued_at) == (TaskState.PENDING, now + 3)
    # skip: the new ids are stored, the taken ones left as they are.
    more = [make_task(f"m{n:03d}", at=now) for n in range(size)]
    assert await backend.enqueue_many([*more, make_task("live")], if_exists="skip") == [t.id for t in more]
    live = await backend.get("live")
    assert live is not None
    assert live.run_at > now + 30


# -- text PostgreSQL cannot store -------------------------------------------------------------------------


async def test_a_nul_character_in_a_task_id_is_refused_before_anything_is_stored(
    open_pg: OpenPostgres,
) -> None:
    backend = await open_pg()
    with pytest.raises(ValueError, match="contains a NUL character"):
        await backend.enqueue_many([make_task("fine"), make_task("bad\x00id")])
    assert await backend.stats() == {}


async def test_a_nul_character_in_an_error_message_does_not_fail_the_settlement(
    open_pg: OpenPostgres,
) -> None:
    from lifecycle.asynctask import Settlement

    backend = await open_pg()
    await backend.enqueue_many([make_task("job")])
    now = time.time()
    (claimed,) = await backend.claim(["default"], 1, now=now, lease_until=now + 30)
    verdict = Settlement(
        task_id="job", token=claimed.token, state=TaskState.DEAD, at=now, error="ValueError: b'\x00'"
    )
    assert await backend.settle([verdict]) == set()
    record = await backend.get("job")
    assert record is not None
    assert (record.state, record.last_error) == (TaskState.DEAD, "ValueError: b'\\x00'")


async def test_text_that_array_literals_quote_survives_enqueue_claim_and_settle(
    open_pg: OpenPostgres,
) -> None:
    # The pooled connections send their column arrays in binary; the caller's connection of the outbox in
    # text: both must store every character as given.
    from lifecycle.asynctask import Settlement

    odd = ["NULL", "null", '{a,"b"}', "back\\slash", " spaced ", "comma,", "", "é ☃"]
    backend = await open_pg()
    await backend.enqueue_many([make_task(task_id) for task_id in odd])
    now = time.time()
    claimed = await backend.claim(["default"], len(odd), now=now, lease_until=now + 30)
    assert sorted(c.record.id for c in claimed) == sorted(odd)
    verdicts = [
        Settlement(task_id=c.record.id, token=c.token, state=TaskState.DEAD, at=now, error=f"{c.record.id}}}")
        for c in claimed
    ]
    assert await backend.settle(verdicts) == set()
    for task_id in odd:
        record = await backend.get(task_id)
        assert record is not None
        assert (record.id, record.state, record.last_error) == (task_id, TaskState.DEAD, f"{task_id}}}")


async def test_a_user_without_the_right_to_create_the_schema_gets_a_clear_error(
    postgres_dsn: str, pg_schema: str, unique_name: str
) -> None:
    role = f"{unique_name}_reader"
    await _execute(postgres_dsn, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        restricted = psycopg.conninfo.make_conninfo(postgres_dsn, user=role)
        with pytest.raises(
            BackendError, match=r"cannot create or migrate the task tables .* grant this user"
        ):
            await PostgresBackend(restricted, schema=pg_schema).open()
    finally:
        await _execute(postgres_dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_queue_name_too_long_for_a_notify_payload_still_wakes_its_worker(
    open_pg: OpenPostgres,
) -> None:
    waiter = await open_pg(poll_interval=3600)
    producer = await open_pg()
    queue = "q" * 9000  # NOTIFY payloads stop at 8000 bytes: its waiters get a wake-everyone instead
    returned = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await _start_waiter(group, waiter, queue, returned)
            await producer.enqueue_many([make_task("long-queue", queue=queue)])
            await returned.wait()
    now = time.time()
    assert [c.record.id for c in await waiter.claim([queue], 5, now=now, lease_until=now + 30)] == [
        "long-queue"
    ]


async def test_cancelling_wait_for_work_mid_flight_keeps_connections_healthy(
    open_pg: OpenPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine cancels wait_for_work whenever something else woke it first. psycopg answers a query
    # interrupted by cancellation by closing its connection (and logging a warning), and psycopg_pool is not
    # written for anyio's cancel scopes: the backend must keep both out of the way of a cancellation.
    backend = await open_pg(pool_size=2, connect_timeout=5)
    await backend.enqueue_many([make_task("due")])
    caplog.set_level(logging.WARNING, logger="psycopg")
    with anyio.fail_after(30):
        for step in range(60):
            # Cancel at a different point of the call each time: waiting for a connection, mid-query, ...
            with anyio.move_on_after(step * 0.0002):
                await backend.wait_for_work(["default", "other"], timeout=120)
                await backend.wait_for_work(["default", "other"], timeout=120)
        for _ in range(10):
            assert (await backend.get("due")) is not None
    broken = [record.getMessage() for record in caplog.records if record.name.startswith("psycopg")]
    assert broken == [], "a cancelled wait_for_work must not break pooled connections"
