"""Turn records into Lua script arguments and script replies back into records, for the Redis backend.

Times travel as Python ``repr`` text, so every float survives exactly (Lua never does arithmetic on them);
``None`` travels as ``""`` for numbers and as a flag for text that may legitimately be empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..._records import ClaimedTask, NewTask, Settlement, TaskRecord, TaskState, record_from_text

__all__ = [
    "RECORD_FIELDS",
    "STATE_NAMES",
    "claimed_tasks",
    "new_task_args",
    "record_from_fields",
    "records",
    "settlement_args",
    "time_text",
]

RECORD_FIELDS = ("n", "q", "p", "s", "a", "m", "to", "e", "r", "st", "f", "l", "err", "res", "meta")
"""The record hash fields in the order the scripts return them (the order of TaskRecord after ``id``)."""

_STRIDE = 2 + len(RECORD_FIELDS)  # token, id, fields

STATE_NAMES: dict[TaskState, str] = {state: state.value for state in TaskState}
"""How a state is written in records and key names."""

_STATES: dict[bytes, TaskState] = {state.value.encode(): state for state in TaskState}


def time_text(value: float) -> str:
    """A time (or any float) as exact text for a script argument."""
    return repr(float(value))


def new_task_args(task: NewTask) -> list[str | bytes]:
    """The ten script arguments that describe one task to store (see ``store()`` in the Lua prelude)."""
    return [
        task.id,
        task.name,
        task.queue,
        task.payload,
        str(int(task.max_retries)),
        "" if task.timeout is None else time_text(task.timeout),
        time_text(task.enqueued_at),
        time_text(task.run_at),
        "0" if task.meta is None else "1",
        "" if task.meta is None else task.meta,
    ]


def settlement_args(settlement: Settlement) -> list[str | bytes]:
    """The script arguments for one settlement, its follow-up tasks included."""
    state = TaskState(settlement.state)
    if state is TaskState.ACTIVE:
        raise ValueError(
            f"cannot settle task {settlement.task_id!r} as 'active': a verdict is pending (retry), "
            "succeeded, dead or cancelled"
        )
    at = time_text(settlement.at)
    run_at = at if settlement.run_at is None else time_text(settlement.run_at)
    flags = (
        ("0" if settlement.error is None else "1")
        + ("0" if settlement.result is None else "1")
        + ("1" if settlement.refund_attempt else "0")
    )
    args: list[str | bytes] = [
        settlement.task_id,
        settlement.token,
        STATE_NAMES[state],
        at,
        run_at,
        flags,
        "" if settlement.error is None else settlement.error,
        b"" if settlement.result is None else settlement.result,
        str(len(settlement.then)),
    ]
    for task in settlement.then:
        args += new_task_args(task)
    return args


def record_from_fields(task_id: bytes | str, fields: Sequence[Any]) -> TaskRecord:
    """A :class:`TaskRecord` from the 15 values of ``RECORD_FIELDS`` (as HMGET returns them: bytes, or None
    for a missing field) of a stored record. Never raises for what the fields hold: an unreadable one is named
    in the record's ``fault`` (see :func:`record_from_text`)."""
    return record_from_text([task_id.encode() if isinstance(task_id, str) else task_id, *fields])


def claimed_tasks(reply: Sequence[Any]) -> list[ClaimedTask]:
    """The leased tasks of a claim or reclaim script reply (token, id and fields per task)."""
    return [
        ClaimedTask(
            reply[start].decode(), record_from_fields(reply[start + 1], reply[start + 2 : start + _STRIDE])
        )
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
