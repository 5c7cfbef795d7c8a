"""PostgresBackend with damaged rows (issue 10): typed columns hold fewer wrong values than SQLite or Redis,
but NaN and infinite times, out-of-range counts and a state the schema's check no longer guards are
possible; none of them fails a claim batch, a settlement or a read. The backend-neutral rules are in the
conformance suite (``DamageRules``)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import Settlement, TaskState
from lifecycle.asynctask.testing import T0

from ._support import OpenPostgres, make_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _update(dsn: str, schema: str, assignment: str, task_id: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            sql.SQL("UPDATE {} SET " + assignment + " WHERE id = %s").format(
                sql.Identifier(schema, "lifecycle_tasks")
            ),
            (task_id,),
        )


async def test_attempts_at_the_integer_limit_do_not_fail_the_claim_or_the_release(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """One more than 2147483647 overflows the column: the whole claim statement would fail, for good."""
    backend = await open_pg()
    await backend.enqueue_many([make_task(f"t{n}", at=T0 + n) for n in range(3)])
    _update(postgres_dsn, pg_schema, "attempts = 2147483647", "t1")
    _update(postgres_dsn, pg_schema, "attempts = -2147483648", "t2")
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
    assert [c.record.id for c in claimed] == ["t0", "t1", "t2"]
    assert [c.record.attempts for c in claimed[:2]] == [1, 2147483647]
    assert claimed[2].record.fault == "field 'attempts' holds -2147483648, not a whole number >= 0"
    releases = [
        Settlement(c.record.id, c.token, TaskState.PENDING, at=T0 + 11, run_at=T0 + 11, refund_attempt=True)
        for c in claimed
    ]
    assert await backend.settle(releases) == set()
    attempts = {r.id: r.attempts for r in await backend.list_records()}
    assert attempts == {"t0": 0, "t1": 2147483646, "t2": 0}


async def test_pending_tasks_with_nan_or_infinite_run_at_are_taken_over_in_every_queue(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg()
    queues = ["a", "b", "c"]
    await backend.enqueue_many([make_task(f"{q}{n}", queue=q, at=T0 + n) for q in queues for n in range(3)])
    _update(postgres_dsn, pg_schema, "run_at = 'NaN'", "a1")
    _update(postgres_dsn, pg_schema, "run_at = 'Infinity'", "c2")
    _update(postgres_dsn, pg_schema, "run_at = '-Infinity'", "b0")  # due: the claim hands it out
    claimed = await backend.claim(queues, 20, now=T0 + 10, lease_until=T0 + 1000)
    assert sorted(c.record.id for c in claimed) == ["a0", "a2", "b0", "b1", "b2", "c0", "c1"]
    assert [c.record.id for c in claimed if c.record.fault] == ["b0"]
    taken = await backend.reclaim_expired(now=T0 + 20, lease_until=T0 + 1000, limit=10)
    assert sorted(c.record.id for c in taken) == ["a1", "c2"]
    for c in taken:
        assert c.record.fault is not None
        assert c.record.fault.startswith("field 'run_at' holds ")
        assert c.record.state is TaskState.ACTIVE
    assert await backend.reclaim_expired(now=T0 + 20, lease_until=T0 + 1000, limit=10) == []


async def test_a_state_the_check_no_longer_guards_is_counted_as_dead(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("t0", at=T0), make_task("t1", at=T0 + 1)])
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        table = sql.Identifier(pg_schema, "lifecycle_tasks")
        for (name,) in connection.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (f'"{pg_schema}".lifecycle_tasks',),
        ).fetchall():
            drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(name))
            connection.execute(drop)
        # Since schema version 7 the check sits on the state column's domain.
        for domain, name in connection.execute(
            "SELECT contypid::regtype::text, conname FROM pg_constraint WHERE contype = 'c' AND contypid = "
            "(SELECT atttypid FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'state')",
            (f'"{pg_schema}".lifecycle_tasks',),
        ).fetchall():
            drop = sql.SQL("ALTER DOMAIN {} DROP CONSTRAINT {}").format(sql.SQL(domain), sql.Identifier(name))
            connection.execute(drop)
    _update(postgres_dsn, pg_schema, "state = 'paused'", "t1")
    assert await backend.stats() == {"default": {TaskState.PENDING: 1, TaskState.DEAD: 1}}
    record = await backend.get("t1")
    assert record is not None
    assert (record.state, record.fault is not None) == (TaskState.DEAD, True)
    claimed = await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 9)
    assert [c.record.id for c in claimed] == ["t0"]
