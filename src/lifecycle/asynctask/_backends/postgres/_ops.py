"""What each :class:`~lifecycle.asynctask.postgres.PostgresBackend` method does on a connection.

Every function takes a psycopg ``AsyncConnection`` and the backend's :class:`Statements`. Single-statement
operations run in autocommit mode (one statement is one transaction). :func:`enqueue` runs a plain enqueue
of one task (or a batch of ``skip``) as one statement when no transaction is open, a large batch of new
tasks on a pooled connection by binary COPY, and otherwise opens its own transaction block, which is a real
transaction on a pooled connection and a savepoint inside a caller's transaction, so the same code serves
:meth:`PostgresBackend.enqueue_many` and the transactional outbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import re
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row

from ...._redact import library_logger
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
from ._arrays import BytesArray, FloatArray, Int8Array, IntArray, TextArray
from ._copy import copy_data
from ._direct import DirectStatement, unwatch
from ._schema import TASK_COLUMNS
from ._sql import COPY_TYPES, NOTIFY_PAYLOAD_LIMIT, NOTIFY_QUEUE, Statements

__all__ = [
    "IfExists",
    "cancel",
    "cancel_requests",
    "claim",
    "enqueue",
    "enqueue_group",
    "extend_leases",
    "flow_state",
    "get",
    "get_group",
    "list_records",
    "next_due",
    "pause",
    "paused",
    "purge",
    "reclaim_expired",
    "record_from_row",
    "requeue",
    "resume",
    "save_progress",
    "settle",
    "stats",
]

IfExists = Literal["error", "skip", "debounce"]

Connection = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[TupleRow]

_LIVE = frozenset({TaskState.PENDING.value, TaskState.ACTIVE.value})
# The states a settlement may set, by the state given (a TaskState, or its value: TaskState is a str enum),
# as the text stored.
_SETTLE_VALUES: dict[object, str] = {
    key: state.value
    for state in (TaskState.PENDING, TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)
    for key in (state, state.value)  # an Enum member hashes by its name, not its value
}
# How often an enqueue that lost a race for a new id (a concurrent insert of the same id) is retried.
_RACE_RETRIES = 3
_log = library_logger("lifecycle.asynctask.postgres")
# Batches of new tasks at least this large go by binary COPY (see _copy_new): its three round trips (COPY,
# its data, the wake-up) against the array INSERT's one cost less than the adaptation it saves from about
# this size on (client CPU per call, interleaved medians, arrays against COPY: 200 tasks 1.42 against
# 1.89 ms, 500 tasks 3.00 against 2.89 ms, 1000 tasks 4.86 against 4.42 ms; wall time likewise).
_COPY_FROM = 256
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
    # One look at the fields joined first: this runs for every task of every enqueue.
    joined = "".join(
        (task.id, task.name, task.queue, task.meta or "", task.concurrency_key or "", task.group_id or "")
    )
    if "\x00" not in joined:
        return
    for field in ("id", "name", "queue", "meta", "concurrency_key", "group_id"):
        value = getattr(task, field)
        if value is not None and "\x00" in value:
            raise ValueError(
                f"task {task.id!r}: its {field} contains a NUL character, which PostgreSQL text cannot "
                "store; remove it (NUL is allowed in the payload bytes)"
            )


def _error_text(error: str | None) -> str | None:
    # An error message is diagnostic text: keep it storable rather than fail the whole settlement batch.
    return None if error is None else error.replace("\x00", "\\x00")


def _new_task_row(task: NewTask) -> tuple[Any, ...]:
    """The thirteen stored fields of ``task`` in ``_sql``'s new-task order, checked and converted."""
    _check_text(task)
    return (
        task.id,
        task.name,
        task.queue,
        bytes(task.payload),
        int(task.max_retries),
        _float_or_none(task.timeout),
        float(task.enqueued_at),
        float(task.run_at),
        task.meta,
        int(task.priority),
        task.concurrency_key,
        _float_or_none(task.expires_at),
        task.group_id,
    )


_FLOAT8 = struct.Struct("!d").pack
_INT4 = struct.Struct("!i").pack
_INT8 = struct.Struct("!q").pack


def wake_payload(queue: str) -> str:
    """The payload of the notification that ``queue`` got work: the queue, or ``"*"`` (wake every waiter)
    for a name too long for a payload; ``_sql.NOTIFY_QUEUE``'s rule, for the single enqueue, whose statement
    takes the payload as a parameter."""
    # A name of fewer characters than a quarter of the limit is shorter than it in UTF-8 whatever they are.
    if (
        len(queue) * 4 < NOTIFY_PAYLOAD_LIMIT
        or len(queue.encode("utf-8", "surrogatepass")) < NOTIFY_PAYLOAD_LIMIT
    ):
        return queue
    return "*"


def _insert_one_params(task: NewTask, channel: str) -> list[bytes | None] | None:
    """``insert_one``'s parameters for ``task`` and ``channel``, in binary (``_sql.INSERT_ONE_TYPES``; text
    in UTF-8), or ``None`` for a value only psycopg's path may send: an integer outside its column's range,
    or text UTF-8 cannot encode (a lone surrogate). psycopg then raises for it what it always did. A value
    :func:`_new_task_row` refuses raises here as there (built from the task in one pass, without that row:
    this runs once per single enqueue)."""
    _check_text(task)
    timeout, meta, key, expires, group = (
        task.timeout,
        task.meta,
        task.concurrency_key,
        task.expires_at,
        task.group_id,
    )
    # The conversions of _new_task_row first, so that a value it refuses raises here as it does there.
    payload, retries, timeout, enqueued, run_at, priority, expires = (
        bytes(task.payload),
        int(task.max_retries),
        _float_or_none(timeout),
        float(task.enqueued_at),
        float(task.run_at),
        int(task.priority),
        _float_or_none(expires),
    )
    try:
        queue = task.queue.encode()
        return [
            task.id.encode(),
            task.name.encode(),
            queue,
            payload,
            _INT4(retries),
            None if timeout is None else _FLOAT8(timeout),
            _FLOAT8(enqueued),
            _FLOAT8(run_at),
            None if meta is None else meta.encode(),
            _INT8(priority),
            None if key is None else key.encode(),
            None if expires is None else _FLOAT8(expires),
            None if group is None else group.encode(),
            channel.encode(),
            queue if len(queue) < NOTIFY_PAYLOAD_LIMIT else b"*",  # wake_payload(queue), encoded
        ]
    except (struct.error, UnicodeEncodeError):
        return None


def _new_task_arrays(tasks: Iterable[NewTask]) -> list[list[Any]]:
    """The thirteen column arrays of ``tasks``, as the classes of ``_arrays`` (dumped in one pass on the
    backend's pooled connections: psycopg's generic list adaptation was most of the client's CPU for a
    batch of 100)."""
    rows = [_new_task_row(task) for task in tasks]
    if not rows:
        return [[] for _ in range(13)]
    (
        ids,
        names,
        queues,
        payloads,
        retries,
        timeouts,
        enqueued,
        run_at,
        meta,
        priority,
        keys,
        expires,
        groups,
    ) = zip(*rows, strict=True)
    return [
        TextArray(ids),
        TextArray(names),
        TextArray(queues),
        BytesArray(payloads),
        _int_array(retries, IntArray, _INT4_MAX),
        FloatArray(timeouts),
        FloatArray(enqueued),
        FloatArray(run_at),
        TextArray(meta),
        _int_array(priority, Int8Array, _INT8_MAX),
        TextArray(keys),
        FloatArray(expires),
        TextArray(groups),
    ]


_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1


def _int_array(values: tuple[int, ...], kind: type[list[Any]], most: int) -> list[Any]:
    """``values`` as ``kind`` when each fits its binary element, else as a plain list: psycopg adapts that
    one as it did before, and the server's cast refuses the value out of range with its usual error."""
    if -most <= min(values) and max(values) <= most:
        return kind(values)
    return list(values)


_PENDING = ("pending",)
_UNIQUE_KEY = operator.attrgetter("unique_key")
_QUEUE = operator.attrgetter("queue")


def _copy_row(task: NewTask) -> tuple[Any, ...]:
    """The values of ``task`` in ``COPY_COLUMNS`` order (its fields, then the state), checked and
    converted."""
    return _new_task_row(task) + _PENDING


# -- enqueue ------------------------------------------------------------------------------------------------


async def enqueue(
    connection: Connection,
    st: Statements,
    tasks: Sequence[NewTask],
    if_exists: IfExists,
    *,
    pooled: bool = False,
    cursor: Cursor | None = None,
    insert_one: DirectStatement | None = None,
    insert_one_new: DirectStatement | None = None,
) -> list[str]:
    """Store ``tasks`` atomically on ``connection``; see :meth:`Backend.enqueue_many` for the id, window and
    debounce rules. ``pooled``: ``connection`` is one of the backend's own (its adapters are ours), so a large
    batch may go by binary COPY (see :func:`_copy_new`). ``cursor``: one of ``connection``'s to reuse (one
    of tuple rows), the functions below take it too. ``insert_one``, ``insert_one_new``: the backend's
    ``st.insert_one`` and ``st.insert_one_new`` run through libpq (see :class:`DirectStatement`), for a single
    task on one of its own connections."""
    # The common single enqueue first, with nothing looked at that it does not need: one task, no uniqueness
    # key, on an idle autocommit connection of the backend's (direct.usable), run directly. Anything else,
    # and what it leaves to sort out (an id that exists, the server's error), goes the general way below.
    result = None
    if len(tasks) == 1 and pooled and if_exists != "debounce":
        task = tasks[0]
        direct = insert_one if task.generated_id and if_exists == "error" else insert_one_new
        if task.unique_key is None and direct is not None and direct.usable(connection):
            params = _insert_one_params(task, st.channel)
            if params is not None:
                result = await direct.run(connection, params)
                if result is not None and result.ntuples > 0:
                    return [task.id]
    cursor = _cursor(connection) if cursor is None else cursor
    # No task with a uniqueness key (counted at C speed: this runs over every task of a bulk enqueue).
    plain = if_exists != "debounce" and list(map(_UNIQUE_KEY, tasks)).count(None) == len(tasks)
    alone = plain and _outside_transactions(connection)
    if pooled and not (alone and len(tasks) == 1):
        unwatch(connection)  # psycopg waits on it below: see _direct.watched
    if alone and pooled and if_exists == "error" and len(tasks) >= _COPY_FROM:
        if await _copy_new(connection, st, tasks):
            return [task.id for task in tasks]
        plain = False  # an id exists, or repeats in the batch: sort it out below
    elif alone and if_exists == "error" and len(tasks) > 1:
        # One statement in autocommit is one transaction and one round trip (against three for BEGIN, the
        # INSERT and COMMIT), wake-ups included: it stores the whole batch, or nothing when an id exists or
        # repeats in the batch (its unique violation), which is then sorted out below.
        try:
            await cursor.execute(st.insert_checked, (*_new_task_arrays(tasks), st.channel))
        except psycopg.errors.UniqueViolation:
            plain = False
        else:
            return [task.id for task in tasks]
    elif alone and len(tasks) == 1:
        # One statement in autocommit is one transaction, and one round trip, wake-up included. An id the
        # engine generated cannot exist: its INSERT has no ON CONFLICT. One the caller chose may: its INSERT
        # stores nothing then and returns no row.
        task = tasks[0]
        generated = task.generated_id and if_exists == "error"
        statement = st.insert_one if generated else st.insert_one_new
        if result is not None:  # run directly above, and no row: the id exists
            added = False
        else:  # not run directly, or the server's error: psycopg's path runs it (and raises that error)
            row = _new_task_row(task)
            unwatch(connection)
            try:
                await cursor.execute(statement, (*row, st.channel, wake_payload(task.queue)))
            except psycopg.errors.UniqueViolation:  # a generated id that exists after all: sorted out below
                added = False
            else:
                added = await cursor.fetchone() is not None
        if added:
            return [task.id]
        if if_exists == "skip":
            return []
        unwatch(connection)  # psycopg's path below
        plain = False  # the id exists: sort it out below
    elif alone and if_exists == "skip":
        # As one statement too: a batch of skip has nothing to undo.
        await cursor.execute(st.insert_new, (*_new_task_arrays(tasks), st.channel))
        return _in_order(tasks, {row[0] for row in await cursor.fetchall()})
    if plain:
        # Fast path: fresh ids and no windows (the common case) are one INSERT ... ON CONFLICT DO NOTHING.
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
                return await _enqueue_checked(cursor, st, tasks, if_exists)
        except psycopg.errors.UniqueViolation as exc:
            # A concurrent transaction stored one of the ids (or opened one of the windows) after we looked:
            # look again.
            if attempt == _RACE_RETRIES:
                match = _DUPLICATE_KEY.match(exc.diag.message_detail or "")
                raise DuplicateTaskError(match["id"] if match else tasks[0].id) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def _copy_new(connection: Connection, st: Statements, tasks: Sequence[NewTask]) -> bool:
    """Store ``tasks`` (of ``if_exists="error"``, no windows) by binary COPY, one transaction, then wake
    their queues; ``False`` (and nothing stored) when an id exists or repeats in the batch.

    A batch of new tasks is stored faster this way than by the array INSERT, on both sides: the stream is
    built column by column at C speed (see :mod:`._copy`; psycopg's ``write_row`` for what that declines),
    and the server inserts the rows in bulk, with no unnest, sort, conflict check or notification per row.
    COPY has no ON CONFLICT: an id that exists fails it, and the caller then sorts the ids out as it does
    after the INSERT's conflicts (a fresh generated id is the common case)."""
    # The whole stream built column by column (see _copy), else the rows for psycopg's dumpers: checked
    # before anything is sent, either way.
    data = copy_data(tasks, connection.info.encoding)
    rows = [_copy_row(task) for task in tasks] if data is None else []
    queues = list(dict.fromkeys(map(_QUEUE, tasks)))
    cursor = _cursor(connection)
    try:
        # In autocommit the COPY is a transaction of its own: no BEGIN and COMMIT round trips.
        async with cursor.copy(st.copy_new) as copy:
            if data is not None:
                await copy.write(data)
            else:
                copy.set_types(COPY_TYPES)
                for row in rows:
                    await copy.write_row(row)
    except psycopg.errors.UniqueViolation:
        return False
    # The wake-up once the tasks are committed. Should it be lost (the connection fails between the two),
    # idle workers find the tasks at their next poll_interval: the call reports them stored, as they are (a
    # caller retrying a failed call would store the batch twice, under new generated ids).
    try:
        await cursor.execute(st.notify_queues, (st.channel, queues))
    except psycopg.Error as exc:
        _log.warning(
            "enqueue_many: %d tasks stored by COPY, but the wake-up after it failed (%s); idle workers find "
            "them at their next poll",
            len(tasks),
            type(exc).__name__,
        )
    return True


def _outside_transactions(connection: Connection) -> bool:
    """Whether a statement on ``connection`` commits on its own: autocommit, and no transaction block open
    (a pooled connection; not a caller's transaction, which :func:`enqueue` joins with a savepoint)."""
    return connection.autocommit and connection.pgconn.transaction_status == TransactionStatus.IDLE


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


def _window_of(task: NewTask) -> tuple[str, float] | None:
    """The uniqueness window ``task`` opens: ``(key, until)``, or ``None``."""
    if task.unique_key is None or task.unique_until is None:
        return None
    return task.unique_key, float(task.unique_until)


class _Windows:
    """The uniqueness windows of a batch's keys as stored (read and locked), plus those the batch opens."""

    def __init__(self, stored: dict[str, float]) -> None:
        self.stored = stored
        self.opened: dict[str, float] = {}

    def refuse(self, task: NewTask) -> bool:
        """Whether a window on ``task``'s key ends after its ``enqueued_at``."""
        if task.unique_key is None:
            return False
        until = self.opened.get(task.unique_key, self.stored.get(task.unique_key))
        return until is not None and until > task.enqueued_at

    def open(self, task: NewTask) -> None:
        window = _window_of(task)
        if window is not None:
            self.opened[window[0]] = window[1]


async def _enqueue_checked(
    cursor: Cursor, st: Statements, tasks: Sequence[NewTask], if_exists: IfExists
) -> list[str]:
    """Some id exists, or the batch has uniqueness windows or is a debounce: lock the records with the batch's
    ids and the windows of its keys, decide every task in batch order, then write (one statement per kind of
    change). Raises :class:`DuplicateTaskError` before writing anything when a task is refused."""
    await cursor.execute(st.lock_existing, (list(dict.fromkeys(task.id for task in tasks)),))
    existing: dict[str, str] = {row[0]: row[1] for row in await cursor.fetchall()}
    keys = list(dict.fromkeys(task.unique_key for task in tasks if task.unique_key is not None))
    stored_windows: dict[str, float] = {}
    if keys:
        await cursor.execute(st.lock_windows, (keys,))
        stored_windows = {row[0]: float(row[1]) for row in await cursor.fetchall()}
    windows = _Windows(stored_windows)
    accepted: list[NewTask] = []
    if if_exists == "skip":
        seen: set[str] = set()
        for task in tasks:
            if task.id in seen or task.id in existing or windows.refuse(task):
                continue
            seen.add(task.id)
            accepted.append(task)
            windows.open(task)
    else:
        seen = set()
        conflicts: list[str] = []
        for task in tasks:
            live = if_exists == "error" and (task.id in seen or existing.get(task.id) in _LIVE)
            if (live or windows.refuse(task)) and task.id not in conflicts:
                conflicts.append(task.id)
            seen.add(task.id)
            windows.open(task)
        if conflicts:
            raise DuplicateTaskError(conflicts[0], conflicts)
        accepted = list(tasks)
    if windows.opened:
        await _write_windows(cursor, st, windows, min(task.enqueued_at for task in tasks))
    if if_exists == "debounce":
        await _debounce(cursor, st, accepted, existing)
    else:
        replaced = [task.id for task in accepted if task.id in existing]
        if replaced:  # finished records with these ids ("error"), never a live one
            await cursor.execute(st.delete_ids, (replaced,))
        if accepted:
            await cursor.execute(st.insert_checked, (*_new_task_arrays(accepted), st.channel))
    return [task.id for task in accepted]


async def _write_windows(cursor: Cursor, st: Statements, windows: _Windows, ended_before: float) -> None:
    """Store the windows the batch opens (the stored ones are locked; a new key another enqueue stores
    meanwhile fails with a unique violation, and the caller looks again), and drop a bounded number of
    windows that ended before ``ended_before``."""
    moved = {key: until for key, until in windows.opened.items() if key in windows.stored}
    new = {key: until for key, until in windows.opened.items() if key not in windows.stored}
    await cursor.execute(
        st.write_windows,
        (
            list(moved),
            list(moved.values()),
            list(new),
            list(new.values()),
            ended_before,
            list(windows.opened),
        ),
    )


async def _debounce(
    cursor: Cursor, st: Statements, tasks: Sequence[NewTask], existing: dict[str, str]
) -> None:
    """Apply a debounce batch to records locked by the caller, task by task in batch order: a pending record
    takes the new fields (keeping ``attempts`` and ``enqueued_at``), an active one keeps the task as its
    follow-up run, a finished or missing one is replaced or stored."""
    inserts: dict[str, NewTask] = {}  # stored by this batch, in batch order
    replaces: dict[str, NewTask] = {}  # pending records that take the new fields
    follow_ups: dict[str, NewTask] = {}  # active records' next run
    for task in tasks:
        if task.id in inserts:  # stored earlier in this batch: still pending, and its enqueued_at stays
            inserts[task.id] = dataclasses.replace(task, enqueued_at=inserts[task.id].enqueued_at)
            continue
        state = existing.get(task.id)
        if state == TaskState.PENDING.value:
            replaces[task.id] = task
        elif state == TaskState.ACTIVE.value:
            follow_ups[task.id] = task
        else:
            inserts[task.id] = task
    replaced = [task_id for task_id in inserts if task_id in existing]
    if replaced:
        await cursor.execute(st.delete_ids, (replaced,))
    if inserts:
        await cursor.execute(st.insert_checked, (*_new_task_arrays(inserts.values()), st.channel))
    if replaces:
        await cursor.execute(st.replace_pending, (*_new_task_arrays(replaces.values()), st.channel))
    if follow_ups:
        await cursor.execute(st.set_follow_up, tuple(_new_task_arrays(follow_ups.values())))


# -- leases -------------------------------------------------------------------------------------------------


def _limited(limits: Mapping[str, FlowLimits] | None) -> dict[str, FlowLimits]:
    """The names whose limits limit something, checked."""
    if not limits:
        return {}
    checked: dict[str, FlowLimits] = {}
    for name, flow in limits.items():
        if flow.rate is not None and (flow.per is None or not flow.per > 0 or not flow.rate >= 0):
            raise ValueError(
                f"claim(limits=...): the rate limit of {name!r} is {flow.rate!r} per {flow.per!r} s; give a "
                "rate >= 0 and a period `per` > 0 seconds"
            )
        if flow.rate is not None or flow.max_running is not None or flow.max_running_per_key is not None:
            checked[name] = flow
    return checked


def _claimed(rows: list[TupleRow], queues: Sequence[str]) -> list[ClaimedTask]:
    """The leased tasks among the updated ``rows`` (the others are expired tasks the claim cancelled), in
    claim order."""
    # RETURNING has no order: put the rows back into (queue order, priority, run_at, enqueue order).
    order = {queue: index for index, queue in enumerate(queues)}
    active = TaskState.ACTIVE.value
    leased = [row for row in rows if row[6] == active]
    leased.sort(key=lambda row: (order.get(row[4], len(order)), -_sort_number(row[18]), row[11], row[0]))
    claimed, read = _records.new_claimed_task, _records.record_from_row
    return [claimed(row[1], read(row[2:], bytes)) for row in leased]


def _sort_number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


async def claim(
    connection: Connection,
    st: Statements,
    queues: Sequence[str],
    limit: int,
    now: float,
    lease_until: float,
    limits: Mapping[str, FlowLimits] | None = None,
    *,
    cursor: Cursor | None = None,
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due pending tasks, ``queues`` in priority order, and cancel the expired ones, in
    one call of a server-side function (see ``_functions``).

    Without limits it locks the rows it takes with ``FOR UPDATE SKIP LOCKED``: claimers never wait for each
    other. With limits it first takes a transaction-scoped advisory lock per limited name that has pending
    tasks, names in sorted order, so that claimers of one name take turns and never deadlock; the statements
    after the locks see every task the previous holder leased, so counting the running tasks and reading the
    bucket there is exact. Names without limits keep SKIP LOCKED; nothing waits on a row.
    """
    cursor = _cursor(connection) if cursor is None else cursor
    limited = _limited(limits)
    params: dict[str, Any] = {
        "queues": list(queues),
        "now": now,
        "limit": limit,
        "lease_until": lease_until,
    }
    if not limited:
        await cursor.execute(st.claim, {**params, "queues": TextArray(queues), "held": TextArray()})
    else:
        names = sorted(limited)
        flows = [limited[name] for name in names]
        await cursor.execute(
            st.claim_limited,
            {
                **params,
                "space": st.lock_space,
                "names": names,
                "rate": [None if f.rate is None else float(f.rate) for f in flows],
                "per": [None if f.per is None else float(f.per) for f in flows],
                "max_running": [f.max_running for f in flows],
                "per_key": [f.max_running_per_key for f in flows],
            },
        )
    return _claimed(await cursor.fetchall(), queues)


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


async def _take_over_damaged(
    connection: Connection, st: Statements, lease_until: float, limit: int
) -> list[ClaimedTask]:
    """Lease the records whose run_at or lease_until holds no usable time (so that no claim or reclaim
    selects them), as if their lease had expired: each comes back with its ``fault``, read before the lease
    was written, and the engine settles it dead."""
    cursor = _cursor(connection)
    await cursor.execute(st.damaged, (limit, lease_until))
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
    connection: Connection,
    st: Statements,
    leases: Sequence[tuple[str, str]],
    lease_until: float,
    *,
    cursor: Cursor | None = None,
) -> set[str]:
    """Renew the leases still held, in one statement; return the ids whose lease was lost."""
    cursor = _cursor(connection) if cursor is None else cursor
    ids = [task_id for task_id, _ in leases]
    sent = TextArray(ids)
    await cursor.execute(st.extend, (lease_until, sent, TextArray(token for _, token in leases), sent))
    held = {row[0] for row in await cursor.fetchall()}
    return {task_id for task_id in ids if task_id not in held}


async def settle(
    connection: Connection,
    st: Statements,
    settlements: Sequence[Settlement],
    slot_names: Sequence[str] = (),
    *,
    cursor: Cursor | None = None,
) -> set[str]:
    """Apply every settlement whose lease is held, with its ``then`` tasks (and a debounce's follow-up run)
    and the group bookkeeping of the members among them, in one statement; the ``then_groups`` of the applied
    ones are stored in the same transaction. A settled task named in ``slot_names`` (names limited by
    ``max_running`` or ``max_running_per_key``) notifies its queue, since its slot may let a held task
    start. Every applied settlement sends a "settled" notice."""
    rows: list[tuple[Any, ...]] = []
    follow_ups: list[NewTask] = []
    parents: list[str] = []
    first: list[Settlement] = []  # the first settlement of each task: a repeat finds the lease gone
    repeated: set[str] = set()
    seen: set[str] = set()
    for s in settlements:
        state = _SETTLE_VALUES.get(s.state)
        if state is None:
            raise ValueError(
                f"cannot settle task {s.task_id!r} as {TaskState(s.state).value!r}: a settlement's state "
                "must be pending, succeeded, dead or cancelled"
            )
        if s.task_id in seen:
            repeated.add(s.task_id)
            continue
        seen.add(s.task_id)
        first.append(s)
        run_at = (s.at if s.run_at is None else s.run_at) if state == "pending" else None
        rows.append(
            (
                s.task_id,
                s.token,
                state,
                float(s.at),
                _float_or_none(run_at),
                _error_text(s.error),
                None if s.result is None else bytes(s.result),
                int(s.refund_attempt),
            )
        )
        if s.then:
            follow_ups.extend(s.then)
            parents.extend(s.task_id for _ in s.then)
    columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * 8
    ids = TextArray(columns[0])
    # The arrays this backend's pooled connections dump in one pass (see _arrays), in _SETTLE's order.
    arrays = (
        ids,
        TextArray(columns[1]),
        TextArray(columns[2]),
        FloatArray(columns[3]),
        FloatArray(columns[4]),
        TextArray(columns[5]),
        BytesArray(columns[6]),
        IntArray(columns[7]),
    )
    cursor = _cursor(connection) if cursor is None else cursor
    statement = st.settle
    params: tuple[Any, ...]
    if follow_ups:
        params = (
            *arrays,
            ids,
            *_new_task_arrays(follow_ups),
            parents,
            st.notice_channel,
            st.notice_channel,
            TextArray(slot_names),
            st.channel,
            st.channel,
        )
    else:
        statement = st.settle_plain
        params = (*arrays, ids, st.notice_channel, st.notice_channel, TextArray(slot_names), st.channel)
    if not any(s.then_groups for s in first):
        await cursor.execute(statement, params)
        applied = {row[0] for row in await cursor.fetchall() if row[0] is not None}
    else:  # a chain step that is a group: stored in the settlement's transaction
        async with connection.transaction():
            await cursor.execute(statement, params)
            applied = {row[0] for row in await cursor.fetchall() if row[0] is not None}
            for s in first:
                if s.task_id not in applied:
                    continue
                for group in s.then_groups:
                    # Stored as enqueue_group stores it, in a savepoint: a group whose id exists, or with a
                    # member id that is live (or in an open uniqueness window), is skipped whole.
                    with contextlib.suppress(DuplicateTaskError):
                        await enqueue_group(connection, st, group)
    return {s.task_id for s in first if s.task_id not in applied} | repeated


async def next_due(
    connection: Connection, st: Statements, queues: Sequence[str], *, cursor: Cursor | None = None
) -> tuple[float, int] | None:
    """The earliest pending ``(run_at, seq)`` over ``queues`` that are not paused, or ``None``."""
    cursor = _cursor(connection) if cursor is None else cursor
    await cursor.execute(st.next_due, {"queues": list(queues)})
    row = await cursor.fetchone()
    return None if row is None else (float(row[0]), int(row[1]))


# -- flow control -------------------------------------------------------------------------------------------


async def pause(connection: Connection, st: Statements, queue: str) -> None:
    """Store the pause of ``queue`` (idempotent)."""
    await _cursor(connection).execute(st.pause, (queue,))


async def resume(connection: Connection, st: Statements, queue: str) -> None:
    """Drop the pause of ``queue`` (idempotent) and wake the workers of the queue."""
    await _cursor(connection).execute(st.resume, (queue, st.channel))


async def paused(connection: Connection, st: Statements) -> set[str]:
    """The paused queues."""
    cursor = _cursor(connection)
    await cursor.execute(st.paused)
    return {_records.stored_text(row[0]) for row in await cursor.fetchall()}


async def flow_state(
    connection: Connection,
    st: Statements,
    name: str,
    concurrency_key: str | None,
    now: float,
    limits: FlowLimits,
) -> FlowState:
    """The running counts of ``name`` (and of its key) and its bucket refilled to ``now``, read only."""
    cursor = _cursor(connection)
    await cursor.execute(st.flow_state, (name, concurrency_key, name, concurrency_key, name))
    row = await cursor.fetchone()
    assert row is not None
    running, for_key, stored_tokens, stored_at, refused = row
    tokens: float | None = None
    if limits.rate is not None:
        rate = float(limits.rate)
        if stored_tokens is None:
            tokens = rate  # never used: full
        else:
            tokens, at = float(stored_tokens), float(stored_at)
            if now > at and limits.per:
                tokens += (now - at) * rate / limits.per
            tokens = min(rate, tokens)
    return FlowState(
        running=int(running),
        running_for_key=int(for_key),
        tokens=tokens,
        refused=0 if limits.rate is None or refused is None else int(refused),
    )


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
    """Cancel the pending tasks among ``task_ids`` (their groups too) and ask the active ones to stop, in one
    statement that also sends the notices; return the ids of both kinds, in the order given."""
    cursor = _cursor(connection)
    unique = list(dict.fromkeys(task_ids))
    await cursor.execute(st.cancel, {"now": now, "ids": unique})
    changed = {row[0] for row in await cursor.fetchall() if row[0] is not None}
    return [task_id for task_id in unique if task_id in changed]


async def cancel_requests(connection: Connection, st: Statements, task_ids: Sequence[str]) -> set[str]:
    """The active tasks among ``task_ids`` whose cancellation was asked."""
    cursor = _cursor(connection)
    await cursor.execute(st.cancel_requests, (list(dict.fromkeys(task_ids)),))
    return {row[0] for row in await cursor.fetchall()}


def _progress_text(message: str | None) -> str | None:
    # Like an error message, progress is diagnostic text: stored rather than failing the batch over a NUL.
    return None if message is None else message.replace("\x00", "\\x00")


async def save_progress(
    connection: Connection, st: Statements, updates: Sequence[ProgressUpdate]
) -> set[str]:
    """Store each update whose lease is held (the last of a task wins), in one statement; return the ids
    whose lease was lost."""
    ids = [update.task_id for update in updates]
    cursor = _cursor(connection)
    await cursor.execute(
        st.save_progress,
        (
            ids,
            [update.token for update in updates],
            [_float_or_none(update.done) for update in updates],
            [_float_or_none(update.total) for update in updates],
            [_progress_text(update.message) for update in updates],
            ids,
        ),
    )
    held = {row[0] for row in await cursor.fetchall()}
    return {task_id for task_id in ids if task_id not in held}


# -- groups -------------------------------------------------------------------------------------------------


def _check_group(group: NewGroup) -> None:
    for field, value in (("id", group.id), ("meta", group.meta)):
        if value is not None and "\x00" in value:
            raise ValueError(
                f"group {group.id!r}: its {field} contains a NUL character, which PostgreSQL text cannot "
                "store; remove it"
            )
    if group.then is not None:
        _check_text(group.then)


async def _insert_group(cursor: Cursor, st: Statements, group: NewGroup) -> bool:
    """Store the group's row and member rows unless its id exists (then ``False``)."""
    _check_group(group)
    then = group.then
    # A repeated member id is stored once here (enqueue_group's member check refuses it: nothing stays).
    member_ids = list(dict.fromkeys(member.id for member in group.members))
    then_fields: tuple[Any, ...] = (None,) * 11
    if then is not None:
        then_fields = (
            then.name,
            then.queue,
            bytes(then.payload),
            int(then.max_retries),
            _float_or_none(then.timeout),
            float(then.enqueued_at),
            float(then.run_at),
            then.meta,
            int(then.priority),
            then.concurrency_key,
            _float_or_none(then.expires_at),
        )
    then_id = None if then is None else then.id
    await cursor.execute(
        st.insert_group,
        (
            group.id,
            float(group.created_at),
            group.meta,
            member_ids,
            then_id,
            then_id,
            *then_fields,
            member_ids,
        ),
    )
    return await cursor.fetchone() is not None


async def enqueue_group(connection: Connection, st: Statements, group: NewGroup) -> str:
    """Store ``group`` with its members in one transaction: the group's rows first (a group id that exists
    raises :class:`DuplicateTaskError`), then the members as :func:`enqueue` stores them with
    ``if_exists="error"`` (a live member id raises, and nothing is stored)."""
    cursor = _cursor(connection)
    async with connection.transaction():
        if not await _insert_group(cursor, st, group):
            raise DuplicateTaskError(
                group.id, reason=f"a group with id {group.id!r} exists already; pick another group id"
            )
        if group.members:
            await enqueue(connection, st, group.members, "error")
    return group.id


async def get_group(connection: Connection, st: Statements, group_id: str) -> GroupRecord | None:
    """The group with ``group_id`` and its members' results and states, or ``None``."""
    cursor = _cursor(connection)
    await cursor.execute(st.get_group, (group_id,))
    rows = await cursor.fetchall()
    if not rows:
        return None
    first = rows[0]
    members = [row for row in rows if row[6] is not None]
    counts: dict[TaskState, int] = {}
    for row in members:
        if row[8] is not None:
            state = _records.stored_state(row[8])
            counts[state] = counts.get(state, 0) + 1
    return GroupRecord(
        id=first[0],
        task_ids=tuple(row[6] for row in members),
        outcome=None if first[1] is None else _records.stored_state(first[1]),
        results=tuple(None if row[7] is None else bytes(row[7]) for row in members),
        counts=counts,
        created_at=float(first[2]),
        finished_at=None if first[3] is None else float(first[3]),
        then_id=first[4],
        meta=first[5],
    )


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
        "lease_until = NULL, token = NULL, cancel_requested = false{where} RETURNING queue) "
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
    """Delete matching records; return how many were deleted. Without ``queue``, the groups whose outcome is
    among ``states`` and that finished before ``before`` go too (up to ``limit`` of them), with their member
    rows."""
    if not states or (limit is not None and limit <= 0):
        return 0
    cursor = _cursor(connection)
    if queue is None:
        await cursor.execute(
            sql.SQL(
                "WITH gone AS (DELETE FROM {groups} WHERE id IN (SELECT g.id FROM {groups} AS g "
                "WHERE g.outcome = ANY(%s::text[]) AND (%s::float8 IS NULL OR g.finished_at < %s::float8) "
                "ORDER BY g.finished_at LIMIT %s) RETURNING id) "
                "DELETE FROM {members} WHERE group_id IN (SELECT id FROM gone)"
            ).format(groups=st.groups, members=st.members),
            (sorted({TaskState(state).value for state in states}), before, before, limit),
        )
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
    await cursor.execute(query, params)
    return max(cursor.rowcount, 0)
