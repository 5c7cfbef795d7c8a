"""The worker's hot statements keep an index plan whatever the planner statistics say.

The claims are server-side functions (see ``_functions``), whose inner plans EXPLAIN cannot show: their tests
count the buffers a claim touches instead, which tells a few index probes from a walk over the backlog.

A queue table changes faster than autovacuum analyses it: a backlog of tens of thousands of tasks written
since the last ANALYZE (or into a table analysed while empty) leaves the planner guessing. These tests fill a
fresh schema with such a backlog, with autovacuum off for the table so no ANALYZE can run, record the
statement the backend executes for a claim (and for lease recovery), and EXPLAIN exactly that statement: as a
one-off (custom) plan and as the generic plan a prepared statement may switch to. Every scan of the task
table must be an index scan with an index condition: no sequential scan, and no walk over a whole partial
index (which reads every pending or active entry; 4 ms instead of 0.3 ms for 100 000 delayed tasks).
Speed itself is measured by benchmarks, not here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import FlowLimits, NewGroup, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.postgres import _ops as ops
from lifecycle.asynctask._backends.postgres._schema import GROUPS_TABLE, MEMBERS_TABLE, TASKS_TABLE
from tests.conftest import POSTGRES_DSN, require_service

from ._support import OpenPostgres, make_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """A database of this module's own, dropped after it. Buffer counts depend on what an index scan can
    skip, and an open transaction anywhere in the same database (another test run sharing the server) keeps
    every row version visible to it, so the counts are measured where no other session works."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"lifecycle_plans_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_BACKLOG = 20_000  # enough for the planner to prefer the whole partial index with the table unanalysed
_INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


class _RecordingCursor(psycopg.AsyncCursor[Any]):
    """Runs nothing: records each statement and its parameters as the backend's code sends them; each
    ``fetchall`` answers the next of ``answers`` (no rows once they are used up)."""

    executed: list[tuple[Any, Any]] = []
    answers: list[list[Any]] = []

    async def execute(self, query: Any, params: Any = None, **_: Any) -> _RecordingCursor:
        type(self).executed.append((query, params))
        return self

    async def fetchall(self) -> list[Any]:
        return type(self).answers.pop(0) if type(self).answers else []

    async def fetchone(self) -> Any:
        return None


async def _recorded(
    dsn: str, run: Any, statements: int = 1, answers: list[list[Any]] | None = None
) -> list[tuple[Any, Any]]:
    """The ``statements`` statements (and their parameters) ``run(connection)`` executes through ``ops``."""
    _RecordingCursor.executed = []
    _RecordingCursor.answers = list(answers or [])
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, cursor_factory=_RecordingCursor
    ) as connection:
        await run(connection)
    assert len(_RecordingCursor.executed) == statements
    return _RecordingCursor.executed


async def _plans(dsn: str, query: Any, params: Any) -> dict[str, dict[str, Any]]:
    """The custom (one-off) and the generic plan of ``query`` with ``params``, as EXPLAIN's JSON."""
    plans: dict[str, dict[str, Any]] = {}
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = connection.cursor()
        if not isinstance(query, bytes):  # a composed statement (sql.SQL(...).format(...))
            query = query.as_bytes(connection)
        await cursor.execute(b"EXPLAIN (FORMAT JSON) " + query, params)
        plans["custom"] = (await cursor.fetchone())[0][0]["Plan"]  # type: ignore[index]
        # Prepare it the way psycopg does after a few executions, then ask for the generic plan.
        await cursor.execute(query, params, prepare=True)
        await cursor.execute("SELECT name FROM pg_prepared_statements WHERE from_sql = false")
        (name,) = (await cursor.fetchone()) or ("",)
        await cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        if isinstance(params, dict):  # named: psycopg numbers them in the order they first appear
            names = dict.fromkeys(re.findall(rb"%\((\w+)\)[sb]", query))
            params = [params[name.decode()] for name in names]
        literals = sql.SQL(", ").join(sql.Literal(value) for value in params)
        explain = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(sql.Identifier(name), literals)
        await cursor.execute(explain)
        plans["generic"] = (await cursor.fetchone())[0][0]["Plan"]  # type: ignore[index]
        await connection.rollback()
    return plans


def _scans(plan: dict[str, Any], parent: str = "") -> Iterator[tuple[dict[str, Any], str]]:
    """Every node of ``plan`` with its parent's node type."""
    yield plan, parent
    for child in plan.get("Plans", []):
        yield from _scans(child, plan["Node Type"])


def _assert_index_probes_only(plan: dict[str, Any], table: str) -> None:
    """No sequential scan of ``table`` and no unbounded walk over one of its indexes: an index scan has an
    index condition, or sits right under a ``Limit`` (the first entries of an ordered index, as a loose
    index scan over the queue names starts)."""
    for node, parent in _scans(plan):
        kind = node["Node Type"]
        if kind == "Seq Scan":
            assert node.get("Relation Name") != table, f"sequential scan of {table}"
        if kind in _INDEX_SCANS and node.get("Index Name", "").startswith(table) and parent != "Limit":
            assert "Index Cond" in node, f"{kind} over all of {node['Index Name']} (no index condition)"


async def _backlog_table(dsn: str, schema: str) -> None:
    """Keep autovacuum (and so its ANALYZE) away from the test's table: its statistics stay as created."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        table = sql.Identifier(schema, TASKS_TABLE)
        await connection.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))


async def _buffers(
    dsn: str, schema: str, query: Any, params: Any, *, indexes_only: bool = False
) -> tuple[int, list[Any]]:
    """The buffers of the schema's tables and indexes ``query`` touches (hit or read, the work of the
    functions it calls included) and its rows, run in a transaction that is rolled back (after one run to
    warm the session's plans).

    Counted by the server's per-relation statistics, not by EXPLAIN: EXPLAIN also counts the system catalogs
    a session reads when it plans again, and another test run's DDL on the same server (thousands of
    catalog changes a second) overflows the invalidation queue, which makes every session drop its cached
    plans and read the catalogs again: thousands of buffers that say nothing about the claim. JIT is off, as
    on the backend's own connections (the functions' plans cost enough to be compiled: over a second each)."""
    async with await psycopg.AsyncConnection.connect(dsn, options="-c jit=off") as connection:
        cursor = connection.cursor()
        await cursor.execute(query, params)
        await connection.rollback()
        before = await _relation_buffers(connection, schema, indexes_only=indexes_only)
        await cursor.execute(query, params)
        rows = await cursor.fetchall()
        await connection.rollback()
        touched = await _relation_buffers(connection, schema, indexes_only=indexes_only) - before
    return touched, rows


async def _relation_buffers(
    connection: psycopg.AsyncConnection[Any], schema: str, *, indexes_only: bool = False
) -> int:
    """The buffers this server counted for the tables (and their indexes and TOAST) of ``schema`` so far,
    this session's last transaction included (its pending statistics are flushed first); with
    ``indexes_only``, those of the tables' indexes alone."""
    await connection.execute("SELECT pg_stat_force_next_flush()")
    await connection.commit()  # the flush happens when the session goes idle after this transaction
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    all_buffers = (
        "SELECT coalesce(sum(coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0)"
        " + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0) + coalesce(toast_blks_hit, 0)"
        " + coalesce(toast_blks_read, 0) + coalesce(tidx_blks_hit, 0) + coalesce(tidx_blks_read, 0)), 0)"
        " FROM pg_statio_user_tables WHERE schemaname = %s"
    )
    index_buffers = (
        "SELECT coalesce(sum(coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0)), 0)"
        " FROM pg_statio_user_tables WHERE schemaname = %s"
    )
    cursor = await connection.execute(
        index_buffers if indexes_only else all_buffers,
        (schema,),
    )
    row = await cursor.fetchone()
    await connection.commit()
    assert row is not None
    return int(row[0])


async def test_an_idle_claim_reads_a_few_buffers_over_an_unanalysed_delayed_backlog(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """The claim is a server-side function: EXPLAIN cannot show the plans inside, but the buffers it touches
    tell whether it probed the index or walked the backlog (the 20 000 delayed tasks fill hundreds of
    pages)."""
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    for start in range(0, _BACKLOG, 10_000):
        batch = [make_task(f"d{n}", delay=3600) for n in range(start, start + 10_000)]
        await backend.enqueue_many(batch)
    now = time.time()
    statements = backend._statements
    [(query, params)] = await _recorded(
        postgres_dsn, lambda conn: ops.claim(conn, statements, ["default"], 10, now, now + 30)
    )
    touched, rows = await _buffers(postgres_dsn, pg_schema, query, params)
    assert rows == []
    assert touched < 50, f"an idle claim touched {touched} buffers"
    assert await backend.claim(["default"], 10, now=now, lease_until=now + 30) == []


@pytest.mark.parametrize("analysed", [False, True])
async def test_a_claim_with_limits_steps_over_a_saturated_name_at_the_head_of_the_queue(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, analysed: bool
) -> None:
    """40 000 due tasks of a name at its max_running sit before the tasks of other names: the claim takes
    those others without reading the held ones (a bounded number of buffers: walking them would touch over
    a thousand), and leaves the held ones untouched."""
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    now = time.time()
    for start in range(0, 40_000, 10_000):
        head = [
            NewTask(f"h{n}", "tests.limited", "default", b"", 0, None, now - 60, now - 60)
            for n in range(start, start + 10_000)
        ]
        await backend.enqueue_many(head)
    behind = [NewTask(f"o{n}", f"tests.other{n % 3}", "default", b"", 0, None, now, now) for n in range(6)]
    behind += [
        NewTask(f"k{n}", "tests.keyed", "default", b"", 0, None, now, now, concurrency_key=f"k{n % 2}")
        for n in range(4)
    ]
    await backend.enqueue_many(behind)
    if analysed:  # statistics that know most pending tasks are of the held name
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
            await connection.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(pg_schema, TASKS_TABLE)))
    limits = {"tests.limited": FlowLimits(max_running=1), "tests.keyed": FlowLimits(max_running_per_key=1)}
    first = await backend.claim(["default"], 1, now=now, lease_until=now + 600, limits=limits)
    assert [c.record.id for c in first] == ["h0"]
    statements = backend._statements
    [(query, params)] = await _recorded(
        postgres_dsn, lambda conn: ops.claim(conn, statements, ["default"], 20, now, now + 30, limits)
    )
    touched, rows = await _buffers(postgres_dsn, pg_schema, query, params)
    assert sorted(row[2] for row in rows) == ["k0", "k1", "o0", "o1", "o2", "o3", "o4", "o5"]
    assert touched < 300, f"the claim touched {touched} buffers: it read the held tasks"
    claimed = await backend.claim(["default"], 20, now=now, lease_until=now + 30, limits=limits)
    assert sorted(c.record.id for c in claimed) == ["k0", "k1", "o0", "o1", "o2", "o3", "o4", "o5"]
    held = await backend.get("h1")
    assert held is not None
    assert (held.state, held.attempts) == (TaskState.PENDING, 0)


async def test_lease_recovery_probes_indexes_over_an_unanalysed_active_backlog(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    now = time.time()
    for start in range(0, _BACKLOG, 10_000):
        await backend.enqueue_many([make_task(f"a{n}", at=now - 60) for n in range(start, start + 10_000)])
        claimed = await backend.claim(["default"], 10_000, now=now, lease_until=now + 3600)
        assert len(claimed) == 10_000
    statements = backend._statements
    # Two statements: expired leases, then the damaged records no claim can select (none here).
    recorded = await _recorded(
        postgres_dsn, lambda conn: ops.reclaim_expired(conn, statements, now, now + 30, 10), statements=2
    )
    for query, params in recorded:
        for plan in (await _plans(postgres_dsn, query, params)).values():
            _assert_index_probes_only(plan, TASKS_TABLE)


async def test_the_look_for_due_work_probes_indexes_over_an_unanalysed_backlog(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    now = time.time()
    for start in range(0, _BACKLOG, 10_000):
        batch = [
            NewTask(f"d{n}", "tests.job", "default", b"", 0, None, now, now + 3600, priority=n % 3)
            for n in range(start, start + 10_000)
        ]
        await backend.enqueue_many(batch)
    statements = backend._statements
    recorded = await _recorded(postgres_dsn, lambda conn: ops.next_due(conn, statements, ["default"]))
    for query, params in recorded:
        for plan in (await _plans(postgres_dsn, query, params)).values():
            _assert_index_probes_only(plan, TASKS_TABLE)


@pytest.mark.parametrize("limited", [False, True])
async def test_a_claim_from_a_large_due_backlog_reads_only_what_it_takes(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, limited: bool
) -> None:
    """A draining worker's claim of one task: 20 000 due tasks, statistics up to date. The claims' statements
    run with generic plans (see ``_functions``); a generic plan that fetched the whole due range to sort it
    would touch hundreds of pages per claim. (Each row the claim leases costs about 15 buffer touches: the
    index entries its new version gets.)"""
    backend = await open_pg()
    now = time.time()
    for start in range(0, _BACKLOG, 10_000):
        batch = [
            NewTask(
                f"d{n}", "tests.job", "default", b"", 0, None, now - 60, now - 60, concurrency_key=f"k{n}"
            )
            for n in range(start, start + 10_000)
        ]
        await backend.enqueue_many(batch)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        await connection.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(pg_schema, TASKS_TABLE)))
    limits = {"tests.job": FlowLimits(max_running=1000, max_running_per_key=1)} if limited else None
    statements = backend._statements
    [(query, params)] = await _recorded(
        postgres_dsn, lambda conn: ops.claim(conn, statements, ["default"], 1, now, now + 30, limits)
    )
    touched, rows = await _buffers(postgres_dsn, pg_schema, query, params)
    assert len(rows) == 1
    assert touched < 100, f"a claim of one task touched {touched} buffers"


@pytest.mark.parametrize("analysed", [False, True])
async def test_settling_a_member_of_a_large_group_and_reading_the_group_probe_indexes(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, analysed: bool
) -> None:
    """A group of 20 000 members: the settlement of one member (its group's bookkeeping in the group function,
    whose inner plans EXPLAIN cannot show) touches a few dozen buffers, not the member table's hundreds of
    pages; reading the group reads each member's record by its primary key (its member rows are the whole
    member table here: reading that table whole is right)."""
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    now = time.time()
    members = tuple(
        NewTask(f"m{n}", "tests.job", "default", b"", 0, None, now - 60, now - 60, group_id="big")
        for n in range(_BACKLOG)
    )
    await backend.enqueue_group(NewGroup("big", members, make_task("then"), now))
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        for table in (GROUPS_TABLE, MEMBERS_TABLE):
            name = sql.Identifier(pg_schema, table)
            await connection.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(name))
        if analysed:
            for table in (TASKS_TABLE, GROUPS_TABLE, MEMBERS_TABLE):
                await connection.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(pg_schema, table)))
    (claimed,) = await backend.claim(["default"], 1, now=now, lease_until=now + 30)
    statements = backend._statements
    verdict = Settlement(claimed.record.id, claimed.token, TaskState.SUCCEEDED, at=now, result=b"r")
    [(query, params)] = await _recorded(postgres_dsn, lambda conn: ops.settle(conn, statements, [verdict]))
    touched, rows = await _buffers(postgres_dsn, pg_schema, query, params)
    assert claimed.record.id in [row[0] for row in rows], "the settlement was applied"
    assert touched < 100, f"settling one member of a group of {_BACKLOG} touched {touched} buffers"
    [(query, params)] = await _recorded(postgres_dsn, lambda conn: ops.get_group(conn, statements, "big"))
    for plan in (await _plans(postgres_dsn, query, params)).values():
        _assert_index_probes_only(plan, TASKS_TABLE)


async def test_a_claim_steps_over_the_entries_earlier_claims_left_behind_once(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """Every claim leaves the pending-index entries of the tasks it took at the head of the queue's group
    until a vacuum removes them (autovacuum is off here, as it is between its visits during a drain). The
    claim steps over them once, in its probe for the first pending task, and starts its scan of the due tasks
    at that task: a claim that walked the prefix three times (the probe, the probe again, the scan) touched
    about three times the pending index's pages (298 buffers for 123 pages under schema version 4)."""
    backend = await open_pg()
    await _backlog_table(postgres_dsn, pg_schema)
    now = time.time()
    for start in range(0, _BACKLOG, 10_000):
        batch = [make_task(f"d{n}", at=now - 60) for n in range(start, start + 10_000)]
        await backend.enqueue_many(batch)
    for _ in range(15):  # three quarters of the backlog claimed: their entries stay at the head
        assert len(await backend.claim(["default"], 1000, now=now, lease_until=now + 600)) == 1000
    # Its connections end here: a session sends its buffer counts to the server-wide statistics when idle, at
    # most once a second, and at exit, so those of these claims could otherwise land inside the measurement
    # below. close() returns once the client's sockets are closed, and a server process on a loaded machine
    # may exit later (a claim then "touched" 374 buffers in CI): wait until none is left. A process leaves
    # pg_stat_activity only after its exit's flush, and this database is the test's own.
    await backend.close()
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        with anyio.fail_after(30):
            while True:
                cursor = await connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
                others = await cursor.fetchone()
                if others is not None and others[0] == 0:
                    break
                await anyio.sleep(0.01)
        cursor = await connection.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
            (f'"{pg_schema}"."{TASKS_TABLE}_pending"',),
        )
        row = await cursor.fetchone()
    assert row is not None
    pages = int(row[0])
    statements = backend._statements
    [(query, params)] = await _recorded(
        postgres_dsn, lambda conn: ops.claim(conn, statements, ["default"], 1, now, now + 30)
    )
    # Index buffers only: whether the heap is visited for each of those entries depends on the whole server.
    # Until every transaction older than the claims' ends (one holding an xid in any database, such as
    # another test run's), the entries cannot be marked dead, and the claim visits their heap pages once
    # each (241 more buffers here) on every walk: that says nothing about how many walks it makes.
    touched, rows = await _buffers(postgres_dsn, pg_schema, query, params, indexes_only=True)
    assert len(rows) == 1
    assert touched < 1.5 * pages, f"a claim of one task touched {touched} index buffers ({pages} index pages)"
