"""SQLiteBackend: the public conformance suite, plus what only a SQLite file has (WAL, schema, files)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import sniffio
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.asynctask import (
    Backend,
    BackendError,
    DuplicateTaskError,
    MemoryBackend,
    NewGroup,
    NewTask,
    ProgressUpdate,
    Settlement,
    TaskState,
)
from lifecycle.asynctask._backends.sqlite import _backend as sqlite_backend_module
from lifecycle.asynctask._backends.sqlite import _ops as ops
from lifecycle.asynctask._backends.sqlite._backend import SQLiteBackend, _Budget
from lifecycle.asynctask._backends.sqlite._schema import (
    _CONTROL_V3,
    _CREATE_V1,
    _FLOW_V2,
    _SETTLED_V4,
    LISTED_BY_SEQ,
    NOT_LISTED_BY_SEQ,
    SCHEMA_VERSION,
    SETTLED,
    check_sqlite_version,
    ensure_schema,
)
from lifecycle.asynctask.testing import BackendConformance, EngineConformance
from lifecycle.asynctask.testing.backend._rules_damage import RawValue
from tests.asynctask.corruption import corrupt_sqlite

# Marked here, at collection time: the conftest marks async tests only after collection, which loses
# @pytest.mark.parametrize combinations on async tests.
pytestmark = pytest.mark.anyio

Factory = Callable[..., Awaitable[SQLiteBackend]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh database path in a directory that exists."""
    return tmp_path / "tasks.db"


@pytest.fixture
async def open_sqlite(db_path: Path) -> AsyncIterator[Factory]:
    """Open SQLiteBackend objects over ``db_path`` (keyword options pass through); all closed afterwards."""
    opened: list[SQLiteBackend] = []

    async def factory(**options: object) -> SQLiteBackend:
        backend = SQLiteBackend(db_path, **options)  # type: ignore[arg-type]
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        await backend.close()


@pytest.fixture
def sqlite_factory(open_sqlite: Factory) -> Callable[[], Awaitable[SQLiteBackend]]:
    """The conformance suites' ``backend_factory``: a new SQLiteBackend over the test's file per call."""

    async def factory() -> SQLiteBackend:
        # a short poll so the suites' cross-object wait_for_work tests stay fast
        return await open_sqlite(poll_interval=0.02)

    return factory


class TestSQLiteConformance(BackendConformance):
    """The public Backend conformance suite, unchanged, on one SQLite file per test."""

    @pytest.fixture
    def backend_factory(
        self, sqlite_factory: Callable[[], Awaitable[SQLiteBackend]]
    ) -> Callable[[], Awaitable[SQLiteBackend]]:
        return sqlite_factory

    async def corrupt_field(self, backend: Backend, task_id: str, field: str, raw_value: RawValue) -> bool:
        assert isinstance(backend, SQLiteBackend)
        return await corrupt_sqlite(backend.path, task_id, field, raw_value)


class TestSQLiteEngine(EngineConformance):
    """AsyncTasks end to end on SQLite: the engine conformance suite, unchanged."""

    @pytest.fixture
    def backend_factory(
        self, sqlite_factory: Callable[[], Awaitable[SQLiteBackend]]
    ) -> Callable[[], Awaitable[SQLiteBackend]]:
        return sqlite_factory


def task(
    task_id: str, *, queue: str = "default", run_at: float | None = None, now: float = 1000.0
) -> NewTask:
    """A no-op task record due at ``run_at`` (default: ``now``)."""
    return NewTask(
        id=task_id,
        name="tests.job",
        queue=queue,
        payload=b'["x"]',
        max_retries=3,
        timeout=None,
        enqueued_at=now,
        run_at=now if run_at is None else run_at,
    )


# -- the file ----------------------------------------------------------------------------------------------


async def test_open_switches_the_file_to_wal_and_records_the_schema_version(
    open_sqlite: Factory, db_path: Path
) -> None:
    await open_sqlite()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"lifecycle_tasks_pending", "lifecycle_tasks_active"} <= indexes


@pytest.mark.parametrize(("mode", "level"), [("NORMAL", 1), ("FULL", 2), ("off", 0)])
async def test_synchronous_setting_is_applied_to_the_connection(
    open_sqlite: Factory, mode: str, level: int
) -> None:
    backend = await open_sqlite(synchronous=mode)
    assert backend._connection is not None
    assert backend._connection.execute("PRAGMA synchronous").fetchone() == (level,)


async def test_a_file_of_schema_version_1_is_migrated_for_flow_control(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO lifecycle_schema VALUES (1)")
        for statement in _CREATE_V1:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, "
            "enqueued_at, run_at) VALUES ('old', 'tests.job', 'default', x'00', 'pending', 0, 3, 1000.0, "
            "1000.0)"
        )
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        record = await backend.get("old")
        assert record is not None
        assert (record.priority, record.concurrency_key, record.expires_at, record.fault) == (
            0,
            None,
            None,
            None,
        )
        await backend.enqueue_many([dataclasses.replace(task("urgent"), priority=5)])
        claimed = await backend.claim(["default"], 10, now=2000.0, lease_until=2030.0)
        assert [c.record.id for c in claimed] == ["urgent", "old"], (
            "the rebuilt pending index orders priorities"
        )
        await backend.pause("default")
        assert await backend.paused() == {"default"}
    finally:
        await backend.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION,)]
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {
        "lifecycle_rate_buckets",
        "lifecycle_unique",
        "lifecycle_paused",
        "lifecycle_follow_ups",
    } <= tables


async def test_a_file_of_schema_version_2_is_migrated_for_control_of_running_work(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO lifecycle_schema VALUES (2)")
        for statement in (*_CREATE_V1, *_FLOW_V2):
            raw.execute(statement)
        raw.execute(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, "
            "enqueued_at, run_at, started_at, lease_until, token) VALUES ('running', 'tests.job', 'default', "
            "x'00', 'active', 1, 3, 1000.0, 1000.0, 1000.0, 1030.0, 'tok')"
        )
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        record = await backend.get("running")
        assert record is not None
        assert (record.cancel_requested, record.progress_done, record.group_id, record.fault) == (
            False,
            None,
            None,
            None,
        )
        assert await backend.cancel(["running"], now=1001.0) == ["running"]
        assert await backend.cancel_requests(["running"]) == {"running"}
        assert await backend.save_progress([ProgressUpdate("running", "tok", 1.0, 2.0, "half")]) == set()
        group = NewGroup(
            id="g", members=(dataclasses.replace(task("m"), group_id="g"),), then=None, created_at=1000.0
        )
        assert await backend.enqueue_group(group) == "g"
        stored = await backend.get_group("g")
        assert stored is not None
        assert stored.task_ids == ("m",)
    finally:
        await backend.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION,)]
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"lifecycle_groups", "lifecycle_group_members"} <= tables


async def test_a_file_of_schema_version_3_gets_the_partial_finished_index(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO lifecycle_schema VALUES (3)")
        for statement in (*_CREATE_V1, *_FLOW_V2, *_CONTROL_V3):
            raw.execute(statement)
        raw.executemany(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, "
            "enqueued_at, run_at, finished_at) VALUES (?, 'tests.job', 'default', x'00', ?, 0, 3, 1000.0, "
            "1000.0, ?)",
            [("waiting", "pending", None), ("done", "succeeded", 1001.0)],
        )
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        assert await backend.purge(states=[TaskState.SUCCEEDED], before=2000.0) == 1
        assert [r.id for r in await backend.list_records(states=[TaskState.PENDING])] == ["waiting"]
    finally:
        await backend.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION,)]
        (definition,) = raw.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'lifecycle_tasks_finished'"
        ).fetchone()
    assert definition.endswith(f"WHERE {SETTLED}")


async def test_a_file_of_schema_version_4_lists_newest_first_without_the_enqueued_at_index(
    db_path: Path,
) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO lifecycle_schema VALUES (4)")
        for statement in (*_CREATE_V1, *_FLOW_V2, *_CONTROL_V3, *_SETTLED_V4):
            raw.execute(statement)
        raw.executemany(  # stored out of clock order, as another process's clock could have them
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, "
            "enqueued_at, run_at) VALUES (?, 'tests.job', 'default', x'00', 'pending', 0, 3, ?, ?)",
            [("old-b", 1002.0, 1002.0), ("old-a", 1001.0, 1001.0), ("old-c", 1003.0, 1003.0)],
        )
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        await backend.enqueue_many([task("new-late", now=1000.5)])
        await backend.enqueue_many([task("new-d", now=1004.0)])
        await backend.enqueue_many([task("new-e", now=1005.0)])
        listed = [r.id for r in await backend.list_records()]
        assert listed == ["new-e", "new-d", "old-c", "old-b", "old-a", "new-late"]
        assert [r.id for r in await backend.list_records(limit=2, offset=2)] == ["old-c", "old-b"]
    finally:
        await backend.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION,)]
        indexes = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall())
        by_seq = raw.execute(f"SELECT id FROM lifecycle_tasks WHERE {LISTED_BY_SEQ} ORDER BY seq").fetchall()
        marks = dict(raw.execute("SELECT id, newest_enqueued FROM lifecycle_tasks WHERE id LIKE 'old-%'"))
    # Only the last old row was written by the migration: the new rows' look for a bound stops there.
    assert marks == {"old-b": None, "old-a": None, "old-c": -math.inf}
    assert "lifecycle_tasks_enqueued" not in indexes
    assert indexes["lifecycle_tasks_unordered"].endswith(f"WHERE {NOT_LISTED_BY_SEQ}")
    # The rows from version 4 are in the index. The new ones are not: each is at least as new as those
    # before it that are read by seq (the old rows are not, so "new-late" is in order among those).
    assert by_seq == [("new-late",), ("new-d",), ("new-e",)]


async def test_tasks_stored_in_clock_order_stay_out_of_the_listing_index(open_sqlite: Factory) -> None:
    # An enqueue in clock order writes no entry in an index for the newest-first listing (one WAL page
    # fewer): the listing reads such rows from the table by seq. Only the others are indexed.
    backend = await open_sqlite()
    assert backend._connection is not None

    def unordered() -> list[str]:
        assert backend._connection is not None
        rows = backend._connection.execute(
            "SELECT id FROM lifecycle_tasks INDEXED BY lifecycle_tasks_unordered "
            f"WHERE {NOT_LISTED_BY_SEQ} ORDER BY enqueued_at"
        )
        return [row[0] for row in rows]

    await backend.enqueue_many([task("a", now=1000.0)])
    await backend.enqueue_many([task("b", now=1001.0), task("c", now=1001.0)])
    await backend.enqueue_many([task("d", now=1002.0)])
    assert unordered() == []
    await backend.enqueue_many([task("late", now=1000.5)])  # e.g. a producer whose clock is behind
    await backend.enqueue_many([task("e", now=1001.5)])  # after "late", but before "d"
    assert unordered() == ["late", "e"]
    assert [r.id for r in await backend.list_records()] == ["d", "e", "c", "b", "late", "a"]
    assert [r.id for r in await backend.list_records(limit=3, offset=1)] == ["e", "c", "b"]


async def test_a_page_past_64_bit_integers_is_the_end_of_the_listing(open_sqlite: Factory) -> None:
    # SQLite binds 64-bit integers: the page's window (limit + offset) of a huge limit or offset (a
    # dashboard's ?offset=...) is clamped rather than raising OverflowError.
    backend = await open_sqlite()
    await backend.enqueue_many([task("a", now=1000.0), task("b", now=1001.0)])
    huge = sys.maxsize
    assert [r.id for r in await backend.list_records(limit=huge, offset=1)] == ["a"]
    assert await backend.list_records(limit=100, offset=huge - 50) == []
    assert await backend.list_records(limit=2**70, offset=2**70) == []
    assert [r.id for r in await backend.list_records(states={TaskState.PENDING}, limit=2**70)] == ["b", "a"]


async def test_a_groups_then_stored_after_later_tasks_is_listed_by_its_enqueued_at(
    open_sqlite: Factory,
) -> None:
    backend = await open_sqlite()
    member = dataclasses.replace(task("member", now=1000.0), group_id="g")
    then = task("then", now=1000.0)
    await backend.enqueue_group(NewGroup(id="g", members=(member,), then=then, created_at=1000.0))
    await backend.enqueue_many([task("later", now=1001.0)])
    (claimed,) = await backend.claim(["default"], 1, now=1002.0, lease_until=1030.0)
    assert claimed.record.id == "member"
    settlement = Settlement("member", claimed.token, TaskState.SUCCEEDED, at=1002.0, result=b"1")
    await backend.settle([settlement])
    assert [r.id for r in await backend.list_records()] == ["later", "then", "member"]
    await backend.enqueue_many([task("next", now=1003.0)])
    assert [r.id for r in await backend.list_records()] == ["next", "later", "then", "member"]


# One change to the table: ("insert", times), ("then", time), ("hand", time) (a row written by hand, without
# newest_enqueued), ("retime", pick, time) (a follow-up's new enqueued_at), ("delete", pick), ("kill", pick).
_GROUP_WITH_THEN = (
    "INSERT INTO lifecycle_groups (id, created_at, unfinished, then_id, then_name, then_queue, then_payload, "
    "then_max_retries, then_enqueued_at, then_run_at, then_priority) "
    "VALUES (?, ?, 0, ?, 'tests.job', 'q1', x'00', 3, ?, ?, 0)"
)
_TIMES = st.sampled_from([1000.0, 1001.0, 1001.5, 1002.0, 1003.0])
_PICK = st.integers(min_value=0, max_value=10_000)
_CHANGES = st.one_of(
    st.tuples(st.just("insert"), st.lists(_TIMES, min_size=1, max_size=3)),
    st.tuples(st.just("then"), _TIMES),
    st.tuples(st.just("hand"), _TIMES),
    st.tuples(st.just("retime"), _PICK, _TIMES),
    st.tuples(st.just("delete"), _PICK),
    st.tuples(st.just("kill"), _PICK),
)


@settings(max_examples=150, deadline=None)
@given(old=st.lists(_TIMES, max_size=4), changes=st.lists(_CHANGES, max_size=25))
def test_the_listing_is_in_enqueued_at_order_after_any_changes(
    old: list[float], changes: list[tuple[Any, ...]]
) -> None:
    """Whatever order rows come in (rows from version 4, late ones, groups' thens, rows by hand, new times,
    deletions), the listing read by seq and from the unordered index is the one a sort of the table gives."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as connection:
        connection.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO lifecycle_schema VALUES (4)")
        for statement in (*_CREATE_V1, *_FLOW_V2, *_CONTROL_V3, *_SETTLED_V4):
            connection.execute(statement)
        connection.executemany(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, max_retries, enqueued_at, run_at) "
            "VALUES (?, 'tests.job', 'q0', x'00', 'pending', 3, ?, ?)",
            [(f"old{n}", at, at) for n, at in enumerate(old)],
        )
        assert ensure_schema(connection, where="listing") == SCHEMA_VERSION  # migrates the rows of version 4
        made = itertools.count()

        def ids() -> list[str]:
            return [row[0] for row in connection.execute("SELECT id FROM lifecycle_tasks ORDER BY seq")]

        for change in changes:
            kind, present = change[0], ids()
            if kind == "insert":
                batch = [task(f"t{next(made)}", queue=f"q{n % 2}", now=at) for n, at in enumerate(change[1])]
                ops.enqueue_many(connection, batch, "error")
            elif kind == "then":
                group_id = f"g{next(made)}"
                at = change[1]  # a group with no members left: its then is stored now
                connection.execute(_GROUP_WITH_THEN, (group_id, at, f"{group_id}-then", at, at))
                connection.execute(ops._STORE_THEN, (group_id,))
            elif kind == "hand":
                connection.execute(
                    "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, max_retries, enqueued_at, "
                    "run_at) VALUES (?, 'tests.job', 'q0', x'00', 'pending', 3, ?, ?)",
                    (f"h{next(made)}", change[1], change[1]),
                )
            elif present and kind == "retime":
                chosen = present[change[1] % len(present)]
                connection.execute(
                    "UPDATE lifecycle_tasks SET enqueued_at = ? WHERE id = ?", (change[2], chosen)
                )
            elif present and kind == "delete":
                connection.execute(
                    "DELETE FROM lifecycle_tasks WHERE id = ?", (present[change[1] % len(present)],)
                )
            elif present and kind == "kill":
                chosen = present[change[1] % len(present)]
                connection.execute("UPDATE lifecycle_tasks SET state = 'dead' WHERE id = ?", (chosen,))
        total = len(ids())
        for states in (None, {TaskState.DEAD}, {TaskState.DEAD, TaskState.PENDING}):
            for queue in (None, "q0"):
                clauses, params = ops._filters(states, queue, unknown_as_dead=True)
                where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
                for limit, offset in ((100, 0), (2, 0), (3, 2), (5, max(total - 3, 0))):
                    expected = connection.execute(
                        f"SELECT id FROM lifecycle_tasks NOT INDEXED{where} "
                        "ORDER BY enqueued_at DESC, seq DESC LIMIT ? OFFSET ?",
                        [*params, limit, offset],
                    ).fetchall()
                    listed = ops.list_records(connection, states, queue, limit, offset)
                    assert [r.id for r in listed] == [row[0] for row in expected], (
                        states,
                        queue,
                        limit,
                        offset,
                    )


async def test_pending_and_active_tasks_stay_out_of_the_finished_index(open_sqlite: Factory) -> None:
    # An enqueue writes one index page fewer, and a claim leaves that index alone.
    backend = await open_sqlite()
    await backend.enqueue_many([task("waiting"), task("running"), task("left")])
    claimed = await backend.claim(["default"], 2, now=1000.0, lease_until=1030.0)
    assert [c.record.id for c in claimed] == ["waiting", "running"]  # enqueue order
    done = claimed[0]
    await backend.settle([Settlement(done.record.id, done.token, TaskState.SUCCEEDED, at=1001.0)])
    assert backend._connection is not None
    backend._connection.execute("ANALYZE lifecycle_tasks_finished")  # its first number: the index's entries
    ((stat,),) = backend._connection.execute(
        "SELECT stat FROM sqlite_stat1 WHERE idx = 'lifecycle_tasks_finished'"
    ).fetchall()
    assert stat.split()[0] == "1"  # "waiting" (succeeded): not "running" (active) nor "left" (pending)


class _Recording:
    """A connection that records the statements (with their parameters) run through it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.statements: list[tuple[str, object]] = []

    def execute(self, sql: str, parameters: object = ()) -> sqlite3.Cursor:
        self.statements.append((sql, parameters))
        return self.connection.execute(sql, parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("label", "call"),
    [
        ("purge finished", lambda c: ops.purge(c, {TaskState.SUCCEEDED, TaskState.DEAD}, None, 2000.0, None)),
        ("purge finished by queue", lambda c: ops.purge(c, {TaskState.CANCELLED}, "q", 2000.0, 10)),
        ("purge pending", lambda c: ops.purge(c, {TaskState.PENDING}, None, None, None)),
        (
            "purge pending and finished",
            lambda c: ops.purge(c, {TaskState.PENDING, TaskState.DEAD}, "q", None, 5),
        ),
        ("list pending", lambda c: ops.list_records(c, {TaskState.PENDING}, None, 10, 0)),
        (
            "list active and succeeded",
            lambda c: ops.list_records(c, {TaskState.ACTIVE, TaskState.SUCCEEDED}, "q", 10, 0),
        ),
        ("requeue dead", lambda c: ops.requeue(c, None, "q", 2000.0)),
        ("damaged records", lambda c: ops.reclaim_expired(c, 2000.0, 2030.0, 10)),
    ],
)
def test_reads_by_state_search_an_index_not_the_table(
    tmp_path: Path, label: str, call: Callable[[_Recording], object]
) -> None:
    """The finished index leaves pending and active tasks out, so it serves a query only when the query names
    its condition: each query by state reads one of the state indexes, never the whole table."""
    with closing(sqlite3.connect(tmp_path / "plans.db", isolation_level=None)) as connection:
        ensure_schema(connection, where="plans")
        recording = _Recording(connection)
        connection.execute("BEGIN")
        call(recording)
        connection.execute("ROLLBACK")
        assert recording.statements, label
        for sql, parameters in recording.statements:
            if not sql.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE", "WITH")):
                continue
            plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters)]  # type: ignore[arg-type]
            assert "SCAN lifecycle_tasks" not in plan, (label, sql, plan)


async def test_a_file_written_by_a_newer_schema_version_is_refused(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    await backend.enqueue_many([task("kept")])
    await backend.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("UPDATE lifecycle_schema SET version = ?", (SCHEMA_VERSION + 1,))

    newer = SQLiteBackend(db_path)
    with pytest.raises(
        BackendError, match=rf"newer anyio-lifecycle \(schema version {SCHEMA_VERSION + 1}.*upgrade"
    ):
        await newer.open()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:  # refused without touching anything
        assert raw.execute("SELECT version FROM lifecycle_schema").fetchall() == [(SCHEMA_VERSION + 1,)]
        assert raw.execute("SELECT id FROM lifecycle_tasks").fetchall() == [("kept",)]
    await newer.close()  # closing a backend that never opened is harmless


async def test_a_damaged_schema_table_is_refused(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("CREATE TABLE lifecycle_schema (version INTEGER NOT NULL)")
        raw.executemany("INSERT INTO lifecycle_schema VALUES (?)", [(1,), (1,)])
    with pytest.raises(BackendError, match="damaged"):
        await SQLiteBackend(db_path).open()


async def test_a_missing_directory_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(BackendError, match=r"directory '.*no/such/dir' does not exist; create the directory"):
        await SQLiteBackend(missing / "tasks.db").open()
    assert not (tmp_path / "no").exists()


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the tables you are looking for\n" * 100)
    with pytest.raises(BackendError, match=r"cannot use .*notes\.txt.* as a SQLite task database"):
        await SQLiteBackend(path).open()
    assert path.read_text().startswith("these are not the tables")


def test_an_old_sqlite_library_is_refused_with_the_versions_named() -> None:
    with pytest.raises(BackendError, match=r"SQLite >= 3\.35\.0 .* linked against SQLite 3\.31\.1"):
        check_sqlite_version((3, 31, 1))
    check_sqlite_version((3, 35, 0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"poll_interval": 0}, r"SQLiteBackend\(poll_interval=...\) must be a finite number of seconds"),
        ({"poll_interval": float("inf")}, r"poll_interval=...\) must be a finite number of seconds greater"),
        ({"busy_timeout": -1}, r"SQLiteBackend\(busy_timeout=...\) must be a finite number of seconds zero"),
        ({"synchronous": "SOMETIMES"}, "synchronous must be one of OFF, NORMAL, FULL, EXTRA"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SQLiteBackend("tasks.db", **options)  # type: ignore[arg-type]


def test_options_of_the_wrong_type_are_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"SQLiteBackend\(poll_interval=...\) must be a number of seconds"):
        SQLiteBackend("tasks.db", poll_interval="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SQLiteBackend\(busy_timeout=...\) must be a number of seconds"):
        SQLiteBackend("tasks.db", busy_timeout=None)  # type: ignore[arg-type]


async def test_calls_before_open_and_after_close_say_to_open_first(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    with pytest.raises(BackendError, match=r"is not open: call `await backend.open\(\)` first"):
        await backend.get("x")
    await backend.open()
    await backend.open()  # a second open is a no-op
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(BackendError, match="is not open"):
        await backend.enqueue_many([task("x")])
    await backend.wait_for_work(["default"], timeout=10)  # a closed backend has no work: returns at once


async def test_in_memory_database_works_within_one_object() -> None:
    backend = SQLiteBackend(":memory:")
    await backend.open()
    try:
        await backend.enqueue_many([task("m")])
        claimed = await backend.claim(["default"], 5, now=1000.0, lease_until=1030.0)
        assert [c.record.id for c in claimed] == ["m"]
    finally:
        await backend.close()


# -- several objects and processes on one file -------------------------------------------------------------


async def test_tasks_survive_closing_and_reopening_the_file(db_path: Path) -> None:
    first = SQLiteBackend(db_path)
    await first.open()
    await first.enqueue_many([task("durable", run_at=1234.5)])
    await first.close()
    second = SQLiteBackend(db_path)
    await second.open()
    try:
        record = await second.get("durable")
        assert record is not None
        assert (record.state, record.payload, record.run_at) == (TaskState.PENDING, b'["x"]', 1234.5)
    finally:
        await second.close()


async def test_two_objects_share_the_file_and_never_claim_the_same_task(open_sqlite: Factory) -> None:
    a, b = await open_sqlite(), await open_sqlite()
    await a.enqueue_many([task(f"t{i}") for i in range(300)])
    taken: dict[str, list[str]] = {"a": [], "b": []}

    async def claim_and_settle(name: str, backend: SQLiteBackend) -> bool:
        claimed = await backend.claim(["default"], 7, now=1000.0, lease_until=1030.0)
        taken[name].extend(c.record.id for c in claimed)
        settlements = [
            Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=1001.0)
            for c in claimed
        ]
        assert await backend.settle(settlements) == set()
        return bool(claimed)

    async def drain(name: str, backend: SQLiteBackend) -> None:
        while await claim_and_settle(name, backend):
            pass

    # One claim each first, so both objects provably take work from the shared file; then they race.
    assert await claim_and_settle("a", a)
    assert await claim_and_settle("b", b)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(drain, "a", a)
            group.start_soon(drain, "b", b)
    everything = taken["a"] + taken["b"]
    assert sorted(everything) == sorted(f"t{i}" for i in range(300))  # each exactly once
    assert await b.stats() == {"default": {TaskState.SUCCEEDED: 300}}


async def test_wait_for_work_sees_another_objects_enqueue_by_polling(open_sqlite: Factory) -> None:
    worker = await open_sqlite(poll_interval=0.02)
    producer = await open_sqlite()
    returned = anyio.Event()

    async def wait() -> None:
        await worker.wait_for_work(["default"], timeout=60)
        returned.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set()
            await producer.enqueue_many([task("from-elsewhere", now=time.time())])
            await returned.wait()


async def test_wait_for_work_wakes_at_once_on_a_write_through_the_same_object(open_sqlite: Factory) -> None:
    # poll_interval of an hour: only the in-process wake-up can end the wait within the bound.
    backend = await open_sqlite(poll_interval=3600)
    returned = anyio.Event()

    async def wait() -> None:
        await backend.wait_for_work(["default"], timeout=3600)
        returned.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await backend.enqueue_many([task("local", now=time.time())])
            await returned.wait()


async def test_wait_for_work_wakes_when_a_delayed_task_becomes_due(open_sqlite: Factory) -> None:
    backend = await open_sqlite(poll_interval=3600)
    await backend.enqueue_many([task("soon", now=time.time(), run_at=time.time() + 0.2)])
    await backend.wait_for_work(["default"], timeout=0)  # consume the wake-up of the enqueue itself
    with anyio.fail_after(10):
        started = anyio.current_time()
        await backend.wait_for_work(["default"], timeout=3600)
    assert anyio.current_time() - started >= 0.15, "returned before the task was due"


async def test_wait_for_work_reports_a_due_task_once_while_nothing_changes(open_sqlite: Factory) -> None:
    # An engine whose clock is behind the wall clock cannot claim the task yet; it must not be woken in a
    # busy loop: the second call waits for its timeout because nothing changed in the file.
    backend = await open_sqlite(poll_interval=0.01)
    await backend.enqueue_many([task("due", now=1.0)])
    with anyio.fail_after(5):
        await backend.wait_for_work(["default"], timeout=3600)  # due: returns at once
        started = anyio.current_time()
        await backend.wait_for_work(["default"], timeout=0.1)
    assert anyio.current_time() - started >= 0.09
    await backend.enqueue_many([task("another", now=1.0)])  # a change: reported again at once
    with anyio.fail_after(5):
        await backend.wait_for_work(["default"], timeout=3600)


async def test_wait_for_work_ignores_other_queues(open_sqlite: Factory) -> None:
    backend = await open_sqlite(poll_interval=0.01)
    other = await open_sqlite()
    await other.enqueue_many([task("elsewhere", queue="other", now=1.0)])
    started = anyio.current_time()
    with anyio.fail_after(5):
        await backend.wait_for_work(["default"], timeout=0.1)
    assert anyio.current_time() - started >= 0.09


async def test_a_group_is_read_as_one_snapshot_while_another_process_settles_its_last_member(
    open_sqlite: Factory, db_path: Path
) -> None:
    # Another process saves the last member's success (and so the group's outcome) just as this object's
    # read of the group begins to read the members: the outcome and the counts must come from one moment.
    reader = await open_sqlite()
    writer = await open_sqlite()
    members = tuple(dataclasses.replace(task(f"g.{n}"), group_id="g") for n in range(2))
    await writer.enqueue_group(NewGroup(id="g", members=members, then=None, created_at=1000.0))
    first, last = await writer.claim(["default"], 2, now=1000.0, lease_until=1030.0)
    done = Settlement(first.record.id, first.token, TaskState.SUCCEEDED, at=1001.0)
    assert await writer.settle([done]) == set()
    settled: list[str] = []

    def settle_the_last_member(statement: str) -> None:
        if settled or "lifecycle_group_members" not in statement:
            return
        settled.append(statement)
        verdict = Settlement(last.record.id, last.token, TaskState.SUCCEEDED, at=1002.0)
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            lost, _ = sqlite_backend_module._in_transaction(other, ops.settle, ([verdict],))
        assert lost == set()

    connection = reader._connection
    assert connection is not None
    connection.set_trace_callback(settle_the_last_member)  # called as each statement begins, before it reads
    try:
        group = await reader.get_group("g")
    finally:
        connection.set_trace_callback(None)
    assert settled, "the member settled while the group was read"
    assert group is not None
    seen = (group.outcome, group.counts)
    assert seen in [
        (None, {TaskState.SUCCEEDED: 1, TaskState.ACTIVE: 1}),  # read before the settlement
        (TaskState.SUCCEEDED, {TaskState.SUCCEEDED: 2}),  # read after it
    ], f"the outcome and the members' states were read at different moments: {seen}"


# -- SQL edge cases ----------------------------------------------------------------------------------------


async def test_batches_larger_than_one_statement_are_handled(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    ids = [f"big{i}" for i in range(1200)]
    assert await backend.enqueue_many([task(i) for i in ids]) == ids
    with pytest.raises(DuplicateTaskError) as raised:  # the slow path checks ids in chunks
        await backend.enqueue_many([task("fresh"), *(task(i) for i in ids[::-1])])
    assert raised.value.task_id == ids[-1]
    assert len(raised.value.task_ids) == 1200
    assert await backend.get("fresh") is None
    assert await backend.cancel(ids, now=1001.0) == ids
    assert await backend.requeue(ids, now=1002.0) == 1200
    assert await backend.purge(states=[TaskState.PENDING], limit=700) == 700
    assert await backend.stats() == {"default": {TaskState.PENDING: 500}}


async def test_the_same_id_twice_in_one_batch(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    with pytest.raises(DuplicateTaskError, match="'twice'"):
        await backend.enqueue_many([task("twice"), task("other"), task("twice")])
    assert await backend.stats() == {}
    assert await backend.enqueue_many([task("twice"), task("twice")], if_exists="skip") == ["twice"]


async def test_a_settlement_in_a_non_settling_state_is_refused_and_nothing_of_the_batch_applies(
    open_sqlite: Factory,
) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task("a"), task("b")])
    a, b = await backend.claim(["default"], 2, now=1000.0, lease_until=1030.0)
    good = Settlement(task_id=a.record.id, token=a.token, state=TaskState.SUCCEEDED, at=1001.0)
    bad = Settlement(task_id=b.record.id, token=b.token, state=TaskState.ACTIVE, at=1001.0)
    with pytest.raises(ValueError, match="must be pending, succeeded, dead or cancelled"):
        await backend.settle([good, bad])
    record = await backend.get(a.record.id)
    assert record is not None
    assert record.state is TaskState.ACTIVE


async def test_a_row_written_by_hand_with_text_payload_reads_back_as_bytes(
    open_sqlite: Factory, db_path: Path
) -> None:
    backend = await open_sqlite()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, max_retries, enqueued_at, run_at) "
            "VALUES ('hand', 'tests.job', 'default', 'not json {', 'pending', 3, 1.0, 1.0)"
        )
    claimed = await backend.claim(["default"], 1, now=1000.0, lease_until=1030.0)
    assert [c.record.payload for c in claimed] == [b"not json {"]


def _write_by_hand(db_path: Path, statement: str, *params: object) -> None:
    raw = sqlite3.connect(db_path)
    try:
        with raw:
            raw.execute(statement, params)
    finally:
        raw.close()


async def test_text_that_is_not_utf8_is_named_in_the_fault_and_reads_never_fail(
    open_sqlite: Factory, db_path: Path
) -> None:
    """sqlite3 refuses to decode such text (a whole query fails); the backend reads it anyway, per record."""
    backend = await open_sqlite()
    await backend.enqueue_many([task("a"), task("b"), task("c")])
    _write_by_hand(db_path, "UPDATE lifecycle_tasks SET name = CAST(? AS TEXT) WHERE id = 'b'", b"job\xff")
    record = await backend.get("b")
    assert record is not None
    assert record.fault == "field 'name' holds b'job\\xff', not UTF-8 text"
    assert record.name == "job\ufffd"
    assert {r.id: r.fault for r in await backend.list_records()}["b"] == record.fault
    claimed = await backend.claim(["default"], 10, now=1000.0, lease_until=1030.0)
    faults = [(c.record.id, c.record.fault is None) for c in claimed]
    assert faults == [("a", True), ("b", False), ("c", True)]
    assert await backend.stats() == {"default": {TaskState.ACTIVE: 3}}


async def test_a_state_no_version_wrote_counts_as_dead_until_recovery_ends_it(
    open_sqlite: Factory, db_path: Path
) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task("a"), task("b")])
    _write_by_hand(db_path, "UPDATE lifecycle_tasks SET state = 'paused' WHERE id = 'b'")
    assert await backend.stats() == {"default": {TaskState.PENDING: 1, TaskState.DEAD: 1}}
    assert [r.id for r in await backend.list_records(states=[TaskState.DEAD])] == ["b"]
    (taken,) = await backend.reclaim_expired(now=1000.0, lease_until=1030.0, limit=10)
    assert taken.record.fault is not None
    assert taken.record.fault.startswith("field 'state' holds 'paused', not one of pending, active")
    verdict = Settlement("b", taken.token, TaskState.DEAD, at=1001.0, error=taken.record.fault)
    assert await backend.settle([verdict]) == set()
    record = await backend.get("b")
    assert record is not None
    assert (record.state, record.fault) == (TaskState.DEAD, None)


async def test_wait_for_work_ignores_run_at_that_is_not_a_finite_number_and_recovery_takes_it_over(
    open_sqlite: Factory, db_path: Path
) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task("a", queue="odd"), task("b", queue="odd")])
    _write_by_hand(db_path, "UPDATE lifecycle_tasks SET run_at = 'soon' WHERE id = 'a'")
    _write_by_hand(db_path, "UPDATE lifecycle_tasks SET run_at = '1e999' WHERE id = 'b'")  # SQLite: +inf
    with anyio.fail_after(5):
        await backend.wait_for_work(["odd"], timeout=0.05)  # nothing due: it waits out the timeout
    assert await backend.claim(["odd"], 10, now=1e12, lease_until=1e12 + 30) == []
    taken = await backend.reclaim_expired(now=1000.0, lease_until=1030.0, limit=10)
    assert {c.record.id: c.record.fault for c in taken} == {
        "a": "field 'run_at' holds 'soon', not a time (a finite number of seconds)",
        "b": "field 'run_at' holds inf, not a time (a finite number of seconds)",
    }


async def test_a_lease_token_is_unique_per_claim(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task(f"t{i}") for i in range(50)])
    claimed = await backend.claim(["default"], 50, now=1000.0, lease_until=1001.0)
    reclaimed = await backend.reclaim_expired(now=2000.0, lease_until=2030.0, limit=50)
    tokens = [c.token for c in claimed] + [c.token for c in reclaimed]
    assert len(set(tokens)) == 100
    assert [c.record.id for c in reclaimed] == [c.record.id for c in claimed]  # oldest first


async def test_a_file_locked_by_another_writer_past_busy_timeout_is_a_clear_error(db_path: Path) -> None:
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(BackendError, match=r"database is locked .*busy_timeout=0\.05 s"):
            await SQLiteBackend(db_path, busy_timeout=0.05).open()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# -- enqueues on the event loop's thread ------------------------------------------------------------------

# Another process: takes the write lock, says so, holds it until a line arrives on stdin, then commits.
_HOLD_THE_WRITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
"""


@pytest.mark.parametrize("holder", ["connection", "process"])
async def test_an_enqueue_under_another_writers_lock_waits_off_the_event_loop_and_is_stored(
    db_path: Path, holder: str
) -> None:
    # busy_timeout of 5 s: an enqueue that waited for the lock on the event loop's thread would hold it that
    # long, past the bound below, before anything else could run.
    backend = SQLiteBackend(db_path, busy_timeout=5)
    await backend.open()
    started, stored = anyio.Event(), anyio.Event()
    ids: list[str] = []

    async def enqueue() -> None:
        started.set()
        ids.extend(await backend.enqueue_many([task("under-lock")]))
        stored.set()

    processes: list[anyio.abc.Process] = []

    async def hold() -> Callable[[], Awaitable[None]]:
        if holder == "connection":
            connection = sqlite3.connect(db_path, isolation_level=None)
            connection.execute("BEGIN IMMEDIATE")

            async def release_connection() -> None:
                connection.execute("COMMIT")
                connection.close()

            return release_connection
        process = await anyio.open_process([sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(db_path)])
        processes.append(process)
        assert process.stdout is not None
        assert process.stdin is not None
        assert (await process.stdout.receive()).startswith(b"locked")

        async def release_process() -> None:
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
            assert await process.wait() == 0

        return release_process

    try:
        with anyio.fail_after(20):
            release = await hold()
            async with anyio.create_task_group() as group:
                before = time.monotonic()
                group.start_soon(enqueue)
                # Returns once the enqueue task gave the loop back: its attempt on the loop's thread met the
                # lock and it went on to wait on the worker thread.
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                held_the_loop = time.monotonic() - before
                assert not stored.is_set()  # the lock is still held: nothing could be written yet
                await release()
                await stored.wait()
        assert held_the_loop < 1.0, f"the event loop was held for {held_the_loop:.3f} s"
        assert ids == ["under-lock"]
        record = await backend.get("under-lock")
        assert record is not None
        assert record.state is TaskState.PENDING
        claimed = await backend.claim(["default"], 10, now=2000.0, lease_until=2030.0)
        assert [c.record.id for c in claimed] == ["under-lock"]  # stored once, lost nowhere
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
            await process.aclose()
        await backend.close()


async def test_enqueues_with_a_worker_claiming_from_the_same_object_lose_and_duplicate_nothing(
    open_sqlite: Factory,
) -> None:
    # The worker thread's claims and settlements hold the write lock while enqueues try the loop's thread:
    # some of those meet the lock and go to the worker thread; every task must be stored once and run once.
    backend = await open_sqlite()
    count = 300
    taken: list[str] = []
    enqueued = anyio.Event()

    async def produce() -> None:
        for index in range(count):
            await backend.enqueue_many([task(f"t{index}")])
        enqueued.set()

    async def consume() -> None:
        while len(taken) < count:
            claimed = await backend.claim(["default"], 7, now=2000.0, lease_until=2030.0)
            taken.extend(c.record.id for c in claimed)
            await backend.settle(
                [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=2000.0) for c in claimed]
            )
            if not claimed:
                await backend.wait_for_work(["default"], timeout=1)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            group.start_soon(produce)
    assert enqueued.is_set()
    assert sorted(taken) == sorted(f"t{i}" for i in range(count))  # each exactly once
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: count}}


def _trace(connection: sqlite3.Connection | None) -> list[str]:
    """The statements ``connection`` runs from now on, as run."""
    assert connection is not None
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    return statements


async def test_a_single_enqueue_is_one_insert_on_the_loops_connection(open_sqlite: Factory) -> None:
    # No BEGIN and COMMIT around it: SQLite commits a lone statement by itself.
    backend = await open_sqlite()
    on_loop = _trace(backend._loop_connection)
    assert await backend.enqueue_many([task("one")]) == ["one"]
    assert [sql.split(None, 2)[:2] for sql in on_loop] == [["INSERT", "INTO"]]
    # A taken id writes nothing with that statement, and the rules decide in a transaction.
    with pytest.raises(DuplicateTaskError, match="'one'"):
        await backend.enqueue_many([task("one")])
    assert await backend.enqueue_many([task("one")], if_exists="skip") == []
    assert await backend.stats() == {"default": {TaskState.PENDING: 1}}


async def _enqueue_until_awaited_checkpoint(backend: SQLiteBackend, on_thread: list[str], prefix: str) -> int:
    """Enqueue one task at a time until the worker thread checkpointed the WAL (the checkpoint a write awaits
    once the background ones are done, see ``SQLiteBackend._checkpoint_wal``); how many were enqueued."""
    count = 0
    with anyio.fail_after(60):
        while not on_thread:
            await backend.enqueue_many([task(f"{prefix}{count}")])
            count += 1
    return count


async def test_the_loops_connection_takes_every_enqueue_and_the_worker_thread_only_checkpoints(
    open_sqlite: Factory, db_path: Path
) -> None:
    # A write on the worker thread's connection would make both connections read their pages again (each
    # drops its page cache when the other one wrote), so the thread gets no enqueue: once the loop's
    # connection wrote about 4 000 WAL frames (1 177 one-task enqueues), the WAL is checkpointed in the
    # background, then by the worker thread, and the WAL starts over.
    backend = await open_sqlite()
    on_loop, on_thread = _trace(backend._loop_connection), _trace(backend._connection)
    count = await _enqueue_until_awaited_checkpoint(backend, on_thread, "t")
    assert count > 1177
    assert sum(sql.startswith("INSERT") for sql in on_loop) == count
    assert on_thread == ["PRAGMA wal_checkpoint(PASSIVE)"]
    for index in range(300):
        await backend.enqueue_many([task(f"after{index}")])
    assert sum(sql.startswith("INSERT") for sql in on_loop) == count + 300
    assert on_thread == ["PRAGMA wal_checkpoint(PASSIVE)"]
    with closing(sqlite3.connect(db_path)) as reader:
        (_, frames, _) = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert 0 < frames < 2000, frames  # the 300 enqueues since the WAL started over: about 1 000 frames


async def test_batches_on_the_loops_connection_count_towards_its_checkpoints(open_sqlite: Factory) -> None:
    # A batch writes about a page per task (its id index leaf), so the 4 000 frames that start a checkpoint
    # are passed by the 166th batch of 20 or so (one-task writes would need 1 177; a batch that ran past its
    # time budget on the loop's thread is counted by the worker thread's own automatic checkpoint instead,
    # so a loaded machine may start it a little later).
    backend = await open_sqlite()
    first = None
    for batch in range(300):
        await backend.enqueue_many([task(f"b{batch}-{index}") for index in range(20)])
        if first is None and backend._checkpointing is not None:
            first = batch
    assert first is not None
    assert first >= 160, first
    assert (await backend.stats())["default"][TaskState.PENDING] == 6000


def _hold_checkpoints(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make each WAL checkpoint set the first event, then wait (10 s at most) for the second to run."""
    checkpointing, release = threading.Event(), threading.Event()
    real = ops.checkpoint_wal

    def held(connection: sqlite3.Connection) -> None:
        checkpointing.set()
        release.wait(10)
        real(connection)

    monkeypatch.setattr(ops, "checkpoint_wal", held)
    return checkpointing, release


async def test_enqueues_go_on_while_the_wal_is_checkpointed(
    open_sqlite: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint mostly waits for the disk (it syncs the WAL, then the file): the loop's connection goes on
    # writing while it runs on a thread of its own. Here it cannot finish until 500 more tasks are stored.
    checkpointing, release = _hold_checkpoints(monkeypatch)
    backend = await open_sqlite()
    count = 0
    try:
        with anyio.fail_after(5):
            while not checkpointing.is_set():
                await backend.enqueue_many([task(f"t{count}")])
                count += 1
            for index in range(500):
                await backend.enqueue_many([task(f"m{index}")])
    finally:
        release.set()
    assert count >= 1177
    assert await backend.stats() == {"default": {TaskState.PENDING: count + 500}}


async def test_close_waits_for_the_background_checkpoint(
    open_sqlite: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointing, release = _hold_checkpoints(monkeypatch)
    backend = await open_sqlite()
    count = 0
    with anyio.fail_after(5):
        while not checkpointing.is_set():
            await backend.enqueue_many([task(f"t{count}")])
            count += 1
    running = backend._checkpointing
    assert running is not None
    async with anyio.create_task_group() as group:
        group.start_soon(backend.close)
        await anyio.lowlevel.checkpoint()
        assert running.is_alive()
        release.set()
    assert not running.is_alive()
    assert backend._checkpointer is None


async def test_the_background_checkpoint_opens_the_same_file_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint connection is made at the first background checkpoint: from the absolute path, and
    # never creating a file, so a relative path does not name another file once the directory changed.
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    backend = SQLiteBackend("tasks.db")
    await backend.open()
    try:
        monkeypatch.chdir(elsewhere)
        on_thread = _trace(backend._connection)
        await _enqueue_until_awaited_checkpoint(backend, on_thread, "t")
        await backend.enqueue_many([task("last")])
        assert backend._checkpointer is not None
        (file,) = [row[2] for row in backend._checkpointer.execute("PRAGMA database_list")]
        assert Path(file) == here / "tasks.db"
        with closing(sqlite3.connect(here / "tasks.db")) as reader:
            (_, frames, _) = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert 0 < frames < 20, frames  # checkpointed there: the WAL started over
    finally:
        await backend.close()
    assert list(elsewhere.iterdir()) == []


async def test_an_enqueue_cancelled_before_it_runs_stores_nothing(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await backend.enqueue_many([task("never")])
    assert scope.cancelled_caught
    assert await backend.get("never") is None


_OPTIONAL_VALUES = {
    "timeout": 5.0,
    "meta": '{"m": 1}',
    "concurrency_key": "k",
    "expires_at": 9000.0,
    "group_id": "g",
}


def _optional_fields(combination: int) -> dict[str, Any]:
    """The optional fields of a new task set by the bits of ``combination`` (the others are ``None``)."""
    names = sorted(_OPTIONAL_VALUES)
    return {
        name: _OPTIONAL_VALUES[name] if combination >> bit & 1 else None for bit, name in enumerate(names)
    }


def test_a_single_inserts_parameters_need_no_adapter_look_up() -> None:
    # sqlite3 binds an int, float, str or bytearray as it is, and looks for an adapter for anything else
    # (None, bytes), raising and clearing an AttributeError each time: a fifth of the statement's cost.
    for combination in range(2 ** len(_OPTIONAL_VALUES)):
        new = dataclasses.replace(task("t"), **_optional_fields(combination))
        sql, parameters = ops._one_task_insert(new)
        assert sql.count("?") == len(parameters), combination
        assert {type(value) for value in parameters} <= {int, float, str, bytearray}, combination


async def test_a_single_enqueue_stores_every_optional_field_as_a_batch_does(
    open_sqlite: Factory, db_path: Path
) -> None:
    # The single insert writes NULL into its statement for each field that is None (a statement per
    # combination), the batch binds every field: both store the same record.
    backend = await open_sqlite()
    for combination in range(2 ** len(_OPTIONAL_VALUES)):
        fields = _optional_fields(combination)
        alone = dataclasses.replace(task(f"s{combination}"), **fields)
        batch = [dataclasses.replace(task(f"b{combination}-{i}"), **fields) for i in range(2)]
        assert await backend.enqueue_many([alone]) == [alone.id]
        assert await backend.enqueue_many(batch) == [new.id for new in batch]
        stored, batched = await backend.get(alone.id), await backend.get(batch[0].id)
        assert stored is not None
        assert batched is not None
        assert dataclasses.replace(stored, id=batched.id) == batched, combination
        for name, value in fields.items():
            assert getattr(stored, name) == value, (combination, name)
    with closing(sqlite3.connect(db_path)) as reader:
        kinds = reader.execute("SELECT DISTINCT typeof(payload) FROM lifecycle_tasks").fetchall()
    assert kinds == [("blob",)]


async def _turns_of_another_task(
    backend: SQLiteBackend, label: str, enqueues: int, step: Callable[[], None]
) -> int:
    """How often another task ran while ``enqueues`` single enqueues (ids ``label-<n>``) ran one after
    another, ``step()`` between them."""
    turns = 0
    stop = anyio.Event()

    async def other() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as group:
        group.start_soon(other)
        await anyio.lowlevel.checkpoint()  # let it start
        before = turns
        for index in range(enqueues):
            await backend.enqueue_many([task(f"{label}-{index}")])
            step()
        stop.set()
    return turns - before


async def test_single_enqueues_on_the_loops_thread_let_other_tasks_run_between_them(
    open_sqlite: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer enqueueing in a loop does not starve the other tasks of the event loop: on trio every
    # enqueue is a checkpoint; on asyncio an enqueue yields (a bare yield) once _YIELD_EVERY passed since the
    # last one that did, so a tight loop holds the event loop for about that long at most.
    backend = await open_sqlite()
    now = [1000.0]
    monkeypatch.setattr(sqlite_backend_module, "_yield_clock", lambda: now[0])

    def tick() -> None:
        now[0] += sqlite_backend_module._YIELD_EVERY

    def still() -> None:
        pass

    assert await _turns_of_another_task(backend, "ticking", 50, tick) >= 49
    if sniffio.current_async_library() == "trio":
        assert await _turns_of_another_task(backend, "still", 50, still) >= 49
    else:
        assert await _turns_of_another_task(backend, "still", 50, still) <= 1, "no yield within _YIELD_EVERY"


class _LateBudget(_Budget):
    """A loop budget that runs out exactly when SQLite asks after a write committed (the end of an
    autocommit statement, or of a ``COMMIT``), and never before."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        object.__setattr__(self, "connection", connection)
        super().__init__()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "deadline":  # a write starts (or its commit): count its changes from here
            object.__setattr__(self, "base", self.__dict__["connection"].total_changes)
        object.__setattr__(self, name, value)

    def __call__(self) -> bool:
        connection: sqlite3.Connection = self.__dict__["connection"]
        live = self.deadline != math.inf and not connection.in_transaction
        return live and connection.total_changes != self.__dict__["base"]


async def test_a_budget_running_out_as_a_write_commits_never_stores_it_twice(open_sqlite: Factory) -> None:
    # SQLite asks the progress handler once more after a statement's last step, when an autocommit statement
    # or a COMMIT has committed: an interrupt reported then must not make the write look refused, or the
    # worker thread would write it again (a fresh id refused as a duplicate, a settlement found lost).
    backend = await open_sqlite()
    connection = backend._loop_connection
    assert connection is not None
    late = _LateBudget(connection)
    backend._loop_budget = late
    connection.set_progress_handler(late, 1)
    for index in range(20):
        assert await backend.enqueue_many([task(f"t{index}")]) == [f"t{index}"]
    ids = [f"b{index}" for index in range(20)]
    assert await backend.enqueue_many([task(task_id) for task_id in ids]) == ids
    claimed = await backend.claim(["default"], 40, now=2000.0, lease_until=2030.0)
    assert len(claimed) == 40
    verdicts = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=2000.0) for c in claimed]
    assert await backend.settle(verdicts) == set()
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 40}}


async def test_enqueues_on_the_loops_thread_still_let_the_wal_be_checkpointed(
    open_sqlite: Factory, db_path: Path
) -> None:
    # The loop's connection never checkpoints (a checkpoint syncs the file). Past 4 000 WAL pages, the WAL is
    # checkpointed in the background while enqueues go on, then by the worker thread: the write after that
    # starts the WAL over, so it never holds every page written.
    backend = await open_sqlite()
    on_thread = _trace(backend._connection)
    await _enqueue_until_awaited_checkpoint(backend, on_thread, "w")
    await backend.enqueue_many([task("last")])
    with closing(sqlite3.connect(db_path)) as reader:
        (_, frames, _) = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert 0 < frames < 20, frames  # the last enqueue's pages only


def expiring(task_id: str) -> NewTask:
    """A task due at 1000 that expired at 1500."""
    return dataclasses.replace(task(task_id), expires_at=1500.0)


async def test_writes_interrupted_on_the_loops_thread_are_redone_whole_on_the_worker_thread(
    open_sqlite: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget already spent: every statement that runs long enough to be checked is interrupted, and what
    # the write did before is rolled back, so the worker thread's run is the only one that counts.
    monkeypatch.setattr("lifecycle.asynctask._backends.sqlite._backend._LOOP_BUDGET", -1.0)
    backend = await open_sqlite()
    ids = [f"b{index}" for index in range(100)]
    assert await backend.enqueue_many([task(task_id) for task_id in ids]) == ids
    assert await backend.enqueue_many([task(ids[0])], if_exists="skip") == []
    await backend.enqueue_many([expiring(f"x{index}") for index in range(100)])
    claimed = await backend.claim(["default"], 100, now=2000.0, lease_until=2030.0)
    assert sorted(c.record.id for c in claimed) == sorted(ids)
    assert (
        await backend.settle(
            [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=2000.0) for c in claimed]
        )
        == set()
    )
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 100, TaskState.CANCELLED: 100}}


async def test_settle_and_claim_settles_first_then_claims_in_one_transaction(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task("a"), task("b"), task("c")])
    first = await backend.claim(["default"], 2, now=1000.0, lease_until=1030.0)
    assert [c.record.id for c in first] == ["a", "b"]
    verdicts = [
        # a retry due now: the claim after it sees it pending again, behind c (enqueued before the retry)
        Settlement(first[0].record.id, first[0].token, TaskState.PENDING, at=1001.0, run_at=1001.0),
        Settlement(first[1].record.id, first[1].token, TaskState.SUCCEEDED, at=1001.0),
        Settlement("c", "not-a-lease-of-c", TaskState.SUCCEEDED, at=1001.0),
    ]
    lost, claimed = await backend.settle_and_claim(verdicts, ["default"], 10, now=1001.0, lease_until=1031.0)
    assert lost == {"c"}
    assert [c.record.id for c in claimed] == ["c", "a"]
    assert [c.record.attempts for c in claimed] == [1, 2]
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 2, TaskState.SUCCEEDED: 1}


async def test_settle_and_claim_that_fails_leaves_nothing_done(open_sqlite: Factory) -> None:
    backend = await open_sqlite()
    await backend.enqueue_many([task("a"), task("b")])
    (held,) = await backend.claim(["default"], 1, now=1000.0, lease_until=1030.0)
    saved = Settlement(held.record.id, held.token, TaskState.SUCCEEDED, at=1001.0)
    refused = Settlement(held.record.id, held.token, TaskState.ACTIVE, at=1001.0)  # no verdict
    with pytest.raises(ValueError, match="settlement's state must be"):
        await backend.settle_and_claim([saved, refused], ["default"], 10, now=1001.0, lease_until=1031.0)
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.lease_until) == (TaskState.ACTIVE, 1030.0)
    assert (await backend.stats())["default"] == {TaskState.ACTIVE: 1, TaskState.PENDING: 1}


def test_the_engine_settles_and_claims_in_one_call_only_through_the_backends_own_methods(
    tmp_path: Path,
) -> None:
    from lifecycle.asynctask._backend import combined_settle_and_claim

    class Renamed(SQLiteBackend):
        pass

    class OwnSettle(SQLiteBackend):
        async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
            return await super().settle(settlements)

    class Proxy:
        def __init__(self, inner: SQLiteBackend) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

    path = tmp_path / "unused.db"
    plain, renamed, own, patched = (cls(path) for cls in (SQLiteBackend, Renamed, OwnSettle, SQLiteBackend))
    patched.claim = plain.claim  # type: ignore[method-assign]
    assert combined_settle_and_claim(plain) == plain.settle_and_claim
    assert combined_settle_and_claim(renamed) == renamed.settle_and_claim
    for bypassed in (own, patched, Proxy(plain), MemoryBackend()):
        assert combined_settle_and_claim(bypassed) is None, bypassed
