"""What each :class:`~lifecycle.asynctask.postgres.PostgresBackend` method does on a connection.

Every function takes a psycopg ``AsyncConnection`` and the backend's :class:`Statements`. Single-statement
operations run in autocommit mode (one statement is one transaction). :func:`enqueue` opens its own
transaction block, which is a real transaction on a pooled connection and a savepoint inside a caller's
transaction, so the same code serves :meth:`PostgresBackend.enqueue_many` and the transactional outbox.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import TupleRow, tuple_row

from ... import _records
from ..._errors import DuplicateTaskError
from ..._records import ClaimedTask, NewTask, Settlement, TaskRecord, TaskState
from ._schema import TASK_COLUMNS
from ._sql import NOTIFY_QUEUE, Statements

__all__ = [
    "cancel",
    "claim",
    "enqueue",
    "extend_leases",
    "get",
    "list_records",
    "next_due",
    "purge",
    "reclaim_expired",
    "record_from_row",
    "requeue",
    "settle",
    "stats",
]

Connection = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[TupleRow]

_LIVE = frozenset({TaskState.PENDING.value, TaskState.ACTIVE.value})
_SETTLE_STATES = frozenset({TaskState.PENDING, TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})
# How often an enqueue that lost a race for a new id (a concurrent insert of the same id) is retried.
_RACE_RETRIES = 3
_DUPLICATE_KEY = re.compile(r"^Key \(id\)=\((?P<id>.*)\) already exists\.$", re.DOTALL)


def _cursor(connection: Connection) -> Cursor:
    # The caller's connection may have another row factory: ours always reads tuples.
    return connection.cursor(row_factory=tuple_row)


def record_from_row(row: Sequence[Any]) -> TaskRecord:
    """Build a :class:`TaskRecord` from a row selected with ``TASK_COLUMNS``."""
    return _records.record_from_row(row, bytes)


def _float_or_none(value: float | None) -> float | None:
    # psycopg dumps a list as one array type: a list mixing int and float must become all floats.
    return None if value is None else float(value)


def _check_text(task: NewTask) -> None:
    for field in ("id", "name", "queue", "meta"):
        value = getattr(task, field)
        if value is not None and "\x00" in value:
            raise ValueError(
                f"task {task.id!r}: its {field} contains a NUL character, which PostgreSQL text cannot "
                "store; remove it (NUL is allowed in the payload bytes)"
            )


def _error_text(error: str | None) -> str | None:
    # An error message is diagnostic text: keep it storable rather than fail the whole settlement batch.
    return None if error is None else error.replace("\x00", "\\x00")


def _new_task_arrays(tasks: Iterable[NewTask]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(9)]
    for task in tasks:
        _check_text(task)
        values = (
            task.id,
            task.name,
            task.queue,
            bytes(task.payload),
            int(task.max_retries),
            _float_or_none(task.timeout),
            float(task.enqueued_at),
            float(task.run_at),
            task.meta,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


# -- enqueue ------------------------------------------------------------------------------------------------


async def enqueue(
    connection: Connection, st: Statements, tasks: Sequence[NewTask], if_exists: Literal["error", "skip"]
) -> list[str]:
    """Store ``tasks`` atomically on ``connection``; see :meth:`Backend.enqueue_many` for the id rules."""
    cursor = _cursor(connection)
    # Fast path: fresh ids (the common case) are one INSERT ... ON CONFLICT DO NOTHING.
    try:
        async with connection.transaction():
            await cursor.execute(st.insert_new, (*_new_task_arrays(tasks), st.channel))
            stored = {row[0] for row in await cursor.fetchall()}
            if if_exists == "skip" or len(stored) == len(tasks):
                return _in_order(tasks, stored)
            raise _SomeIdExists  # undo the batch, then sort the ids out below
    except _SomeIdExists:
        pass
    for attempt in range(1, _RACE_RETRIES + 1):
        try:
            async with connection.transaction():
                return await _enqueue_checked(cursor, st, tasks)
        except psycopg.errors.UniqueViolation as exc:
            # A concurrent transaction stored one of the ids after we looked: it is pending now.
            if attempt == _RACE_RETRIES:
                match = _DUPLICATE_KEY.match(exc.diag.message_detail or "")
                raise DuplicateTaskError(match["id"] if match else tasks[0].id) from None
    raise AssertionError("unreachable")  # pragma: no cover


class _SomeIdExists(Exception):
    """Rolls back the fast path of :func:`enqueue` when an id of an ``if_exists="error"`` batch exists."""


def _in_order(tasks: Sequence[NewTask], stored: Collection[str]) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for task in tasks:
        if task.id in stored and task.id not in seen:
            seen.add(task.id)
            ids.append(task.id)
    return ids


async def _enqueue_checked(cursor: Cursor, st: Statements, tasks: Sequence[NewTask]) -> list[str]:
    """``if_exists="error"`` when some id exists: refuse live duplicates, replace finished records."""
    await cursor.execute(st.lock_existing, (list({task.id for task in tasks}),))
    existing: dict[str, str] = {row[0]: row[1] for row in await cursor.fetchall()}
    seen: set[str] = set()
    to_insert: list[NewTask] = []
    to_replace: list[str] = []
    conflicts: list[str] = []
    for task in tasks:
        state = existing.get(task.id)
        if task.id in seen or state in _LIVE:  # an id twice in one batch: the first copy is pending
            conflicts.append(task.id)
            continue
        seen.add(task.id)
        if state is not None:
            to_replace.append(task.id)
        to_insert.append(task)
    if conflicts:
        raise DuplicateTaskError(conflicts[0], list(dict.fromkeys(conflicts)))
    if to_replace:
        await cursor.execute(st.delete_ids, (to_replace,))
    await cursor.execute(st.insert_checked, (*_new_task_arrays(to_insert), st.channel))
    return [task.id for task in to_insert]


# -- leases -------------------------------------------------------------------------------------------------


async def claim(
    connection: Connection, st: Statements, queues: Sequence[str], limit: int, now: float, lease_until: float
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due pending tasks, ``queues`` in priority order, in one statement."""
    cursor = _cursor(connection)
    await cursor.execute(st.claim, (list(queues), now, limit, limit, now, lease_until))
    rows = await cursor.fetchall()
    # RETURNING has no order: put the rows back into (queue priority, run_at, enqueue order).
    priority = {queue: index for index, queue in enumerate(queues)}
    rows.sort(key=lambda row: (priority[row[4]], row[11], row[0]))
    return [ClaimedTask(token=row[1], record=record_from_row(row[2:])) for row in rows]


async def reclaim_expired(
    connection: Connection, st: Statements, now: float, lease_until: float, limit: int
) -> list[ClaimedTask]:
    """Take over active tasks whose lease expired before ``now``, attempts unchanged; then, up to ``limit``
    in all, the damaged records no claim can select (see :func:`_take_over_damaged`)."""
    cursor = _cursor(connection)
    await cursor.execute(st.reclaim, (now, limit, lease_until))
    rows = await cursor.fetchall()
    rows.sort(key=lambda row: row[0])
    taken = [ClaimedTask(token=row[1], record=record_from_row(row[2:])) for row in rows]
    if len(taken) < limit:
        taken += await _take_over_damaged(connection, st, lease_until, limit - len(taken))
    return taken


# Records no claim or reclaim selects because a field they are selected by holds no usable time: an active
# task whose lease_until is NULL, NaN or infinite, a pending task whose run_at is NaN or infinite (found queue
# by queue, with a loose scan of the pending index). NaN sorts above Infinity. The candidates are locked and
# tested again (SKIP LOCKED: concurrent reclaimers never take the same); the statement returns each one's
# values from before it was leased, so the reader names the damaged field.
_RETURNED_COLUMNS = ", ".join(f"t.{column.strip()}" for column in TASK_COLUMNS.split(","))
_DAMAGED_WHERE = (
    "(t.state = 'active' AND (t.lease_until IS NULL OR t.lease_until >= 'Infinity')) "
    "OR (t.state = 'pending' AND t.run_at >= 'Infinity')"
)
_DAMAGED = (
    "WITH RECURSIVE queues(name) AS ("
    "(SELECT queue FROM {tasks} WHERE state = 'pending' ORDER BY queue LIMIT 1) "
    "UNION ALL SELECT (SELECT p.queue FROM {tasks} AS p WHERE p.state = 'pending' AND p.queue > queues.name "
    "ORDER BY p.queue LIMIT 1) FROM queues WHERE queues.name IS NOT NULL), "
    "found AS (SELECT a.id FROM {tasks} AS a WHERE a.state = 'active' AND a.lease_until IS NULL "
    "UNION ALL SELECT a.id FROM {tasks} AS a WHERE a.state = 'active' AND a.lease_until >= 'Infinity' "
    "UNION ALL SELECT p.id FROM queues CROSS JOIN LATERAL (SELECT p.id FROM {tasks} AS p "
    "WHERE p.state = 'pending' AND p.queue = queues.name AND p.run_at >= 'Infinity') AS p LIMIT %s), "
    "pick AS MATERIALIZED (SELECT t.seq, " + _RETURNED_COLUMNS + " FROM {tasks} AS t "
    "WHERE t.id IN (SELECT id FROM found) AND (" + _DAMAGED_WHERE + ") FOR UPDATE SKIP LOCKED), "
    "leased AS (UPDATE {tasks} AS t SET state = 'active', lease_until = %s, "
    "token = gen_random_uuid()::text FROM pick WHERE t.id = pick.id RETURNING t.id, t.token) "
    "SELECT leased.token, pick.* FROM pick JOIN leased ON leased.id = pick.id ORDER BY pick.seq"
)


async def _take_over_damaged(
    connection: Connection, st: Statements, lease_until: float, limit: int
) -> list[ClaimedTask]:
    """Lease the records whose run_at or lease_until holds no usable time (so that no claim or reclaim
    selects them), as if their lease had expired: each comes back with its ``fault``, read before the lease
    was written, and the engine settles it dead."""
    cursor = _cursor(connection)
    await cursor.execute(sql.SQL(_DAMAGED).format(tasks=st.tasks), (limit, lease_until))
    return [
        ClaimedTask(
            token=row[0],
            record=dataclasses.replace(
                record_from_row(row[2:]), state=TaskState.ACTIVE, lease_until=lease_until
            ),
        )
        for row in await cursor.fetchall()
    ]


async def extend_leases(
    connection: Connection, st: Statements, leases: Sequence[tuple[str, str]], lease_until: float
) -> set[str]:
    """Renew the leases still held, in one statement; return the ids whose lease was lost."""
    cursor = _cursor(connection)
    ids = [task_id for task_id, _ in leases]
    tokens = [token for _, token in leases]
    await cursor.execute(st.extend, (lease_until, ids, tokens, ids))
    held = {row[0] for row in await cursor.fetchall()}
    return {task_id for task_id in ids if task_id not in held}


async def settle(connection: Connection, st: Statements, settlements: Sequence[Settlement]) -> set[str]:
    """Apply every settlement whose lease is held, with its ``then`` tasks, in one statement."""
    columns: list[list[Any]] = [[] for _ in range(8)]
    follow_ups: list[NewTask] = []
    parents: list[str] = []
    for s in settlements:
        state = TaskState(s.state)
        if state not in _SETTLE_STATES:
            raise ValueError(
                f"cannot settle task {s.task_id!r} as {state.value!r}: a settlement's state must be "
                "pending, succeeded, dead or cancelled"
            )
        run_at = (s.at if s.run_at is None else s.run_at) if state is TaskState.PENDING else None
        result = None if s.result is None else bytes(s.result)
        values = (
            s.task_id,
            s.token,
            state.value,
            float(s.at),
            _float_or_none(run_at),
            _error_text(s.error),
            result,
            int(s.refund_attempt),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
        follow_ups.extend(s.then)
        parents.extend(s.task_id for _ in s.then)
    cursor = _cursor(connection)
    params = (*columns, columns[0], *_new_task_arrays(follow_ups), parents, st.channel, st.channel)
    await cursor.execute(st.settle, params)
    applied = {row[0] for row in await cursor.fetchall() if row[0] is not None}
    return {s.task_id for s in settlements if s.task_id not in applied}


async def next_due(connection: Connection, st: Statements, queues: Sequence[str]) -> tuple[float, int] | None:
    """The earliest pending ``(run_at, seq)`` over ``queues``, or ``None`` when nothing is pending."""
    cursor = _cursor(connection)
    await cursor.execute(st.next_due, (list(queues),))
    row = await cursor.fetchone()
    return None if row is None else (float(row[0]), int(row[1]))


# -- reading ------------------------------------------------------------------------------------------------


async def get(connection: Connection, st: Statements, task_id: str) -> TaskRecord | None:
    """The record with ``task_id`` or ``None``."""
    cursor = _cursor(connection)
    await cursor.execute(st.get, (task_id,))
    row = await cursor.fetchone()
    return None if row is None else record_from_row(row)


def _filters(
    states: Collection[TaskState] | None, queue: str | None
) -> tuple[list[sql.Composable], list[Any]]:
    clauses: list[sql.Composable] = []
    params: list[Any] = []
    if states is not None:
        clauses.append(sql.SQL("state = ANY(%s::text[])"))
        params.append(sorted({TaskState(state).value for state in states}))
    if queue is not None:
        clauses.append(sql.SQL("queue = %s"))
        params.append(queue)
    return clauses, params


def _where(clauses: list[sql.Composable]) -> sql.Composable:
    if not clauses:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses)


async def list_records(
    connection: Connection,
    st: Statements,
    states: Collection[TaskState] | None,
    queue: str | None,
    limit: int,
    offset: int,
) -> list[TaskRecord]:
    """Records matching the filters, newest ``enqueued_at`` first."""
    clauses, params = _filters(states, queue)
    query = sql.SQL(
        "SELECT "
        + TASK_COLUMNS
        + " FROM {tasks}{where} ORDER BY enqueued_at DESC, seq DESC LIMIT %s OFFSET %s"
    ).format(tasks=st.tasks, where=_where(clauses))
    cursor = _cursor(connection)
    await cursor.execute(query, [*params, max(limit, 0), max(offset, 0)])
    return [record_from_row(row) for row in await cursor.fetchall()]


async def stats(connection: Connection, st: Statements) -> dict[str, dict[TaskState, int]]:
    """Counts per queue and state."""
    cursor = _cursor(connection)
    await cursor.execute(
        sql.SQL("SELECT queue, state, count(*) FROM {} GROUP BY queue, state").format(st.tasks)
    )
    counts: dict[str, dict[TaskState, int]] = {}
    for queue, state, count in await cursor.fetchall():
        per_queue = counts.setdefault(_records.stored_text(queue), {})
        known = _records.stored_state(state)  # a state the schema's check would refuse counts as dead
        per_queue[known] = per_queue.get(known, 0) + int(count)
    return counts


# -- operator actions ---------------------------------------------------------------------------------------


async def cancel(connection: Connection, st: Statements, task_ids: Sequence[str], now: float) -> list[str]:
    """Cancel the pending tasks among ``task_ids``; return those cancelled, in the order given."""
    cursor = _cursor(connection)
    unique = list(dict.fromkeys(task_ids))
    await cursor.execute(st.cancel, (now, unique))
    cancelled = {row[0] for row in await cursor.fetchall()}
    return [task_id for task_id in unique if task_id in cancelled]


async def requeue(
    connection: Connection, st: Statements, task_ids: Sequence[str] | None, queue: str | None, now: float
) -> int:
    """Move dead (or, by id, cancelled) tasks back to pending with no attempts; return how many moved."""
    if task_ids is None:
        clauses: list[sql.Composable] = [sql.SQL("state = 'dead'")]
        params: list[Any] = [now]
    else:
        clauses = [sql.SQL("state IN ('dead', 'cancelled')"), sql.SQL("id = ANY(%s::text[])")]
        params = [now, list(dict.fromkeys(task_ids))]
    if queue is not None:
        clauses.append(sql.SQL("queue = %s"))
        params.append(queue)
    query = sql.SQL(
        "WITH moved AS (UPDATE {tasks} SET state = 'pending', attempts = 0, run_at = %s, finished_at = NULL, "
        "lease_until = NULL, token = NULL{where} RETURNING queue) "
        "SELECT count(*), " + NOTIFY_QUEUE + " FROM moved GROUP BY queue"
    ).format(tasks=st.tasks, where=_where(clauses))
    cursor = _cursor(connection)
    await cursor.execute(query, [*params, st.channel])
    return sum(int(row[0]) for row in await cursor.fetchall())


async def purge(
    connection: Connection,
    st: Statements,
    states: Collection[TaskState],
    queue: str | None,
    before: float | None,
    limit: int | None,
) -> int:
    """Delete matching records; return how many were deleted."""
    if not states or (limit is not None and limit <= 0):
        return 0
    clauses, params = _filters(states, queue)
    if before is not None:
        clauses.append(sql.SQL("coalesce(finished_at, enqueued_at) < %s"))
        params.append(before)
    if limit is None:
        query: sql.Composed = sql.SQL("DELETE FROM {tasks}{where}").format(
            tasks=st.tasks, where=_where(clauses)
        )
    else:
        query = sql.SQL(
            "DELETE FROM {tasks} WHERE id IN "
            "(SELECT id FROM {tasks}{where} ORDER BY coalesce(finished_at, enqueued_at), seq LIMIT %s)"
        ).format(tasks=st.tasks, where=_where(clauses))
        params.append(limit)
    cursor = _cursor(connection)
    await cursor.execute(query, params)
    return max(cursor.rowcount, 0)
