"""The SQL behind each :class:`~lifecycle.asynctask.SQLiteBackend` method.

Every function here is synchronous, takes the backend's connection and runs on its connection thread.
Write operations are called inside a ``BEGIN IMMEDIATE`` transaction opened by the backend, so each call is
atomic and serialised against every other process writing the same file.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Literal, TypeVar

from ... import _records
from ..._errors import DuplicateTaskError
from ..._records import ClaimedTask, NewTask, Settlement, TaskRecord, TaskState
from ._schema import TASK_COLUMNS

__all__ = [
    "cancel",
    "claim",
    "enqueue_many",
    "extend_leases",
    "get",
    "list_records",
    "next_run_at",
    "purge",
    "read_text",
    "reading_any_text",
    "reclaim_expired",
    "requeue",
    "settle",
    "stats",
]

# Stay well below SQLite's limit on bound variables per statement.
_CHUNK = 500

_PENDING = TaskState.PENDING.value
_ACTIVE = TaskState.ACTIVE.value

_INSERT = (
    "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, timeout, "
    "enqueued_at, run_at, meta) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?)"
)
_INSERT_OR_SKIP = _INSERT + " ON CONFLICT (id) DO NOTHING"

# Claims, recovery and wait_for_work name their partial index: without ANALYZE statistics the planner may
# otherwise prefer the (state, ...) index and sort.
# A fresh random lease token per claimed row, made by SQLite inside the same UPDATE.
_NEW_TOKEN = "lower(hex(randomblob(12)))"

# A damaged attempts value (not a whole number >= 0) is left as it is, for the record reader to report,
# instead of being turned into a number by SQLite's arithmetic.
_COUNTED = "typeof(attempts) = 'integer' AND attempts >= 0"

_CLAIM = (
    f"UPDATE lifecycle_tasks SET state = 'active', "
    f"attempts = CASE WHEN {_COUNTED} THEN attempts + 1 ELSE attempts END, started_at = ?, "
    f"lease_until = ?, token = {_NEW_TOKEN} "
    "WHERE seq IN (SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue = ? AND run_at <= ? "
    "ORDER BY run_at, seq LIMIT ?) "
    f"RETURNING token, seq, {TASK_COLUMNS}"
)

_RECLAIM = (
    f"UPDATE lifecycle_tasks SET lease_until = ?, token = {_NEW_TOKEN} "
    "WHERE seq IN (SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active "
    "WHERE state = 'active' AND lease_until < ? "
    "ORDER BY lease_until, seq LIMIT ?) "
    f"RETURNING token, seq, {TASK_COLUMNS}"
)

_HELD = "WHERE id = ? AND token = ? AND state = 'active'"
_SETTLE_SUCCEEDED = (
    "UPDATE lifecycle_tasks SET state = 'succeeded', finished_at = ?, result = ?, "
    f"last_error = coalesce(?, last_error), lease_until = NULL, token = NULL {_HELD}"
)
_SETTLE_FINAL = (
    "UPDATE lifecycle_tasks SET state = ?, finished_at = ?, result = coalesce(?, result), "
    f"last_error = coalesce(?, last_error), lease_until = NULL, token = NULL {_HELD}"
)
_SETTLE_PENDING = (
    "UPDATE lifecycle_tasks SET state = 'pending', run_at = ?, "
    f"attempts = CASE WHEN {_COUNTED} THEN max(attempts - ?, 0) ELSE attempts END, "
    f"finished_at = NULL, last_error = coalesce(?, last_error), lease_until = NULL, token = NULL {_HELD}"
)
_EXTEND = f"UPDATE lifecycle_tasks SET lease_until = ? {_HELD}"

_KNOWN_STATES = sorted(state.value for state in TaskState)

# Records no claim or reclaim can select because a field they are selected by cannot be read. SQLite sorts
# numbers before text and text before blobs, so ">= 9e999" (infinity) is one index range holding +inf, text
# and blobs (a NaN is stored as NULL). Active tasks whose lease_until is not a finite number, and tasks in no
# known state (the ranges between the known state names, on the index that leads with state):
_UNSELECTABLE = (
    "SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active "
    "WHERE state = 'active' AND lease_until IS NULL "
    "UNION ALL SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active "
    "WHERE state = 'active' AND lease_until >= 9e999 "
    "UNION ALL SELECT seq FROM lifecycle_tasks WHERE "
    + " OR ".join(
        [f"state < '{_KNOWN_STATES[0]}'"]
        + [f"(state > '{a}' AND state < '{b}')" for a, b in itertools.pairwise(_KNOWN_STATES)]
        + [f"state > '{_KNOWN_STATES[-1]}'"]
    )
    + " LIMIT ?"
)
# The queues of pending tasks, one index probe each (a loose scan of the pending index)...
_PENDING_QUEUES = (
    "WITH RECURSIVE queues(name) AS ("
    "SELECT (SELECT min(queue) FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending') "
    "UNION ALL SELECT (SELECT min(queue) FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue > queues.name) FROM queues WHERE queues.name IS NOT NULL) "
    "SELECT name FROM queues WHERE name IS NOT NULL"
)
# ...then, in a queue a worker can name, the pending tasks whose run_at is not a finite number; in a queue
# whose name is not UTF-8 text (no worker can name it), every pending task.
_UNSCHEDULED = (
    "SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue = ? AND run_at >= 9e999 LIMIT ?"
)
_IN_QUEUE = (
    "SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending WHERE state = 'pending' AND queue = "
)

_T = TypeVar("_T")


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def read_text(value: bytes) -> str:
    """The text factory of a connection that met text that is not UTF-8 (a row written by hand): such text
    keeps its bytes as surrogate escapes, so reading it never fails and the record reader names it."""
    return str(value, "utf-8", "surrogateescape")


def reading_any_text(connection: sqlite3.Connection, call: Callable[..., _T], args: Sequence[Any]) -> _T:
    """``call(*args)``; when SQLite hands back text that is not UTF-8 (``sqlite3`` refuses to decode it), the
    connection switches to :func:`read_text` for good and ``call`` runs again. ``call`` must leave nothing
    behind when it raises (a transaction rolled back), as :func:`_in_transaction` does."""
    try:
        return call(*args)
    except sqlite3.OperationalError as exc:
        if connection.text_factory is read_text or "decode to UTF-8" not in str(exc):
            raise
    connection.text_factory = read_text
    return call(*args)


def record_from_row(row: Sequence[Any]) -> TaskRecord:
    """Build a :class:`TaskRecord` from a row selected with ``TASK_COLUMNS``; never raises for what the row
    holds (see :func:`lifecycle.asynctask._records.record_from_row`)."""
    return _records.record_from_row(row)


def _claimed(rows: list[Any]) -> list[ClaimedTask]:
    # RETURNING gives no order guarantee: put the rows back into (run_at, seq) order.
    rows.sort(key=lambda row: (row[11], row[1]))
    return [ClaimedTask(token=row[0], record=record_from_row(row[2:])) for row in rows]


def _new_task_row(task: NewTask) -> tuple[Any, ...]:
    return (
        task.id,
        task.name,
        task.queue,
        task.payload,
        task.max_retries,
        task.timeout,
        task.enqueued_at,
        task.run_at,
        task.meta,
    )


def enqueue_many(
    connection: sqlite3.Connection, tasks: Sequence[NewTask], if_exists: Literal["error", "skip"]
) -> list[str]:
    """Insert ``tasks``; see :meth:`Backend.enqueue_many` for the duplicate rules."""
    if not tasks:
        return []
    # Fast path: fresh ids (the common case) need one executemany and no look-up.
    connection.execute("SAVEPOINT lifecycle_enqueue")
    inserted = connection.executemany(_INSERT_OR_SKIP, map(_new_task_row, tasks)).rowcount
    if inserted == len(tasks):
        connection.execute("RELEASE lifecycle_enqueue")
        return [task.id for task in tasks]
    connection.execute("ROLLBACK TO lifecycle_enqueue")
    connection.execute("RELEASE lifecycle_enqueue")

    existing: dict[str, str] = {}
    for chunk in _chunks(list({task.id for task in tasks})):
        query = f"SELECT id, state FROM lifecycle_tasks WHERE id IN ({_marks(len(chunk))})"
        existing.update(connection.execute(query, chunk).fetchall())
    seen: set[str] = set()
    to_insert: list[NewTask] = []
    to_replace: list[str] = []
    conflicts: list[str] = []
    for task in tasks:
        state = existing.get(task.id)
        if task.id in seen:  # the same id twice in one batch: the first copy is pending
            if if_exists == "error":
                conflicts.append(task.id)
            continue
        seen.add(task.id)
        if state is None:
            to_insert.append(task)
        elif if_exists == "skip":
            continue
        elif state in (_PENDING, _ACTIVE):
            conflicts.append(task.id)
        else:
            to_replace.append(task.id)
            to_insert.append(task)
    if conflicts:
        raise DuplicateTaskError(conflicts[0], conflicts)
    for chunk in _chunks(to_replace):
        connection.execute(f"DELETE FROM lifecycle_tasks WHERE id IN ({_marks(len(chunk))})", chunk)
    connection.executemany(_INSERT, map(_new_task_row, to_insert))
    return [task.id for task in to_insert]


def claim(
    connection: sqlite3.Connection, queues: Sequence[str], limit: int, now: float, lease_until: float
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due pending tasks, ``queues`` in priority order."""
    claimed: list[ClaimedTask] = []
    for queue in dict.fromkeys(queues):
        wanted = limit - len(claimed)
        if wanted <= 0:
            break
        rows = connection.execute(_CLAIM, (now, lease_until, queue, now, wanted)).fetchall()
        claimed.extend(_claimed(rows))
    return claimed


def extend_leases(
    connection: sqlite3.Connection, leases: Sequence[tuple[str, str]], lease_until: float
) -> set[str]:
    """Renew the leases still held; return the ids whose lease was lost."""
    lost: set[str] = set()
    for task_id, token in leases:
        if connection.execute(_EXTEND, (lease_until, task_id, token)).rowcount == 0:
            lost.add(task_id)
    return lost


def settle(connection: sqlite3.Connection, settlements: Sequence[Settlement]) -> set[str]:
    """Apply each settlement whose lease is still held (with its ``then`` tasks); return the lost ids."""
    lost: set[str] = set()
    for s in settlements:
        if s.state is TaskState.SUCCEEDED:
            cursor = connection.execute(_SETTLE_SUCCEEDED, (s.at, s.result, s.error, s.task_id, s.token))
        elif s.state is TaskState.PENDING:
            run_at = s.at if s.run_at is None else s.run_at
            refund = 1 if s.refund_attempt else 0
            cursor = connection.execute(_SETTLE_PENDING, (run_at, refund, s.error, s.task_id, s.token))
        elif s.state in (TaskState.DEAD, TaskState.CANCELLED):
            params = (s.state.value, s.at, s.result, s.error, s.task_id, s.token)
            cursor = connection.execute(_SETTLE_FINAL, params)
        else:
            raise ValueError(
                f"cannot settle task {s.task_id!r} as {s.state.value!r}: a settlement's state must be "
                "pending, succeeded, dead or cancelled"
            )
        if cursor.rowcount == 0:
            lost.add(s.task_id)
        elif s.then:
            connection.executemany(_INSERT_OR_SKIP, map(_new_task_row, s.then))
    return lost


def reclaim_expired(
    connection: sqlite3.Connection, now: float, lease_until: float, limit: int
) -> list[ClaimedTask]:
    """Take over active tasks whose lease expired before ``now``, attempts unchanged; then, up to ``limit``
    in all, the damaged records no claim can select (see :func:`_take_over_damaged`)."""
    rows = connection.execute(_RECLAIM, (lease_until, now, limit)).fetchall()
    rows.sort(key=lambda row: row[1])
    taken = [ClaimedTask(token=row[0], record=record_from_row(row[2:])) for row in rows]
    if len(taken) < limit:
        taken += _take_over_damaged(connection, lease_until, limit - len(taken))
    return taken


def _take_over_damaged(connection: sqlite3.Connection, lease_until: float, limit: int) -> list[ClaimedTask]:
    """Lease the records whose state, queue, run_at or lease_until cannot be read (so that no claim or
    reclaim selects them), as if their lease had expired: each comes back with its ``fault``, read before the
    lease was written, and the engine settles it dead."""
    seqs = [seq for (seq,) in connection.execute(_UNSELECTABLE, (limit,))]
    for (queue,) in connection.execute(_PENDING_QUEUES).fetchall():
        if len(seqs) >= limit:
            break
        value: str | bytes
        if isinstance(queue, str) and _records.stored_text(queue) == queue:
            query, value = _UNSCHEDULED, queue
        elif isinstance(queue, str):  # text that is not UTF-8, kept as surrogate escapes by read_text
            query, value = _IN_QUEUE + "CAST(? AS TEXT) LIMIT ?", queue.encode("utf-8", "surrogateescape")
        else:  # a blob
            query, value = _IN_QUEUE + "? LIMIT ?", queue
        seqs += [seq for (seq,) in connection.execute(query, (value, limit - len(seqs)))]
    if not seqs:
        return []
    query = f"SELECT seq, {TASK_COLUMNS} FROM lifecycle_tasks WHERE seq IN ({_marks(len(seqs))}) ORDER BY seq"
    taken: list[ClaimedTask] = []
    for row in connection.execute(query, seqs).fetchall():
        token = secrets.token_hex(12)
        connection.execute(
            "UPDATE lifecycle_tasks SET state = 'active', lease_until = ?, token = ? WHERE seq = ?",
            (lease_until, token, row[0]),
        )
        record = dataclasses.replace(
            record_from_row(row[1:]), state=TaskState.ACTIVE, lease_until=lease_until
        )
        taken.append(ClaimedTask(token=token, record=record))
    return taken


def next_run_at(connection: sqlite3.Connection, queues: Sequence[str]) -> tuple[float | None, int]:
    """The earliest ``run_at`` of a pending task in ``queues`` (``None`` if none) and the data version."""
    earliest: float | None = None
    for queue in dict.fromkeys(queues):
        (value,) = connection.execute(
            "SELECT min(run_at) FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
            "WHERE state = 'pending' AND queue = ?",
            (queue,),
        ).fetchone()
        # min() of a queue whose every pending run_at is damaged (text) is that text: nothing is due
        if (type(value) is float or type(value) is int) and (earliest is None or value < earliest):
            earliest = float(value)
    (data_version,) = connection.execute("PRAGMA data_version").fetchone()
    return earliest, int(data_version)


def get(connection: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    """The record with ``task_id`` or ``None``."""
    row = connection.execute(
        f"SELECT {TASK_COLUMNS} FROM lifecycle_tasks WHERE id = ?", (task_id,)
    ).fetchone()
    return None if row is None else record_from_row(row)


def _filters(
    states: Collection[TaskState] | None, queue: str | None, *, unknown_as_dead: bool = False
) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if states is not None:
        values = sorted({TaskState(state).value for state in states})
        clause = f"state IN ({_marks(len(values))})"
        if unknown_as_dead and TaskState.DEAD.value in values:  # as the record reader shows them
            clause = f"({clause} OR state NOT IN ({', '.join(repr(v) for v in _KNOWN_STATES)}))"
        clauses.append(clause)
        params.extend(values)
    if queue is not None:
        clauses.append("queue = ?")
        params.append(queue)
    return clauses, params


def _where(clauses: list[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def list_records(
    connection: sqlite3.Connection,
    states: Collection[TaskState] | None,
    queue: str | None,
    limit: int,
    offset: int,
) -> list[TaskRecord]:
    """Records matching the filters, newest ``enqueued_at`` first; a record in no known state is listed as
    dead, as it is read (until recovery makes it dead for good)."""
    clauses, params = _filters(states, queue, unknown_as_dead=True)
    query = (
        f"SELECT {TASK_COLUMNS} FROM lifecycle_tasks{_where(clauses)} "
        "ORDER BY enqueued_at DESC, seq DESC LIMIT ? OFFSET ?"
    )
    rows = connection.execute(query, [*params, max(limit, 0), max(offset, 0)]).fetchall()
    return [record_from_row(row) for row in rows]


def stats(connection: sqlite3.Connection) -> dict[str, dict[TaskState, int]]:
    """Counts per queue and state."""
    counts: dict[str, dict[TaskState, int]] = {}
    query = "SELECT queue, state, count(*) FROM lifecycle_tasks GROUP BY queue, state"
    for queue, state, count in connection.execute(query):
        per_queue = counts.setdefault(_records.stored_text(queue), {})
        known = _records.stored_state(state)
        per_queue[known] = per_queue.get(known, 0) + count
    return counts


def cancel(connection: sqlite3.Connection, task_ids: Sequence[str], now: float) -> list[str]:
    """Cancel the pending tasks among ``task_ids``; return those cancelled, in the order given."""
    cancelled: set[str] = set()
    unique = list(dict.fromkeys(task_ids))
    for chunk in _chunks(unique):
        query = (
            "UPDATE lifecycle_tasks SET state = 'cancelled', finished_at = ?, lease_until = NULL, "
            f"token = NULL WHERE state = 'pending' AND id IN ({_marks(len(chunk))}) RETURNING id"
        )
        cancelled.update(row[0] for row in connection.execute(query, [now, *chunk]))
    return [task_id for task_id in unique if task_id in cancelled]


_REQUEUE_SET = (
    "UPDATE lifecycle_tasks SET state = 'pending', attempts = 0, run_at = ?, finished_at = NULL, "
    "lease_until = NULL, token = NULL"
)


def requeue(
    connection: sqlite3.Connection, task_ids: Sequence[str] | None, queue: str | None, now: float
) -> int:
    """Move dead (or, by id, cancelled) tasks back to pending with no attempts; return how many moved."""
    queue_clause, queue_params = (" AND queue = ?", [queue]) if queue is not None else ("", [])
    if task_ids is None:
        query = f"{_REQUEUE_SET} WHERE state = 'dead'{queue_clause}"
        return connection.execute(query, [now, *queue_params]).rowcount
    moved = 0
    for chunk in _chunks(list(dict.fromkeys(task_ids))):
        query = (
            f"{_REQUEUE_SET} WHERE state IN ('dead', 'cancelled') AND id IN ({_marks(len(chunk))})"
            f"{queue_clause}"
        )
        moved += connection.execute(query, [now, *chunk, *queue_params]).rowcount
    return moved


def purge(
    connection: sqlite3.Connection,
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
        clauses.append("coalesce(finished_at, enqueued_at) < ?")
        params.append(before)
    if limit is None:
        return connection.execute(f"DELETE FROM lifecycle_tasks{_where(clauses)}", params).rowcount
    query = (
        f"DELETE FROM lifecycle_tasks WHERE seq IN (SELECT seq FROM lifecycle_tasks{_where(clauses)} LIMIT ?)"
    )
    return connection.execute(query, [*params, limit]).rowcount
