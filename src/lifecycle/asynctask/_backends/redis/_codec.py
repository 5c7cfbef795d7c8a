"""Turn records into Lua script arguments and script replies back into records, for the Redis backend.

Times travel as Python ``repr`` text, so every float survives exactly (Lua never does arithmetic on them);
``None`` travels as ``""`` for numbers and as a flag for text that may legitimately be empty.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from ..._records import (
    ClaimedTask,
    FlowLimits,
    GroupRecord,
    NewGroup,
    NewTask,
    Notice,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
    new_claimed_task,
    record_from_text,
    stored_state,
)

__all__ = [
    "NEW_TASK_VALUES",
    "RECORD_FIELDS",
    "STATE_NAMES",
    "claimed_tasks",
    "group_args",
    "group_record",
    "limits_args",
    "new_task_args",
    "notices",
    "progress_args",
    "record_from_fields",
    "records",
    "settlement_args",
    "sortable_time",
    "time_text",
]

RECORD_FIELDS = (
    "n", "q", "p", "s", "a", "m", "to", "e", "r", "st", "f", "l", "err", "res", "meta", "pr", "ck", "ex",
    "cr", "pd", "pt", "pm", "g",
)  # fmt: skip
"""The record hash fields in the order the scripts return them (the order of TaskRecord after ``id``)."""

NEW_TASK_VALUES = 16
"""How many script arguments describe one task to store (see :func:`new_task_args`)."""

_PRIORITY_BOUND = 10**15

_STRIDE = 2 + len(RECORD_FIELDS)  # token, id, fields

STATE_NAMES: dict[TaskState, str] = {state: state.value for state in TaskState}
"""How a state is written in records and key names."""

_STATES: dict[bytes, TaskState] = {state.value.encode(): state for state in TaskState}


def time_text(value: float) -> str:
    """A time (or any float) as exact text for a script argument."""
    return repr(float(value))


def sortable_time(value: float) -> str:
    """A time as the 16 hex digits the scripts put first in a claim member: the big-endian IEEE double with
    the sign bit flipped for a positive number (and every bit for a negative one), so that the digits sort as
    the times do."""
    (bits,) = _BITS.unpack(_DOUBLE.pack(float(value)))
    bits = bits ^ _MASK if bits >> 63 else bits | _SIGN
    return f"{bits:016x}"


_DOUBLE = struct.Struct(">d")
_BITS = struct.Struct(">Q")
_SIGN = 1 << 63
_MASK = (1 << 64) - 1


def new_task_args(task: NewTask, *, generated: bool = False) -> list[str | bytes]:
    """The sixteen script arguments that describe one task to store (see ``store()`` in the Lua prelude):
    id, name, queue, payload, max_retries, timeout, enqueued_at, run_at, flags (five ``0``/``1``: has meta,
    has a concurrency key, opens a uniqueness window, due at its enqueue, has an expiry), meta, priority,
    concurrency key, expires_at (``""`` for none), unique key, unique_until, and run_at as
    :func:`sortable_time`. ``generated=True`` appends the enqueue script's sixth flag ``1`` (the engine
    generated the id: no record is looked for), which only a call's first attempt may send.

    Raises :class:`ValueError` for a priority outside the stored range."""
    priority = task.priority
    if type(priority) is not int or not -_PRIORITY_BOUND < priority < _PRIORITY_BOUND:
        raise ValueError(
            f"task {task.id!r}: priority {priority!r} is not a whole number between -10**15 and 10**15 "
            "(exclusive); pass a smaller integer"
        )
    meta, key, expires_at = task.meta, task.concurrency_key, task.expires_at
    unique_key, unique_until = task.unique_key, task.unique_until
    unique = unique_key is not None and unique_until is not None
    enqueued_at, run_at, timeout = float(task.enqueued_at), float(task.run_at), task.timeout
    enqueued_text = repr(enqueued_at)
    # Written out (not a join over a generator): this runs once per task of every enqueue.
    flags = (
        ("0" if meta is None else "1")
        + ("0" if key is None else "1")
        + ("1" if unique else "0")
        + ("1" if run_at <= enqueued_at else "0")
        + ("0" if expires_at is None else "1")
        + ("1" if generated else "")
    )
    (bits,) = _BITS.unpack(_DOUBLE.pack(run_at))
    return [
        task.id,
        task.name,
        task.queue,
        task.payload,
        str(int(task.max_retries)),
        "" if timeout is None else repr(float(timeout)),
        enqueued_text,
        enqueued_text if task.run_at is task.enqueued_at else repr(run_at),
        flags,
        "" if meta is None else meta,
        "0" if priority == 0 else str(priority),
        "" if key is None else key,
        "" if expires_at is None else repr(float(expires_at)),
        unique_key if unique and unique_key is not None else "",
        repr(float(unique_until)) if unique and unique_until is not None else "",
        f"{bits ^ _MASK if bits >> 63 else bits | _SIGN:016x}",
    ]


def limits_args(limits: Mapping[str, FlowLimits] | None) -> list[str]:
    """The claim script's limit arguments: the count of limited names, then per name the name, rate, per,
    max_running and max_running_per_key (``""`` for a limit not set). Names without any limit are left out.

    Raises :class:`ValueError` for a limit no bucket or count can hold (a rate without ``per``, a negative
    count)."""
    if not limits:
        return ["0"]
    values: list[str] = []
    count = 0
    for name, flow in limits.items():
        if flow.rate is None and flow.max_running is None and flow.max_running_per_key is None:
            continue
        rate = _limit(name, "rate", flow.rate, minimum=1)
        if rate and (flow.per is None or not 0 < float(flow.per) < float("inf")):
            raise ValueError(
                f"limits[{name!r}]: rate={flow.rate!r} needs per, a positive, finite number of seconds, "
                f"got per={flow.per!r}"
            )
        per = "" if flow.rate is None or flow.per is None else time_text(flow.per)
        values += [
            name,
            rate,
            per,
            _limit(name, "max_running", flow.max_running, minimum=0),
            _limit(name, "max_running_per_key", flow.max_running_per_key, minimum=0),
        ]
        count += 1
    return [str(count), *values]


def _limit(name: str, what: str, value: int | None, *, minimum: int) -> str:
    if value is None:
        return ""
    if type(value) is not int or not minimum <= value < _PRIORITY_BOUND:
        raise ValueError(
            f"limits[{name!r}]: {what}={value!r} must be a whole number of at least {minimum} (and below "
            "10**15)"
        )
    return str(value)


def settlement_args(settlement: Settlement) -> list[str | bytes]:
    """The script arguments for one settlement, its follow-up tasks included."""
    state = settlement.state
    when = settlement.at
    at = repr(when) if type(when) is float else time_text(when)  # time_text inline: once per task
    if (
        state is TaskState.SUCCEEDED
        and settlement.error is None
        and settlement.run_at is None
        and not settlement.then
        and not settlement.then_groups
        and not settlement.refund_attempt
    ):
        # The usual verdict, once per task: the general path's values written out (0.65 against 1.3 us).
        result = settlement.result
        if result is None:
            return [settlement.task_id, settlement.token, "succeeded", at, at, "", "0000", "", b"", "0"]
        return [settlement.task_id, settlement.token, "succeeded", at, at, "", "0100", "", result, "0"]
    if type(state) is not TaskState:  # a plain string naming one
        state = TaskState(state)
    if state is TaskState.ACTIVE:
        raise ValueError(
            f"cannot settle task {settlement.task_id!r} as 'active': a verdict is pending (retry), "
            "succeeded, dead or cancelled"
        )
    run_at = at if settlement.run_at is None else time_text(settlement.run_at)
    flags = (
        ("0" if settlement.error is None else "1")
        + ("0" if settlement.result is None else "1")
        + ("1" if settlement.refund_attempt else "0")
        + ("1" if settlement.then_groups else "0")
    )
    args: list[str | bytes] = [
        settlement.task_id,
        settlement.token,
        STATE_NAMES[state],
        at,
        run_at,
        sortable_time(settlement.at if settlement.run_at is None else settlement.run_at)
        if state is TaskState.PENDING
        else "",
        flags,
        "" if settlement.error is None else settlement.error,
        b"" if settlement.result is None else settlement.result,
        str(len(settlement.then)),
    ]
    for task in settlement.then:
        args += new_task_args(task)
    if settlement.then_groups:
        args.append(str(len(settlement.then_groups)))
    for group in settlement.then_groups:
        args += [str(len(group.members)), *group_args(group)]
        for member in group.members:
            args += new_task_args(member)
    return args


def group_args(group: NewGroup) -> list[str | bytes]:
    """A group's header as the scripts take it (see ``group_stored()`` in the Lua prelude): id, created_at,
    has meta (``0``/``1``), meta, has then (``0``/``1``), then the :func:`new_task_args` of ``then`` when
    there is one. The members follow separately: the scripts write the group's id into each member's record
    (whatever the member's own ``group_id`` says)."""
    args: list[str | bytes] = [
        group.id,
        time_text(group.created_at),
        "0" if group.meta is None else "1",
        "" if group.meta is None else group.meta,
        "0" if group.then is None else "1",
    ]
    if group.then is not None:
        args += new_task_args(group.then)
    return args


def progress_args(update: ProgressUpdate) -> list[str]:
    """The six script arguments of one progress update: id, token, flags (three ``0``/``1``: has done, has
    total, has message), done, total, message."""
    flags = "".join("0" if value is None else "1" for value in (update.done, update.total, update.message))
    return [
        update.task_id,
        update.token,
        flags,
        "" if update.done is None else time_text(update.done),
        "" if update.total is None else time_text(update.total),
        "" if update.message is None else update.message,
    ]


_SLOT_STATES = {ord("s"): TaskState.SUCCEEDED, ord("n"): TaskState.SUCCEEDED, ord("d"): TaskState.DEAD}


def group_record(group_id: str, reply: Sequence[Any]) -> GroupRecord:
    """A :class:`GroupRecord` from the ``get_group`` script's reply: the group hash's ``n o c f ti meta``
    values, the member ids, each member's results slot (``s`` + the result, ``n`` succeeded without a
    result, ``d`` dead, ``c`` cancelled, or nothing yet) and each member's stored state (``None`` when its
    record is gone or no longer belongs to the group)."""
    header, ids, slots, states = reply
    _size, outcome, created, finished, then_id, meta = header
    counts: dict[TaskState, int] = {}
    results: list[bytes | None] = []
    for slot, state in zip(slots, states, strict=True):
        results.append(slot[1:] if slot and slot[:1] == b"s" else None)
        if state is not None:
            counted: TaskState | None = stored_state(state)
        elif slot:
            counted = _SLOT_STATES.get(slot[0], TaskState.CANCELLED)
        else:
            counted = None  # its record is gone and it never ended: nothing to count
        if counted is not None:
            counts[counted] = counts.get(counted, 0) + 1
    return GroupRecord(
        id=group_id,
        task_ids=tuple(task_id.decode() for task_id in ids),
        outcome=None if not outcome else stored_state(outcome),
        results=tuple(results),
        counts=counts,
        created_at=_time_or(created, 0.0),
        finished_at=_time_or(finished, None),
        then_id=then_id.decode() if then_id else None,
        meta=meta.decode() if meta is not None else None,
    )


def _time_or(value: bytes | None, default: float | None) -> Any:
    try:
        return float(value) if value else default
    except ValueError:
        return default


_NOTICE_KINDS: dict[bytes, Any] = {b"s": "settled", b"c": "cancel"}


def notices(message: bytes, *, own: bytes = b"") -> list[Notice]:
    """The notices of one pub/sub message the scripts publish: a kind letter (``s`` settled, ``c`` cancel),
    for the settle script's messages followed by ``:`` and the publishing backend object's nonce, then the
    task ids, all NUL-separated (ids never contain NUL). A settle message of the backend object whose nonce is
    ``own`` gives nothing (its engine knows its own verdicts), nor does an unknown kind."""
    kind, *ids = message.split(b"\0")
    if len(kind) > 1:
        if kind[2:] == own:
            return []
        kind = kind[:1]
    name = _NOTICE_KINDS.get(kind)
    if name is None:
        return []
    return [Notice(name, task_id.decode("utf-8", "replace")) for task_id in ids]


def record_from_fields(task_id: bytes | str, fields: Sequence[Any]) -> TaskRecord:
    """A :class:`TaskRecord` from the 23 values of ``RECORD_FIELDS`` (as HMGET returns them: bytes, or None
    for a missing field) of a stored record. Never raises for what the fields hold: an unreadable one is named
    in the record's ``fault`` (see :func:`record_from_text`)."""
    return record_from_text([task_id.encode() if isinstance(task_id, str) else task_id, *fields])


def claimed_tasks(reply: Sequence[Any]) -> list[ClaimedTask]:
    """The leased tasks of a claim or reclaim script reply (token, id and fields per task)."""
    # A task's id and fields are the values record_from_text reads, in its order: one slice, not two lists.
    return [
        new_claimed_task(reply[start].decode(), record_from_text(reply[start + 1 : start + _STRIDE]))
        for start in range(0, len(reply), _STRIDE)
    ]


def records(reply: Sequence[Any]) -> list[TaskRecord]:
    """The records of a listing script reply (same shape as a claim reply, tokens empty)."""
    found = []
    for start in range(0, len(reply), _STRIDE):
        fields = reply[start + 2 : start + _STRIDE]
        if any(value is not None for value in fields):  # deleted between index and read: leave out
            found.append(record_from_fields(reply[start + 1], fields))
    return found
