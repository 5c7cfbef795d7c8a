"""The NATS backend's stored forms: a task as a row (a tuple of JSON values), the changes a transaction makes
(its ops), the log messages that carry them, and snapshots.

A row holds the fields of :class:`TaskRecord` in :data:`RECORD_FIELDS` order, then the lease token, the
debounce follow-up and the enqueue order. Everything travels as JSON: text, whole numbers and floats as
themselves (Python's ``json`` writes every float exactly, NaN and infinities included, so a damaged value
survives as it is), ``bytes`` as ``{"b": base64}``. Decoding never judges a value: a row may hold anything a
hand-written message put there, and the reader (:func:`record_of`) names what it cannot read in
``TaskRecord.fault``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

from ..._records import RECORD_FIELDS, NewGroup, NewTask, TaskRecord, record_from_row

__all__ = [
    "ATTEMPTS",
    "CANCEL_REQUESTED",
    "CONCURRENCY_KEY",
    "ENQUEUED_AT",
    "EXPIRES_AT",
    "FIELD_INDEX",
    "FINISHED_AT",
    "FOLLOW_UP",
    "GROUP_ID",
    "G_CREATED_AT",
    "G_ENDED",
    "G_FINISHED_AT",
    "G_ID",
    "G_META",
    "G_OUTCOME",
    "G_RESULTS",
    "G_TASK_IDS",
    "G_THEN",
    "G_THEN_ID",
    "ID",
    "LAST_ERROR",
    "LEASE_UNTIL",
    "MAX_RETRIES",
    "META",
    "NAME",
    "ORDER",
    "PAYLOAD",
    "PRIORITY",
    "PROGRESS_DONE",
    "PROGRESS_MESSAGE",
    "PROGRESS_TOTAL",
    "QUEUE",
    "RESULT",
    "ROW_LENGTH",
    "RUN_AT",
    "STARTED_AT",
    "STATE",
    "TIMEOUT",
    "TOKEN",
    "FORMAT",
    "Group",
    "Op",
    "Row",
    "decode_message",
    "decode_snapshot",
    "decode_value",
    "encode_parts",
    "encode_snapshot",
    "encode_value",
    "copy_group",
    "follow_up_of",
    "follow_up_task",
    "new_group",
    "new_row",
    "record_of",
    "task_fields",
    "task_of",
]

(ID, NAME, QUEUE, PAYLOAD, STATE, ATTEMPTS, MAX_RETRIES, TIMEOUT, ENQUEUED_AT, RUN_AT, STARTED_AT,
 FINISHED_AT, LEASE_UNTIL, LAST_ERROR, RESULT, META, PRIORITY, CONCURRENCY_KEY, EXPIRES_AT, CANCEL_REQUESTED,
 PROGRESS_DONE, PROGRESS_TOTAL, PROGRESS_MESSAGE, GROUP_ID, TOKEN, FOLLOW_UP, ORDER) = range(27)  # fmt: skip
ROW_LENGTH = 27

_V1_ROW_LENGTH = 22
_V1_TOKEN = (
    19  # format 1 rows had no cancel_requested, progress and group_id: the token came after expires_at
)
_ADDED = TOKEN - _V1_TOKEN
_ADDED_DEFAULTS = (False, None, None, None, None)

FIELD_INDEX: dict[str, int] = {name: index for index, name in enumerate(RECORD_FIELDS)}
"""The row index of each :class:`TaskRecord` field."""

FORMAT = 2
"""The version of the message and snapshot format. Format 2 added the fields of control of running work
(``cancel_requested``, progress, ``group_id``) and groups; format 1 messages and snapshots are read with the
new fields' defaults. A reader skips messages of any other version."""

Row: TypeAlias = tuple[Any, ...]
"""A stored task: :data:`ROW_LENGTH` values (see the module docstring)."""

Op: TypeAlias = list[Any]
"""One change of a transaction:

- ``["n", id, row]``: store ``row`` as the task ``id`` (new, or replacing the stored one);
- ``["u", id, {index: value, ...}]``: set some values of the stored row ``id``;
- ``["d", id]``: delete the task ``id``;
- ``["w", key, until]``: the uniqueness window ``key`` ends at ``until`` (``None``: forget it);
- ``["b", name, tokens, at, refused]``: the rate bucket of task ``name`` (``tokens`` ``None``: unused);
- ``["p", queue, paused]``: pause (``1``) or resume (``0``) ``queue``;
- ``["g", id, group]``: store the group ``id`` (see :func:`group_of`);
- ``["gd", id]``: delete the group ``id``;
- ``["gm", id, index, state, result]``: member ``index`` of group ``id`` ended in ``state`` (``result`` is
  stored in its slot when ``state`` is ``succeeded``);
- ``["go", id, outcome, finished_at, then_id]``: the group ``id`` is final.
"""

Group: TypeAlias = list[Any]
"""A stored group: ``[id, task_ids, then, created_at, meta, outcome, finished_at, then_id, results, ended]``
(``then`` a task as :func:`task_fields` stores it, or ``None``; ``results`` each member's result; ``ended``
each member's last final state, ``None`` until it ended)."""

(G_ID, G_TASK_IDS, G_THEN, G_CREATED_AT, G_META, G_OUTCOME, G_FINISHED_AT, G_THEN_ID, G_RESULTS,
 G_ENDED) = range(10)  # fmt: skip
_GROUP_LENGTH = 10


# -- values --------------------------------------------------------------------------------------------------


def encode_value(value: Any) -> Any:
    """``value`` as JSON-ready data: bytes become ``{"b": base64}``, lists are walked."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list | tuple):
        return [encode_value(item) for item in value]
    return value


def decode_value(value: Any) -> Any:
    """The inverse of :func:`encode_value` (anything it does not recognise is returned as it is)."""
    if isinstance(value, dict):
        data = value.get("b")
        if isinstance(data, str) and len(value) == 1:
            try:
                return base64.b64decode(data, validate=True)
            except ValueError:
                return value
        return value
    if isinstance(value, list):
        return [decode_value(item) for item in value]
    return value


def _encode_row(row: Sequence[Any]) -> list[Any]:
    return [encode_value(value) for value in row]


def _decode_row(row: Any, version: int = FORMAT) -> Row | None:
    if version == 1 and isinstance(row, list) and len(row) == _V1_ROW_LENGTH:
        row = row[:_V1_TOKEN] + list(_ADDED_DEFAULTS) + row[_V1_TOKEN:]
    if not isinstance(row, list) or len(row) != ROW_LENGTH or not isinstance(row[ID], str):
        return None
    return tuple(decode_value(value) for value in row)


# -- rows ----------------------------------------------------------------------------------------------------


def new_row(task: NewTask, order: int) -> list[Any]:
    """The row of a freshly stored task: pending, never claimed."""
    return [
        task.id,
        task.name,
        task.queue,
        bytes(task.payload),
        "pending",
        0,
        task.max_retries,
        task.timeout,
        task.enqueued_at,
        task.run_at,
        None,
        None,
        None,
        None,
        None,
        task.meta,
        task.priority,
        task.concurrency_key,
        task.expires_at,
        False,
        None,
        None,
        None,
        task.group_id,
        None,
        None,
        order,
    ]


def follow_up_of(task: NewTask) -> list[Any]:
    """What a row keeps of a debounced task that waits for the running attempt (see
    :func:`follow_up_task`)."""
    return [
        task.name,
        task.queue,
        bytes(task.payload),
        task.max_retries,
        task.timeout,
        task.enqueued_at,
        task.run_at,
        task.meta,
        task.priority,
        task.concurrency_key,
        task.expires_at,
    ]


def follow_up_task(task_id: str, stored: Any) -> NewTask | None:
    """The follow-up stored in a row, or ``None`` when there is none (or it cannot be read)."""
    if not isinstance(stored, list) or len(stored) != 11:
        return None
    name, queue, payload, max_retries, timeout, enqueued_at, run_at, meta, priority, key, expires_at = stored
    return NewTask(
        id=task_id,
        name=name,
        queue=queue,
        payload=payload,
        max_retries=max_retries,
        timeout=timeout,
        enqueued_at=enqueued_at,
        run_at=run_at,
        meta=meta,
        priority=priority,
        concurrency_key=key,
        expires_at=expires_at,
    )


def task_fields(task: NewTask) -> list[Any]:
    """A whole :class:`NewTask` as stored in a group (its ``then``); read back by :func:`task_of`."""
    return [task.id, task.group_id, *follow_up_of(task)]


def task_of(stored: Any) -> NewTask | None:
    """The task :func:`task_fields` stored, or ``None`` (none, or not readable)."""
    if not isinstance(stored, list) or len(stored) != 13 or not isinstance(stored[0], str):
        return None
    task = follow_up_task(stored[0], stored[2:])
    if task is None:
        return None
    group_id = stored[1]
    return task if group_id is None else replace(task, group_id=group_id)


def new_group(group: NewGroup) -> Group:
    """The stored form of a freshly stored group."""
    count = len(group.members)
    return [
        group.id,
        [member.id for member in group.members],
        None if group.then is None else task_fields(group.then),
        group.created_at,
        group.meta,
        None,
        None,
        None,
        [None] * count,
        [None] * count,
    ]


def copy_group(group: Group) -> Group:
    """A copy of ``group`` whose slots can change without changing ``group``."""
    copied = list(group)
    copied[G_RESULTS] = list(group[G_RESULTS])
    copied[G_ENDED] = list(group[G_ENDED])
    return copied


def _decode_group(group: Any) -> Group | None:
    if (
        not isinstance(group, list)
        or len(group) != _GROUP_LENGTH
        or not isinstance(group[G_ID], str)
        or not isinstance(group[G_TASK_IDS], list)
        or not all(isinstance(task_id, str) for task_id in group[G_TASK_IDS])
        or not isinstance(group[G_RESULTS], list)
        or not isinstance(group[G_ENDED], list)
        or not len(group[G_TASK_IDS]) == len(group[G_RESULTS]) == len(group[G_ENDED])
    ):
        return None
    return [decode_value(value) for value in group]


def record_of(row: Sequence[Any]) -> TaskRecord:
    """The record a row holds; a value it cannot read is named in the record's ``fault``."""
    return record_from_row(row[:TOKEN])


# -- log messages --------------------------------------------------------------------------------------------


def encode_parts(ops: Iterable[Op], limit: int) -> list[bytes]:
    """The bodies of the log messages of a transaction: its ops as one JSON document, cut into pieces of at
    most ``limit`` bytes (one piece, mostly; a transaction larger than a message is read back once its last
    piece is read: see ``Part``)."""
    ops_json = b",".join(json.dumps(_encode_op(op), separators=(",", ":")).encode() for op in ops)
    document = b'{"v":%d,"ops":[%s]}' % (FORMAT, ops_json)
    return [document[start : start + limit] for start in range(0, len(document), limit)] or [document]


def _encode_op(op: Op) -> list[Any]:
    kind = op[0]
    if kind == "n":
        return ["n", op[1], _encode_row(op[2])]
    if kind == "u":
        return ["u", op[1], {str(index): encode_value(value) for index, value in op[2].items()}]
    if kind == "g" or kind == "gm":
        return encode_value(op)  # type: ignore[no-any-return]
    return op


def decode_message(data: bytes) -> list[Op] | None:
    """The ops of a transaction's document, or ``None`` for one this version does not read (another format,
    or not a transaction at all): it is skipped."""
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("ops"), list):
        return None
    version = message.get("v")
    if version not in (1, FORMAT):
        return None
    return [op for op in (_decode_op(op, version) for op in message["ops"]) if op is not None]


def _decode_op(op: Any, version: int) -> Op | None:
    if not isinstance(op, list) or not op:
        return None
    kind = op[0]
    if kind == "n" and len(op) == 3 and isinstance(op[1], str):
        row = _decode_row(op[2], version)
        return None if row is None or row[ID] != op[1] else ["n", op[1], row]
    if kind == "u" and len(op) == 3 and isinstance(op[1], str) and isinstance(op[2], dict):
        changes: dict[int, Any] = {}
        length = ROW_LENGTH if version == FORMAT else _V1_ROW_LENGTH
        for key, value in op[2].items():
            if not key.isdigit() or not 0 < int(key) < length:  # the id never changes
                return None
            index = int(key)
            if version == 1 and index >= _V1_TOKEN:
                index += _ADDED
            changes[index] = decode_value(value)
        return ["u", op[1], changes]
    if version == 1:
        return _decode_other(op, kind)
    if kind == "g" and len(op) == 3 and isinstance(op[1], str):
        group = _decode_group(op[2])
        return None if group is None or group[G_ID] != op[1] else ["g", op[1], group]
    if kind == "gd" and len(op) == 2 and isinstance(op[1], str):
        return op
    if kind == "gm" and len(op) == 5 and isinstance(op[1], str) and type(op[2]) is int and op[2] >= 0:
        return ["gm", op[1], op[2], op[3], decode_value(op[4])]
    if kind == "go" and len(op) == 5 and isinstance(op[1], str):
        return op
    return _decode_other(op, kind)


def _decode_other(op: list[Any], kind: Any) -> Op | None:
    if kind == "d" and len(op) == 2 and isinstance(op[1], str):
        return op
    if kind == "w" and len(op) == 3 and isinstance(op[1], str) and _number_or_none(op[2]):
        return op
    if kind == "b" and len(op) == 5 and isinstance(op[1], str) and type(op[4]) is int:
        return op if _number_or_none(op[2]) and _number_or_none(op[3]) else None
    if kind == "p" and len(op) == 3 and isinstance(op[1], str) and op[2] in (0, 1):
        return op
    return None


def _number_or_none(value: Any) -> bool:
    return value is None or (type(value) in (int, float))


# -- snapshots -----------------------------------------------------------------------------------------------


def encode_snapshot(
    seq: int,
    rows: Iterable[Row],
    windows: dict[str, float],
    buckets: dict[str, tuple[float | None, float | None, int]],
    paused: Iterable[str],
    groups: Iterable[Group] = (),
) -> bytes:
    """The whole state as of log sequence ``seq``, as one document (cut into messages by the caller)."""
    document = {
        "v": FORMAT,
        "seq": seq,
        "rows": [_encode_row(row) for row in rows],
        "windows": windows,
        "buckets": {name: list(bucket) for name, bucket in buckets.items()},
        "paused": sorted(paused),
        "groups": [encode_value(group) for group in groups],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode_snapshot(
    data: bytes,
) -> tuple[
    int,
    Iterator[Row],
    dict[str, float],
    dict[str, tuple[float | None, float | None, int]],
    set[str],
    list[Group],
]:
    """``(seq, rows, windows, buckets, paused, groups)`` of a snapshot (format 1 or 2: a format 1 snapshot
    has no groups, and its rows get the later fields' defaults); ``ValueError`` when it cannot be read."""
    document = json.loads(data)
    if (
        not isinstance(document, dict)
        or document.get("v") not in (1, FORMAT)
        or type(document.get("seq")) is not int
    ):
        raise ValueError("not a snapshot of this format")
    version: int = document["v"]
    rows = (row for row in (_decode_row(row, version) for row in document["rows"]) if row is not None)
    buckets = {name: (value[0], value[1], value[2]) for name, value in document["buckets"].items()}
    groups = [group for group in map(_decode_group, document.get("groups", ())) if group is not None]
    return document["seq"], rows, dict(document["windows"]), buckets, set(document["paused"]), groups
