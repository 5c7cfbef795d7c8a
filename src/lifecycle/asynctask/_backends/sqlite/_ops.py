"""The SQL behind each :class:`~lifecycle.asynctask.SQLiteBackend` method.

Every function here is synchronous, takes the backend's connection and runs on its connection thread.
Write operations are called inside a ``BEGIN IMMEDIATE`` transaction opened by the backend, so each call is
atomic and serialised against every other process writing the same file; :func:`insert_fresh` is one
statement, which SQLite makes a transaction of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

from ... import _records
from ..._errors import DuplicateTaskError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)
from ._schema import LISTED_BY_SEQ, NEWEST_SO_FAR, NOT_LISTED_BY_SEQ, SETTLED, TASK_COLUMNS

__all__ = [
    "cancel",
    "cancel_requests",
    "checkpoint_wal",
    "claim",
    "enqueue_group",
    "enqueue_many",
    "extend_leases",
    "flow_state",
    "get",
    "get_group",
    "insert_fresh",
    "list_records",
    "next_run_at",
    "pause",
    "paused",
    "purge",
    "read_text",
    "reading_any_text",
    "reclaim_expired",
    "requeue",
    "resume",
    "save_progress",
    "settle",
    "settle_and_claim",
    "stats",
]

# Stay well below SQLite's limit on bound variables per statement.
_CHUNK = 500

_PENDING = TaskState.PENDING.value
_ACTIVE = TaskState.ACTIVE.value

# The last parameter is enqueued_at again (see NEWEST_SO_FAR and _new_task_row): numbered parameters (?7)
# given a sequence are deprecated by some Python versions' sqlite3 (a DeprecationWarning on 3.12.1).
_INSERT = (
    "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, timeout, "
    "enqueued_at, run_at, meta, priority, concurrency_key, expires_at, group_id, newest_enqueued) "
    "VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    f"{NEWEST_SO_FAR.format('?')})"
)
_INSERT_OR_SKIP = _INSERT + " ON CONFLICT (id) DO NOTHING"

# The insert of one task (see _one_task_insert): sqlite3 binds a parameter at once only when it is exactly an
# int, float, str or bytearray; any other (None, bytes) first goes through its adapter look-up, which raises
# and clears an AttributeError (about 3 000 instructions each: 20 700 of the 154 000 of a single
# AsyncTasks.enqueue, callgrind). So the payload is bound as a bytearray, and each optional field that is
# None is written as NULL into the statement (one statement per combination, 32 at most, within the
# connections' statement caches of 128) instead of being bound.
_OPTIONAL = ("timeout", "meta", "concurrency_key", "expires_at", "group_id")


def _insert_one(nulls: tuple[bool, ...]) -> str:
    optional = ", ".join("NULL" if null else "?" for null in nulls)
    return (
        "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, enqueued_at, "
        f"run_at, priority, newest_enqueued, {', '.join(_OPTIONAL)}) "
        f"VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, {NEWEST_SO_FAR.format('?')}, {optional}) "
        "ON CONFLICT (id) DO NOTHING"
    )


_INSERT_ONE: dict[tuple[bool, ...], str] = {
    nulls: _insert_one(nulls) for nulls in itertools.product((False, True), repeat=len(_OPTIONAL))
}
_INSERT_BARE = _INSERT_ONE[(True,) * len(_OPTIONAL)]

# Claims, recovery and wait_for_work name their partial index: without ANALYZE statistics the planner may
# otherwise prefer the (state, ...) index and sort.
# A fresh random lease token per claimed row, made by SQLite inside the same UPDATE.
_NEW_TOKEN = "lower(hex(randomblob(12)))"

# A damaged attempts value (not a whole number >= 0) is left as it is, for the record reader to report,
# instead of being turned into a number by SQLite's arithmetic.
_COUNTED = "typeof(attempts) = 'integer' AND attempts >= 0"

# The due tasks of one queue in claim order (highest priority, earliest run_at, enqueue order): the pending
# index holds exactly that order, so this reads it without sorting.
_DUE = (
    "FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending WHERE state = 'pending' AND queue = ? "
    "AND run_at <= ?"
)
_IN_CLAIM_ORDER = " ORDER BY priority DESC, run_at, seq"
_READY = f"SELECT seq {_DUE}{_IN_CLAIM_ORDER} LIMIT ?"


def _claim_statement(count: int) -> str:
    return (
        f"UPDATE lifecycle_tasks SET state = 'active', "
        f"attempts = CASE WHEN {_COUNTED} THEN attempts + 1 ELSE attempts END, started_at = ?, "
        f"lease_until = ?, token = {_NEW_TOKEN} WHERE seq IN ({_marks(count)}) AND state = 'pending' "
        f"RETURNING token, seq, {TASK_COLUMNS}"
    )


_CLAIM_READY = (
    f"UPDATE lifecycle_tasks SET state = 'active', "
    f"attempts = CASE WHEN {_COUNTED} THEN attempts + 1 ELSE attempts END, started_at = ?, "
    f"lease_until = ?, token = {_NEW_TOKEN} WHERE seq IN (SELECT seq {_DUE}{_IN_CLAIM_ORDER} LIMIT ?) "
    f"RETURNING token, seq, {TASK_COLUMNS}"
)
_RUN_AT = 2 + 9  # the positions of run_at and priority in a claimed row (token, seq, TASK_COLUMNS)
_PRIORITY = 2 + 16


def _claim_order(row: Sequence[Any]) -> tuple[Any, ...]:
    """The claim order of a returned row, as the pending index holds it: highest priority first (SQLite
    sorts blobs above text above numbers, so a damaged priority comes first), then run_at, then seq."""
    priority = row[_PRIORITY]
    if type(priority) is int or type(priority) is float:
        return (1, -priority, row[_RUN_AT], row[1])
    return (0 if isinstance(priority, bytes) else 0.5, 0, row[_RUN_AT], row[1])


_EXPIRED = "expired before it started"
_EXPIRE = (
    "UPDATE lifecycle_tasks SET state = 'cancelled', finished_at = ?, last_error = ?, lease_until = NULL, "
    "token = NULL WHERE seq IN (SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_expiring "
    "WHERE state = 'pending' AND expires_at IS NOT NULL AND queue = ? AND expires_at <= ?) AND run_at <= ? "
    f"RETURNING seq, {TASK_COLUMNS}"
)
# The position of group_id in an expired row (seq, TASK_COLUMNS).
_GROUP_ID = 1 + _records.RECORD_FIELDS.index("group_id")


def _expire(connection: sqlite3.Connection, queue: str, now: float) -> None:
    """Cancel the due tasks of ``queue`` whose expiry passed (ending their groups); one whose record cannot be
    read whole ends dead instead, naming the damage, as every damaged record does."""
    for row in connection.execute(_EXPIRE, (now, _EXPIRED, queue, now, now)).fetchall():
        record = record_from_row(row[1:])
        if record.fault is not None:
            error = (
                f"the stored record is damaged ({record.fault}), so it cannot run; enqueue a corrected task"
            )
            connection.execute(
                "UPDATE lifecycle_tasks SET state = 'dead', last_error = ? WHERE seq = ?", (error, row[0])
            )
            continue
        _member_ended(connection, row[_GROUP_ID], record.id, TaskState.CANCELLED, now, None)


# The priorities in use among the pending tasks of one queue, one index probe each (a loose index scan).
_PRIORITIES = (
    "WITH RECURSIVE levels(value) AS ("
    "SELECT (SELECT priority FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue = :queue ORDER BY priority DESC LIMIT 1) "
    "UNION ALL SELECT (SELECT priority FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue = :queue AND priority < levels.value ORDER BY priority DESC LIMIT 1) "
    "FROM levels WHERE levels.value IS NOT NULL) "
)
# The earliest run_at of a queue's pending tasks: the first of each priority's range.
_EARLIEST = (
    _PRIORITIES + "SELECT min((SELECT run_at FROM lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "WHERE state = 'pending' AND queue = :queue AND priority = levels.value ORDER BY run_at LIMIT 1)) "
    "FROM levels WHERE levels.value IS NOT NULL"
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
# While groups are stored, a final settlement also returns the task's group, for the fan-in.
_SETTLE_SUCCEEDED_MEMBER = _SETTLE_SUCCEEDED + " RETURNING group_id"
_SETTLE_FINAL_MEMBER = _SETTLE_FINAL + " RETURNING group_id"
_EXTEND = f"UPDATE lifecycle_tasks SET lease_until = ? {_HELD}"

_KNOWN_STATES = sorted(state.value for state in TaskState)

# Records no claim or reclaim can select because a field they are selected by cannot be read. SQLite sorts
# numbers before text and text before blobs, so ">= 9e999" (infinity) is one index range holding +inf, text
# and blobs (a NaN is stored as NULL). Active tasks whose lease_until is not a finite number, and tasks in no
# known state (the ranges between the known state names, on the finished index, which holds them: each range
# names SETTLED, so that the planner searches that partial index for it instead of scanning it whole):
_UNSELECTABLE = (
    "SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active "
    "WHERE state = 'active' AND lease_until IS NULL "
    "UNION ALL SELECT seq FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active "
    "WHERE state = 'active' AND lease_until >= 9e999 "
    "UNION ALL SELECT seq FROM lifecycle_tasks WHERE "
    + " OR ".join(
        [f"(state < '{_KNOWN_STATES[0]}' AND {SETTLED})"]
        + [f"(state > '{a}' AND state < '{b}' AND {SETTLED})" for a, b in itertools.pairwise(_KNOWN_STATES)]
        + [f"(state > '{_KNOWN_STATES[-1]}' AND {SETTLED})"]
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
# ...then, in a queue a worker can name, the pending tasks whose run_at is not a finite number (a range at
# the end of each priority's); in a queue whose name is not UTF-8 text (no worker can name it), every pending
# task.
_UNSCHEDULED = (
    _PRIORITIES + "SELECT seq FROM levels JOIN lifecycle_tasks INDEXED BY lifecycle_tasks_pending "
    "ON state = 'pending' AND queue = :queue AND priority = levels.value AND run_at >= 9e999 "
    "WHERE levels.value IS NOT NULL LIMIT :limit"
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
        task.priority,
        task.concurrency_key,
        task.expires_at,
        task.group_id,
        task.enqueued_at,
    )


def _one_task_insert(task: NewTask) -> tuple[str, tuple[Any, ...]]:
    """The statement and parameters of :func:`insert_fresh` (see ``_INSERT_ONE``)."""
    payload: bytes | bytearray = task.payload
    if type(payload) is bytes:
        payload = bytearray(payload)
    enqueued_at = task.enqueued_at
    timeout, meta, key, expires_at, group_id = (
        task.timeout,
        task.meta,
        task.concurrency_key,
        task.expires_at,
        task.group_id,
    )
    row = (
        task.id,
        task.name,
        task.queue,
        payload,
        task.max_retries,
        enqueued_at,
        task.run_at,
        task.priority,
        enqueued_at,
    )
    if timeout is None and meta is None and key is None and expires_at is None and group_id is None:
        return _INSERT_BARE, row
    optional = (timeout, meta, key, expires_at, group_id)
    nulls = tuple(value is None for value in optional)
    return _INSERT_ONE[nulls], (*row, *(value for value in optional if value is not None))


def checkpoint_wal(connection: sqlite3.Connection) -> None:
    """Copy the WAL's frames into the database file as far as no reader needs them (``PASSIVE``: waits for
    no lock, as SQLite's automatic checkpoint), so that the next writer can start the WAL over. Another
    connection checkpointing at the same time is no error: the WAL is being checkpointed."""
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 5) & 0xFF not in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
            raise


def insert_fresh(connection: sqlite3.Connection | sqlite3.Cursor, task: NewTask) -> list[str] | None:
    """Insert ``task`` (no uniqueness window) with one statement, which needs no transaction of its own;
    ``[task.id]``, or ``None`` without writing anything when the id is taken (then :func:`enqueue_many`
    decides, in a transaction). ``connection`` may be a cursor of the connection (kept, so that no cursor is
    made per call)."""
    if connection.execute(*_one_task_insert(task)).rowcount == 1:
        return [task.id]
    return None


def enqueue_many(
    connection: sqlite3.Connection, tasks: Sequence[NewTask], if_exists: Literal["error", "skip", "debounce"]
) -> list[str]:
    """Insert ``tasks``; see :meth:`Backend.enqueue_many` for the duplicate, window and debounce rules."""
    if not tasks:
        return []
    if if_exists == "debounce" or any(task.unique_key is not None for task in tasks):
        return _enqueue_with_rules(connection, tasks, if_exists)
    # Fast path: fresh ids (the common case) need one executemany and no look-up. One task needs no
    # savepoint: when its insert is skipped, nothing was written.
    if len(tasks) == 1:
        if connection.execute(*_one_task_insert(tasks[0])).rowcount == 1:
            return [tasks[0].id]
        return _enqueue_existing(connection, tasks, if_exists)
    connection.execute("SAVEPOINT lifecycle_enqueue")
    inserted = connection.executemany(_INSERT_OR_SKIP, map(_new_task_row, tasks)).rowcount
    if inserted == len(tasks):
        connection.execute("RELEASE lifecycle_enqueue")
        return [task.id for task in tasks]
    connection.execute("ROLLBACK TO lifecycle_enqueue")
    connection.execute("RELEASE lifecycle_enqueue")
    return _enqueue_existing(connection, tasks, if_exists)


def _enqueue_existing(
    connection: sqlite3.Connection, tasks: Sequence[NewTask], if_exists: Literal["error", "skip", "debounce"]
) -> list[str]:
    """Insert ``tasks`` of which some ids are taken (by stored tasks or within the batch)."""
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


def _states(connection: sqlite3.Connection, ids: Collection[str]) -> dict[str, str]:
    existing: dict[str, str] = {}
    for chunk in _chunks(list(ids)):
        query = f"SELECT id, state FROM lifecycle_tasks WHERE id IN ({_marks(len(chunk))})"
        existing.update(connection.execute(query, chunk).fetchall())
    return existing


def _enqueue_with_rules(
    connection: sqlite3.Connection, tasks: Sequence[NewTask], if_exists: Literal["error", "skip", "debounce"]
) -> list[str]:
    """The enqueue of a batch with uniqueness windows or debounced tasks (row by row, in batch order)."""
    existing = _states(connection, {task.id for task in tasks})
    windows: dict[str, float] = {}
    for chunk in _chunks(list({task.unique_key for task in tasks if task.unique_key is not None})):
        query = f"SELECT key, until FROM lifecycle_unique WHERE key IN ({_marks(len(chunk))})"
        windows.update(connection.execute(query, chunk).fetchall())
    opened: dict[str, float] = {}

    def refused(task: NewTask) -> bool:
        if task.unique_key is None:
            return False
        until = opened.get(task.unique_key, windows.get(task.unique_key))
        return until is not None and until > task.enqueued_at

    seen: set[str] = set()
    conflicts: list[str] = []
    accepted: list[NewTask] = []
    for task in tasks:
        state = existing.get(task.id)
        if if_exists == "skip":
            if task.id in seen or state is not None or refused(task):
                continue
        else:
            duplicate = if_exists == "error" and (task.id in seen or state in (_PENDING, _ACTIVE))
            if (duplicate or refused(task)) and task.id not in conflicts:
                conflicts.append(task.id)
        seen.add(task.id)
        if task.unique_key is not None and task.unique_until is not None:
            opened[task.unique_key] = task.unique_until
        accepted.append(task)
    if conflicts:
        raise DuplicateTaskError(conflicts[0], conflicts)
    if opened:
        connection.executemany(
            "INSERT INTO lifecycle_unique (key, until) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET until = excluded.until",
            opened.items(),
        )
        # Windows outlive their tasks: drop a few that ended with every write that opens some.
        connection.execute(
            "DELETE FROM lifecycle_unique WHERE key IN (SELECT key FROM lifecycle_unique "
            "INDEXED BY lifecycle_unique_until WHERE until <= ? LIMIT 100)",
            (min(task.enqueued_at for task in tasks),),
        )
    for task in accepted:
        state = existing.get(task.id)
        if if_exists == "debounce" and state == _PENDING:
            fields = _follow_up_fields(task)
            connection.execute(_DEBOUNCE_PENDING, (*fields[:5], *fields[6:], task.id))  # not enqueued_at
        elif if_exists == "debounce" and state == _ACTIVE:
            connection.execute(_KEEP_FOLLOW_UP, (task.id, *_follow_up_fields(task)))
        else:
            if state is not None:  # final (a live one was refused above): replaced
                connection.execute("DELETE FROM lifecycle_tasks WHERE id = ?", (task.id,))
            connection.execute(_INSERT, _new_task_row(task))
            existing[task.id] = _PENDING
    return [task.id for task in accepted]


_FOLLOW_UP_COLUMNS = (
    "name, queue, payload, max_retries, timeout, enqueued_at, run_at, meta, priority, concurrency_key, "
    "expires_at"
)


def _follow_up_fields(task: NewTask) -> tuple[Any, ...]:
    return (
        task.name,
        task.queue,
        task.payload,
        task.max_retries,
        task.timeout,
        task.enqueued_at,
        task.run_at,
        task.meta,
        task.priority,
        task.concurrency_key,
        task.expires_at,
    )


# A debounce of a pending task: the new fields, attempts and enqueued_at kept.
_DEBOUNCE_PENDING = (
    "UPDATE lifecycle_tasks SET name = ?, queue = ?, payload = ?, max_retries = ?, timeout = ?, "
    "run_at = ?, meta = ?, priority = ?, concurrency_key = ?, expires_at = ? "
    "WHERE id = ? AND state = 'pending'"
)
_KEEP_FOLLOW_UP = (
    f"INSERT OR REPLACE INTO lifecycle_follow_ups (id, {_FOLLOW_UP_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_TAKE_FOLLOW_UP = f"DELETE FROM lifecycle_follow_ups WHERE id = ? RETURNING {_FOLLOW_UP_COLUMNS}"
# The settlement of an active task with a follow-up: the record's next pending period is the follow-up's.
_START_FOLLOW_UP = (
    "UPDATE lifecycle_tasks SET name = ?, queue = ?, payload = ?, max_retries = ?, timeout = ?, "
    "enqueued_at = ?, run_at = ?, meta = ?, priority = ?, concurrency_key = ?, "
    "expires_at = ?, state = 'pending', attempts = 0, started_at = NULL, finished_at = NULL, result = NULL, "
    "lease_until = NULL, token = NULL, cancel_requested = 0 WHERE id = ?"
)


class _Flow:
    """The flow limits of one claim: running counts and rate buckets, read once, checked and updated in
    memory while the claim picks its tasks, and the buckets written back at its end (all inside the claim's
    write transaction, so no other process sees or changes them meanwhile)."""

    def __init__(self, connection: sqlite3.Connection, limits: Mapping[str, FlowLimits], now: float) -> None:
        self.limits = dict(limits)
        self.now = now
        self.running: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.running_keys: dict[tuple[str, str], int] = {}
        names = list(self.limits)
        for chunk in _chunks(names):
            query = (
                "SELECT name, concurrency_key, count(*) FROM lifecycle_tasks "
                "INDEXED BY lifecycle_tasks_active WHERE state = 'active' "
                f"AND name IN ({_marks(len(chunk))}) GROUP BY name, concurrency_key"
            )
            for name, key, count in connection.execute(query, chunk):
                self.running[name] = self.running.get(name, 0) + count
                if key is not None:
                    self.running_keys[(name, key)] = count
        self.buckets: dict[str, tuple[float, float, int]] = {}  # name -> (tokens, as of, refused)
        rated = [name for name, each in self.limits.items() if each.rate is not None]
        stored: dict[str, tuple[float, float, int]] = {}
        for chunk in _chunks(rated):
            query = (
                "SELECT name, tokens, updated_at, refused FROM lifecycle_rate_buckets "
                f"WHERE name IN ({_marks(len(chunk))})"
            )
            stored.update(
                (name, (tokens, at, refused))
                for name, tokens, at, refused in connection.execute(query, chunk)
            )
        for name in rated:
            self.buckets[name] = refill(stored.get(name), self.limits[name], now)
        self.changed: set[str] = set()
        self.refused: set[str] = set()

    def blocked(self, name: str) -> bool:
        """Whether no task of ``name`` can start in this claim, whatever its key."""
        limits = self.limits[name]
        if limits.max_running is not None and self.running[name] >= limits.max_running:
            return True
        return name in self.buckets and self.buckets[name][0] < 1.0

    def admit(self, name: str, key: str | None) -> bool:
        """Whether a task of ``name`` with ``key`` may start; if so, count it and take its token."""
        limits = self.limits.get(name)
        if limits is None:
            return True
        if limits.max_running is not None and self.running[name] >= limits.max_running:
            return False
        if (
            limits.max_running_per_key is not None
            and key is not None
            and self.running_keys.get((name, key), 0) >= limits.max_running_per_key
        ):
            return False
        bucket = self.buckets.get(name)
        if bucket is not None:
            tokens, at, refused = bucket
            if tokens < 1.0:
                self.refused.add(name)
                return False
            self.buckets[name] = (tokens - 1.0, at, refused)
            self.changed.add(name)
        self.running[name] += 1
        if key is not None:
            self.running_keys[(name, key)] = self.running_keys.get((name, key), 0) + 1
        return True

    def pick(self, connection: sqlite3.Connection, queue: str, wanted: int) -> list[int]:
        """The seqs of up to ``wanted`` due tasks of ``queue`` the limits let start, in claim order."""
        blocked = [name for name in self.limits if self.blocked(name)]
        query = f"SELECT seq, name, concurrency_key {_DUE}"
        if blocked:  # their tasks are all held: let SQLite skip them
            query += f" AND name NOT IN ({_marks(len(blocked))})"
        cursor = connection.execute(query + _IN_CLAIM_ORDER, (queue, self.now, *blocked))
        seqs: list[int] = []
        try:
            while len(seqs) < wanted:
                rows = cursor.fetchmany(256)
                if not rows:
                    break
                for seq, name, key in rows:
                    if self.admit(name, key):
                        seqs.append(seq)
                        if len(seqs) >= wanted:
                            break
        finally:
            cursor.close()
        if len(seqs) < wanted:  # a name skipped for want of a token refused the starts of its due tasks
            for name in blocked:
                limits = self.limits[name]
                if name in self.refused or (
                    limits.max_running is not None and self.running[name] >= limits.max_running
                ):
                    continue
                probe = f"SELECT 1 {_DUE} AND name = ? LIMIT 1"
                if connection.execute(probe, (queue, self.now, name)).fetchone() is not None:
                    self.refused.add(name)
        return seqs

    def save(self, connection: sqlite3.Connection) -> None:
        """Write back the buckets this claim took tokens from or found empty."""
        rows = []
        for name in self.changed | self.refused:
            tokens, at, refused = self.buckets[name]
            rows.append((name, tokens, at, refused + (1 if name in self.refused else 0)))
        if rows:
            connection.executemany(
                "INSERT INTO lifecycle_rate_buckets (name, tokens, updated_at, refused) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, "
                "updated_at = excluded.updated_at, refused = excluded.refused",
                rows,
            )


def refill(
    stored: tuple[float, float, int] | None, limits: FlowLimits, now: float
) -> tuple[float, float, int]:
    """A rate bucket ``(tokens, as of, refused)`` refilled to ``now``; a bucket never used is full."""
    rate = float(limits.rate or 0)
    if stored is None:
        return rate, now, 0
    tokens, at, refused = stored
    if now > at and limits.per:
        tokens += (now - at) * rate / limits.per
        at = now
    return min(rate, tokens), at, refused


def claim(
    connection: sqlite3.Connection,
    queues: Sequence[str],
    limit: int,
    now: float,
    lease_until: float,
    limits: Mapping[str, FlowLimits] | None,
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due pending tasks, ``queues`` in priority order, skipping paused queues,
    cancelling expired tasks and holding back the tasks ``limits`` do not let start."""
    paused = {queue for (queue,) in connection.execute("SELECT queue FROM lifecycle_paused")}
    flow = _Flow(connection, limits, now) if limits else None
    claimed: list[ClaimedTask] = []
    for queue in dict.fromkeys(queues):
        wanted = limit - len(claimed)
        if wanted <= 0:
            break
        if queue in paused:
            continue
        _expire(connection, queue, now)
        if flow is None:  # one statement, the same every time (no statement to prepare per batch size)
            rows = connection.execute(_CLAIM_READY, (now, lease_until, queue, now, wanted)).fetchall()
            rows.sort(key=_claim_order)  # RETURNING gives no order: put them back in claim order
        else:
            seqs = flow.pick(connection, queue, wanted)
            if not seqs:
                continue
            # The IN list padded to a power of two (repeating a seq): a few statements, each prepared once.
            size = 1 << (len(seqs) - 1).bit_length()
            padded = [*seqs, *[seqs[-1]] * (size - len(seqs))]
            rows = connection.execute(_claim_statement(size), (now, lease_until, *padded)).fetchall()
            order = {seq: index for index, seq in enumerate(seqs)}
            rows.sort(key=lambda row: order[row[1]])
        read, new = _records.record_from_row, _records.new_claimed_task  # once per claimed task: no wrappers
        claimed.extend([new(row[0], read(row[2:])) for row in rows])
    if flow is not None:
        flow.save(connection)
    return claimed


def settle_and_claim(
    connection: sqlite3.Connection,
    settlements: Sequence[Settlement],
    queues: Sequence[str],
    limit: int,
    now: float,
    lease_until: float,
    limits: Mapping[str, FlowLimits] | None,
) -> tuple[set[str], list[ClaimedTask]]:
    """:func:`settle`, then :func:`claim` (which sees what the settlements freed), in the caller's
    transaction."""
    lost = settle(connection, settlements)
    return lost, claim(connection, queues, limit, now, lease_until, limits)


def flow_state(
    connection: sqlite3.Connection, name: str, key: str | None, now: float, limits: FlowLimits
) -> FlowState:
    """The running counts of ``name`` (and of ``key``) and its rate bucket refilled to ``now``."""
    running_query = (
        "SELECT count(*) FROM lifecycle_tasks INDEXED BY lifecycle_tasks_active WHERE state = 'active' "
        "AND name = ?"
    )
    (running,) = connection.execute(running_query, (name,)).fetchone()
    for_key = 0
    if key is not None:
        (for_key,) = connection.execute(running_query + " AND concurrency_key = ?", (name, key)).fetchone()
    tokens: float | None = None
    refused = 0
    if limits.rate is not None:
        row = connection.execute(
            "SELECT tokens, updated_at, refused FROM lifecycle_rate_buckets WHERE name = ?", (name,)
        ).fetchone()
        tokens, _, refused = refill(None if row is None else tuple(row), limits, now)
    return FlowState(running=int(running), running_for_key=int(for_key), tokens=tokens, refused=int(refused))


def pause(connection: sqlite3.Connection, queue: str) -> None:
    """Store ``queue`` as paused."""
    connection.execute(
        "INSERT INTO lifecycle_paused (queue) VALUES (?) ON CONFLICT (queue) DO NOTHING", (queue,)
    )


def resume(connection: sqlite3.Connection, queue: str) -> None:
    """Forget the pause of ``queue``."""
    connection.execute("DELETE FROM lifecycle_paused WHERE queue = ?", (queue,))


def paused(connection: sqlite3.Connection) -> set[str]:
    """The paused queues."""
    return {queue for (queue,) in connection.execute("SELECT queue FROM lifecycle_paused")}


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
    """Apply each settlement whose lease is still held (with its ``then`` tasks, and the debounce follow-up
    kept for the task); return the lost ids."""
    lost: set[str] = set()
    (follow_ups,) = connection.execute("SELECT EXISTS (SELECT 1 FROM lifecycle_follow_ups)").fetchone()
    (groups,) = connection.execute("SELECT EXISTS (SELECT 1 FROM lifecycle_groups)").fetchone()
    for s in settlements:
        group_id: object = None
        if s.state is TaskState.PENDING:
            run_at = s.at if s.run_at is None else s.run_at
            refund = 1 if s.refund_attempt else 0
            params: tuple[Any, ...] = (run_at, refund, s.error, s.task_id, s.token)
            applied = connection.execute(_SETTLE_PENDING, params).rowcount > 0
        elif s.state in (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED):
            if s.state is TaskState.SUCCEEDED:
                params = (s.at, s.result, s.error, s.task_id, s.token)
                statement = _SETTLE_SUCCEEDED_MEMBER if groups else _SETTLE_SUCCEEDED
            else:
                params = (s.state.value, s.at, s.result, s.error, s.task_id, s.token)
                statement = _SETTLE_FINAL_MEMBER if groups else _SETTLE_FINAL
            cursor = connection.execute(statement, params)
            if groups:
                row = cursor.fetchone()
                applied = row is not None
                group_id = None if row is None else row[0]
            else:
                applied = cursor.rowcount > 0
        else:
            raise ValueError(
                f"cannot settle task {s.task_id!r} as {s.state.value!r}: a settlement's state must be "
                "pending, succeeded, dead or cancelled"
            )
        if not applied:
            lost.add(s.task_id)
            continue
        if group_id is not None:
            _member_ended(connection, group_id, s.task_id, s.state, s.at, s.result)
        if follow_ups:
            follow_up = connection.execute(_TAKE_FOLLOW_UP, (s.task_id,)).fetchone()
            if follow_up is not None:
                fields = list(follow_up)
                if s.state is TaskState.PENDING:  # a retry: the follow-up starts no earlier than it
                    retry_at = s.at if s.run_at is None else s.run_at
                    fields[6] = max(fields[6], retry_at)
                connection.execute(_START_FOLLOW_UP, (*fields, s.task_id))
        if s.then:
            connection.executemany(_INSERT_OR_SKIP, map(_new_task_row, s.then))
        for group in s.then_groups:
            groups = _store_group(connection, group, skip_existing=True) or groups
    return lost


# -- groups -------------------------------------------------------------------------------------------------

_THEN_COLUMNS = (
    "then_name, then_queue, then_payload, then_max_retries, then_timeout, then_enqueued_at, then_run_at, "
    "then_meta, then_priority, then_concurrency_key, then_expires_at"
)
_INSERT_GROUP = (
    f"INSERT INTO lifecycle_groups (id, created_at, unfinished, meta, then_id, {_THEN_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The fan-in: the group's then stored as a pending task, unless a task with its id exists.
_STORE_THEN = (
    "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, attempts, max_retries, timeout, "
    "enqueued_at, run_at, meta, priority, concurrency_key, expires_at, newest_enqueued) "
    "SELECT then_id, then_name, then_queue, then_payload, 'pending', 0, then_max_retries, then_timeout, "
    "then_enqueued_at, then_run_at, then_meta, then_priority, then_concurrency_key, then_expires_at, "
    f"{NEWEST_SO_FAR.format('then_enqueued_at')} "
    "FROM lifecycle_groups WHERE id = ? AND then_id IS NOT NULL ON CONFLICT (id) DO NOTHING"
)


def _store_group(connection: sqlite3.Connection, group: NewGroup, *, skip_existing: bool) -> bool:
    """Store ``group`` and its members (as ``enqueue_many`` with ``"error"``); an existing group id raises
    :class:`DuplicateTaskError`, or with ``skip_existing`` (a settlement's ``then_groups``) skips the group,
    as does a member refused then. Returns whether it was stored."""
    exists = connection.execute("SELECT 1 FROM lifecycle_groups WHERE id = ?", (group.id,)).fetchone()
    if exists is not None:
        if skip_existing:
            return False
        raise DuplicateTaskError(
            group.id, reason=f"a group with id {group.id!r} exists already; pick another group id"
        )
    connection.execute("SAVEPOINT lifecycle_group")
    try:
        enqueue_many(connection, list(group.members), "error")
    except DuplicateTaskError:
        connection.execute("ROLLBACK TO lifecycle_group")
        connection.execute("RELEASE lifecycle_group")
        if skip_existing:
            return False
        raise
    connection.execute("RELEASE lifecycle_group")
    then = group.then
    then_fields = (None,) * 11 if then is None else _follow_up_fields(then)
    connection.execute(
        _INSERT_GROUP,
        (
            group.id,
            group.created_at,
            len(group.members),
            group.meta,
            None if then is None else then.id,
            *then_fields,
        ),
    )
    connection.executemany(
        "INSERT INTO lifecycle_group_members (group_id, idx, task_id) VALUES (?, ?, ?)",
        ((group.id, index, member.id) for index, member in enumerate(group.members)),
    )
    return True


def _member_ended(
    connection: sqlite3.Connection,
    group_id: object,
    task_id: str,
    state: TaskState,
    at: float,
    result: bytes | None,
) -> None:
    """The group bookkeeping of a member that reached the final ``state`` (in the caller's transaction):
    its slot, the group's outcome, and the fan-in that stores ``then`` with the last success."""
    if not isinstance(group_id, str):  # not a member (or a damaged group_id: no group to update)
        return
    member = connection.execute(
        "SELECT idx, ended FROM lifecycle_group_members WHERE group_id = ? AND task_id = ?",
        (group_id, task_id),
    ).fetchone()
    if member is None:
        return
    index, ended = member
    if state is TaskState.SUCCEEDED:
        connection.execute(
            "UPDATE lifecycle_group_members SET ended = 'succeeded', result = ? "
            "WHERE group_id = ? AND idx = ?",
            (result, group_id, index),
        )
        if ended == TaskState.SUCCEEDED.value:
            return
        row = connection.execute(
            "UPDATE lifecycle_groups SET unfinished = unfinished - 1 WHERE id = ? "
            "RETURNING unfinished, outcome",
            (group_id,),
        ).fetchone()
        if row is not None and row[0] == 0 and row[1] is None:
            connection.execute(
                "UPDATE lifecycle_groups SET outcome = 'succeeded', finished_at = ?, "
                "then_stored = (then_id IS NOT NULL) WHERE id = ?",
                (at, group_id),
            )
            connection.execute(_STORE_THEN, (group_id,))
        return
    connection.execute(
        "UPDATE lifecycle_group_members SET ended = ? WHERE group_id = ? AND idx = ?",
        (state.value, group_id, index),
    )
    connection.execute(
        "UPDATE lifecycle_groups SET outcome = ?, finished_at = ? WHERE id = ? AND outcome IS NULL",
        (state.value, at, group_id),
    )


def enqueue_group(connection: sqlite3.Connection, group: NewGroup) -> str:
    """Store ``group`` and its members, or nothing (:class:`DuplicateTaskError`)."""
    _store_group(connection, group, skip_existing=False)
    return group.id


def get_group(connection: sqlite3.Connection, group_id: str) -> GroupRecord | None:
    """The group with ``group_id`` or ``None``; members are counted by their records' states (a member whose
    record is gone, by the state it last ended in).

    One statement, so one snapshot: the outcome and the members' states agree. Two (the group, then its
    members) could read the outcome before another connection's settlement of the last member and the
    members after it: a group shown active with every member succeeded."""
    rows = connection.execute(
        "SELECT g.outcome, g.created_at, g.finished_at, g.then_id, g.then_stored, g.meta, "
        "m.task_id, m.ended, m.result, t.state FROM lifecycle_groups AS g "
        "LEFT JOIN lifecycle_group_members AS m ON m.group_id = g.id "
        "LEFT JOIN lifecycle_tasks AS t ON t.id = m.task_id AND t.group_id = m.group_id "
        "WHERE g.id = ? ORDER BY m.idx",
        (group_id,),
    ).fetchall()
    if not rows:
        return None
    outcome, created_at, finished_at, then_id, then_stored, meta = rows[0][:6]
    members = [row[6:] for row in rows if row[6] is not None]  # a group without members: one row of NULLs
    counts: dict[TaskState, int] = {}
    for _, ended, _, state in members:
        current = state if state is not None else ended
        if current is not None:
            known = _records.stored_state(current)
            counts[known] = counts.get(known, 0) + 1
    return GroupRecord(
        id=group_id,
        task_ids=tuple(str(task_id) for task_id, _, _, _ in members),
        outcome=None if outcome is None else TaskState(outcome),
        results=tuple(None if result is None else bytes(result) for _, _, result, _ in members),
        counts=counts,
        created_at=float(created_at),
        finished_at=None if finished_at is None else float(finished_at),
        then_id=then_id if then_stored else None,
        meta=meta,
    )


# -- control of running tasks -------------------------------------------------------------------------------


def cancel_requests(connection: sqlite3.Connection, task_ids: Sequence[str]) -> set[str]:
    """The active tasks among ``task_ids`` whose cancellation was asked."""
    asked: set[str] = set()
    for chunk in _chunks(list(dict.fromkeys(task_ids))):
        query = (
            "SELECT id FROM lifecycle_tasks WHERE state = 'active' AND cancel_requested = 1 "
            f"AND id IN ({_marks(len(chunk))})"
        )
        asked.update(task_id for (task_id,) in connection.execute(query, chunk))
    return asked


_SAVE_PROGRESS = (
    f"UPDATE lifecycle_tasks SET progress_done = ?, progress_total = ?, progress_message = ? {_HELD}"
)


def save_progress(connection: sqlite3.Connection, updates: Sequence[ProgressUpdate]) -> set[str]:
    """Store each update whose lease is held; return the ids whose lease was lost."""
    lost: set[str] = set()
    for update in updates:
        params = (update.done, update.total, update.message, update.task_id, update.token)
        if connection.execute(_SAVE_PROGRESS, params).rowcount == 0:
            lost.add(update.task_id)
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
            query = _IN_QUEUE + "CAST(:queue AS TEXT) LIMIT :limit"
            value = queue.encode("utf-8", "surrogateescape")
        else:  # a blob
            query, value = _IN_QUEUE + ":queue LIMIT :limit", queue
        seqs += [seq for (seq,) in connection.execute(query, {"queue": value, "limit": limit - len(seqs)})]
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
    """The earliest ``run_at`` of a pending task in ``queues`` that are not paused (``None`` if none) and the
    data version."""
    earliest: float | None = None
    paused_queues = paused(connection)
    for queue in dict.fromkeys(queues):
        if queue in paused_queues:
            continue
        (value,) = connection.execute(_EARLIEST, {"queue": queue}).fetchone()
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


def _by_state(
    columns: str, states: Collection[TaskState], clauses: Sequence[str], params: Sequence[Any]
) -> tuple[str, list[Any]]:
    """``SELECT columns`` of the records in ``states`` that match ``clauses``, one ``UNION ALL`` arm per index
    that holds a state: pending and active tasks have their partial indexes, finished ones theirs (named by
    SETTLED), so each arm reads one index (named: the planner might rather walk another index and read
    every record to find a few) instead of the whole table being scanned for them."""
    values = {TaskState(state).value for state in states}
    arms: list[str] = []
    arm_params: list[Any] = []
    for state in (_PENDING, _ACTIVE):
        if state in values:
            values.discard(state)
            where = _where([f"state = '{state}'", *clauses])
            arms.append(f"SELECT {columns} FROM lifecycle_tasks INDEXED BY lifecycle_tasks_{state}{where}")
            arm_params.extend(params)
    if values:
        finished = sorted(values)
        where = _where([f"state IN ({_marks(len(finished))})", SETTLED, *clauses])
        arms.append(f"SELECT {columns} FROM lifecycle_tasks INDEXED BY lifecycle_tasks_finished{where}")
        arm_params.extend([*finished, *params])
    return " UNION ALL ".join(arms), arm_params


_MAX_INT = 2**63 - 1


def list_records(
    connection: sqlite3.Connection,
    states: Collection[TaskState] | None,
    queue: str | None,
    limit: int,
    offset: int,
) -> list[TaskRecord]:
    """Records matching the filters, newest ``enqueued_at`` first; a record in no known state is listed as
    dead, as it is read (until recovery makes it dead for good)."""
    # SQLite binds 64-bit integers: a larger page (a dashboard's ?offset=...) is the table's end.
    limit, offset = min(max(limit, 0), _MAX_INT), min(max(offset, 0), _MAX_INT)
    if states is not None and TaskState.DEAD not in states:
        # Each state from its own index, then sorted (the records in no known state are listed only as dead)
        clauses, params = _filters(None, queue)
        selected, params = _by_state(f"{TASK_COLUMNS}, seq", states, clauses, params)
        query = (
            f"SELECT {TASK_COLUMNS} FROM ({selected}) ORDER BY enqueued_at DESC, seq DESC LIMIT ? OFFSET ?"
        )
        params = [*params, limit, offset]
    else:
        # The rows stored in clock order, newest first by seq (the table itself, read backwards), merged
        # with the others, read from their index: the first limit + offset of each hold the page (_schema).
        # The merge sorts only the keys; the page's rows are read at the end.
        clauses, params = _filters(states, queue, unknown_as_dead=True)
        by_seq = _where([LISTED_BY_SEQ, *clauses])
        unordered = _where([NOT_LISTED_BY_SEQ, *clauses])
        query = (
            f"SELECT {TASK_COLUMNS} FROM lifecycle_tasks WHERE seq IN (SELECT seq FROM ("
            f"SELECT * FROM (SELECT enqueued_at, seq FROM lifecycle_tasks{by_seq} ORDER BY seq DESC LIMIT ?) "
            "UNION ALL SELECT * FROM (SELECT enqueued_at, seq FROM lifecycle_tasks INDEXED BY "
            f"lifecycle_tasks_unordered{unordered} ORDER BY enqueued_at DESC, seq DESC LIMIT ?)) "
            "ORDER BY enqueued_at DESC, seq DESC LIMIT ? OFFSET ?) ORDER BY enqueued_at DESC, seq DESC"
        )
        window = min(limit + offset, _MAX_INT)
        params = [*params, window, *params, window, limit, offset]
    rows = connection.execute(query, params).fetchall()
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
    """Cancel the pending tasks among ``task_ids`` (and end their groups) and ask the active ones to stop
    (dropping their debounce follow-ups); return both kinds, in the order given."""
    cancelled: set[str] = set()
    unique = list(dict.fromkeys(task_ids))
    for chunk in _chunks(unique):
        query = (
            "UPDATE lifecycle_tasks SET state = 'cancelled', finished_at = ?, lease_until = NULL, "
            f"token = NULL WHERE state = 'pending' AND id IN ({_marks(len(chunk))}) RETURNING id, group_id"
        )
        for task_id, group_id in connection.execute(query, [now, *chunk]).fetchall():
            cancelled.add(task_id)
            _member_ended(connection, group_id, task_id, TaskState.CANCELLED, now, None)
        query = (
            "UPDATE lifecycle_tasks SET cancel_requested = 1 "
            f"WHERE state = 'active' AND id IN ({_marks(len(chunk))}) RETURNING id"
        )
        asked = [task_id for (task_id,) in connection.execute(query, chunk).fetchall()]
        if asked:
            connection.execute(f"DELETE FROM lifecycle_follow_ups WHERE id IN ({_marks(len(asked))})", asked)
            cancelled.update(asked)
    return [task_id for task_id in unique if task_id in cancelled]


_REQUEUE_SET = (
    "UPDATE lifecycle_tasks SET state = 'pending', attempts = 0, run_at = ?, finished_at = NULL, "
    "lease_until = NULL, token = NULL, cancel_requested = 0"
)


def requeue(
    connection: sqlite3.Connection, task_ids: Sequence[str] | None, queue: str | None, now: float
) -> int:
    """Move dead (or, by id, cancelled) tasks back to pending with no attempts; return how many moved."""
    queue_clause, queue_params = (" AND queue = ?", [queue]) if queue is not None else ("", [])
    if task_ids is None:
        query = f"{_REQUEUE_SET} WHERE state = 'dead' AND {SETTLED}{queue_clause}"
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
    if queue is None:  # groups go by their outcome and finish time (not counted)
        outcomes = sorted({TaskState(state).value for state in states})
        where = f"outcome IN ({_marks(len(outcomes))})"
        group_params: list[Any] = list(outcomes)
        if before is not None:
            where += " AND finished_at < ?"
            group_params.append(before)
        done = "SELECT id FROM lifecycle_groups WHERE " + where
        connection.execute(f"DELETE FROM lifecycle_group_members WHERE group_id IN ({done})", group_params)
        connection.execute(f"DELETE FROM lifecycle_groups WHERE id IN ({done})", group_params)
    clauses, params = _filters(None, queue)
    if before is not None:
        clauses.append("coalesce(finished_at, enqueued_at) < ?")
        params.append(before)
    if {TaskState(state) for state in states} & {TaskState.PENDING, TaskState.ACTIVE}:
        selected, params = _by_state("seq", states, clauses, params)
        if limit is not None:
            selected += " LIMIT ?"
            params.append(limit)
        return connection.execute(f"DELETE FROM lifecycle_tasks WHERE seq IN ({selected})", params).rowcount
    # Finished states only: one statement on the finished index (SETTLED lets the planner use it).
    state_clauses, state_params = _filters(states, None)
    clauses = [*state_clauses, SETTLED, *clauses]
    params = [*state_params, *params]
    if limit is None:
        return connection.execute(f"DELETE FROM lifecycle_tasks{_where(clauses)}", params).rowcount
    query = (
        f"DELETE FROM lifecycle_tasks WHERE seq IN (SELECT seq FROM lifecycle_tasks{_where(clauses)} LIMIT ?)"
    )
    return connection.execute(query, [*params, limit]).rowcount
