"""Groups: calls run in parallel, with a ``then`` task stored exactly once when every member succeeded.

A group is stored by the backend as one record plus its members' task records (each with ``group_id``), in
one atomic step (:meth:`Backend.enqueue_group`). Member ``n`` has the id ``"<group id>.<n>"``; ``then`` has
``"<group id>.then"`` and the meta section ``after_group`` naming the group, from which the worker reads the
members' results (:attr:`GroupRecord.results`, kept with the group) as the task's ``previous_result``. The
fan-in happens in the backend, in the same atomic step as the last member's success: no process has to be
alive for it, and a verdict saved twice or by a worker that lost its lease changes nothing, so ``then`` is
stored once whatever crashes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace

from ._encoding import Encoding
from ._enqueue import build_task
from ._meta import read_meta, write_meta
from ._model import Call, GroupInfo
from ._records import GroupRecord, NewGroup, NewTask, TaskRecord, TaskState
from ._registry import Registry

__all__ = [
    "GROUP_PREFIX",
    "after_group",
    "build_group",
    "check_group_calls",
    "group_info",
    "group_state",
    "member_id",
    "then_id",
]

GROUP_PREFIX = "group-"


def member_id(group_id: str, index: int) -> str:
    """The task id of member ``index`` of the group ``group_id``."""
    return f"{group_id}.{index}"


def then_id(group_id: str) -> str:
    """The task id of the ``then`` task of the group ``group_id`` (a standalone group's)."""
    return f"{group_id}.then"


def check_group_calls(calls: Iterable[Call], where: str) -> list[Call]:
    """``calls`` as a non-empty list of :class:`Call`, none with options a group cannot honour."""
    if isinstance(calls, Call):
        raise TypeError(f"{where} takes a list of Call objects: [Call(f, 1), Call(f, 2)]")
    items = list(calls)
    if not items:
        raise ValueError(f"{where} needs at least one Call: [Call(f, 1), Call(f, 2), ...]")
    for index, item in enumerate(items):
        if not isinstance(item, Call):
            raise TypeError(
                f"{where} takes Call objects, got {item!r} at index {index}; write Call(fn, *args)"
            )
        check_member_call(item, f"{where}: member {index} ({item!r})")
    return items


def check_member_call(call: Call, where: str) -> None:
    """Refuse the options the engine sets itself for a member or a ``then`` (``TypeError``)."""
    if call.task_id is not None:
        raise TypeError(
            f"{where} has task_id={call.task_id!r}; members of a group get their ids from the group "
            '("<group id>.<index>"): drop task_id'
        )
    for option in ("unique_for", "debounce"):
        if getattr(call, option) is not None:
            raise TypeError(f"{where} has {option}=; a group stores each member once: drop {option}")


def build_group(
    calls: Iterable[Call], then: Call | None, now: float, registry: Registry, encoding: Encoding
) -> NewGroup:
    """The group of ``calls`` with its ``then``, every call checked like an enqueue."""
    items = check_group_calls(calls, "enqueue_group()")
    if then is not None:
        if not isinstance(then, Call):
            raise TypeError(f"enqueue_group(): then must be a Call or None, got {then!r}")
        check_member_call(then, f"enqueue_group(): then ({then!r})")
    group_id = f"{GROUP_PREFIX}{uuid.uuid4().hex}"
    members = tuple(
        replace(build_task(call, now, registry, encoding), id=member_id(group_id, index), group_id=group_id)
        for index, call in enumerate(items)
    )
    then_task = None
    if then is not None:
        task = build_task(then, now, registry, encoding)
        then_task = replace(task, id=then_id(group_id), meta=write_meta(after_group=group_id))
    return NewGroup(id=group_id, members=members, then=then_task, created_at=now)


def after_group(record: TaskRecord | NewTask) -> str | None:
    """The id of the group whose results ``record`` receives as ``previous_result`` (its ``then``), or
    ``None``."""
    try:
        value = read_meta(record.meta).get("after_group")
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def group_state(group: GroupRecord) -> TaskState:
    """The group's state as :class:`GroupInfo` shows it: its outcome once final, else ``active`` once a
    member started (runs, or ended), else ``pending``."""
    if group.outcome is not None:
        return TaskState(group.outcome)
    started = any(count for state, count in group.counts.items() if TaskState(state) is not TaskState.PENDING)
    return TaskState.ACTIVE if started else TaskState.PENDING


def group_info(group: GroupRecord) -> GroupInfo:
    """The public view of a stored group."""
    counts = dict.fromkeys(TaskState, 0)
    for state, count in group.counts.items():
        counts[TaskState(state)] += count
    return GroupInfo(
        id=group.id,
        state=group_state(group),
        counts=counts,
        task_ids=tuple(group.task_ids),
        then_id=group.then_id,
    )
