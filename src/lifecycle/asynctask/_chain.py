"""Chains: steps run one after the other, each enqueued atomically with the previous step's success.

A chain is stored as its steps' task records, nothing else. Step ``i`` has the id ``"<chain id>.<i>"`` and
carries in its ``meta`` the chain id, its index, the names of all steps, the not-yet-enqueued later steps
(already encoded) and the previous step's encoded result. When step ``i`` succeeds, the worker's success
:class:`Settlement` holds step ``i + 1`` in ``then``: the backend stores it in the same atomic step, so a
chain never stalls between two steps and a step run twice (at-least-once delivery) never enqueues its
successor twice (the successor's id is fixed). A dead or cancelled step enqueues nothing: the chain stops.

A step may be a :class:`Group`: its success-time settlement then carries the group in ``then_groups`` (id
``"<chain id>.<i>"``, members ``"<chain id>.<i>.<n>"``, each with the previous step's result), with the step
after it as the group's ``then`` (meta ``after_group``, so it receives the members' results). Members carry
``"member"`` in their chain section and never move the chain themselves. The chain section lists the indices
of its group steps in ``"groups"``.

The user's metadata (the ``"user"`` meta section) goes on from step to step: a step's is the previous
step's, updated with the ``meta`` of its own :class:`Call`. A group step's members each get the metadata the
chain carries into the group, updated with their own ``Call``'s; the step after the group gets that same
carried metadata updated with its own (what members add stays with them: they are parallel branches, and no
one member's metadata is the group's).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from .._checks import check_seconds
from ._backend import Backend
from ._clock import as_epoch
from ._encoding import Encoding
from ._enqueue import build_task
from ._group import check_group_calls, group_state, member_id
from ._meta import USER, add_sections, read_meta, read_user_meta, with_user_meta, write_meta
from ._model import Call, ChainInfo, ChainStep, Group
from ._records import GroupRecord, NewGroup, NewTask, TaskRecord, TaskState
from ._registry import Registry

__all__ = [
    "CHAIN_PREFIX",
    "build_chain",
    "chain_fields",
    "chain_progress",
    "follow_up",
    "previous_result",
    "step_id",
]

CHAIN_PREFIX = "chain-"

_CARRIED = ("trace",)
"""Meta sections a step passes on to the next one."""


def step_id(chain_id: str, index: int) -> str:
    """The task id of step ``index`` of the chain ``chain_id``."""
    return f"{chain_id}.{index}"


def build_chain(
    calls: Sequence[Call | Group], now: float, registry: Registry, encoding: Encoding
) -> tuple[str, NewTask | NewGroup]:
    """The chain id and its first step (a task, or a group), every call checked like an enqueue
    (``TypeError``/``ValueError``)."""
    if isinstance(calls, Call | Group):
        raise TypeError("enqueue_chain() takes a list of steps (Call or Group objects), not one step")
    items = list(calls)
    if not items:
        raise ValueError("enqueue_chain() needs at least one Call: enqueue_chain([Call(a), Call(b), ...])")
    for index, item in enumerate(items):
        if isinstance(item, Group):
            check_group_calls(item.calls, f"enqueue_chain(): step {index} (a Group)")
            if index > 0 and isinstance(items[index - 1], Group):
                raise ValueError(
                    f"enqueue_chain(): steps {index - 1} and {index} are both groups; put a Call between two "
                    "groups (it receives the first group's results and can return what the second needs)"
                )
            continue
        if not isinstance(item, Call):
            raise TypeError(
                f"enqueue_chain() takes Call objects (or Group objects), got {item!r} at step {index}; write "
                "Call(fn, *args)"
            )
        call = item
        for option in ("unique_for", "debounce"):
            if getattr(call, option) is not None:
                raise TypeError(
                    f"enqueue_chain(): step {index} ({call!r}) has {option}=; chain steps are each enqueued "
                    f"once, by the chain: drop {option}"
                )
        if call.task_id is not None:
            raise TypeError(
                f"enqueue_chain(): step {index} ({call!r}) has task_id={call.task_id!r}; chain steps get "
                'their ids from the chain ("<chain id>.<index>"): drop task_id'
            )
    built: list[NewTask | list[NewTask]] = [
        [build_task(call, now, registry, encoding) for call in item.calls]
        if isinstance(item, Group)
        else build_task(item, now, registry, encoding)
        for item in items
    ]
    chain_id = f"{CHAIN_PREFIX}{uuid.uuid4().hex}"
    names = [_group_name(step) if isinstance(step, list) else step.name for step in built]
    groups = [index for index, item in enumerate(items) if isinstance(item, Group)]
    rest = [_step_spec(item, step) for item, step in zip(items[1:], built[1:], strict=True)]
    first = built[0]
    if isinstance(first, list):
        return chain_id, _group_step(
            chain_id, 0, first, names, groups, rest, previous=None, now=now, carried={}, user={}
        )
    meta = _step_meta(chain_id, 0, names, rest, previous=None, groups=groups, **_user_section(first.meta))
    return chain_id, replace(first, id=step_id(chain_id, 0), meta=meta)


def _group_name(members: list[NewTask]) -> str:
    return f"group of {len(members)} ({', '.join(dict.fromkeys(task.name for task in members))})"


def _step_spec(item: Call | Group, step: NewTask | list[NewTask]) -> dict[str, Any]:
    if isinstance(item, Group):
        assert isinstance(step, list)
        return {"group": [_spec(call, task) for call, task in zip(item.calls, step, strict=True)]}
    assert isinstance(step, NewTask)
    return _spec(item, step)


def _group_step(
    chain_id: str,
    index: int,
    members: list[NewTask],
    names: list[str],
    groups: list[int],
    rest: list[dict[str, Any]],
    *,
    previous: str | None,
    now: float,
    carried: dict[str, Any],
    user: dict[str, str],
) -> NewGroup:
    """Step ``index`` as a group of ``members``, with the step after it (``rest[0]``) as its ``then``.

    ``user`` is the user metadata the chain carries into the group: each member gets it updated with its
    own (``members[n].meta``), and the ``then`` updated with its spec's."""
    group_id = step_id(chain_id, index)
    stored = tuple(
        replace(
            task,
            id=member_id(group_id, n),
            group_id=group_id,
            meta=_step_meta(
                chain_id,
                index,
                names,
                [],
                previous=previous,
                groups=groups,
                member=n,
                **carried,
                **_user_section(None, {**user, **read_user_meta(task.meta)}),
            ),
        )
        for n, task in enumerate(members)
    )
    then = None
    if rest:
        then_user = _user_section(None, {**user, **_user_items(rest[0].get("meta"))})
        meta = _step_meta(
            chain_id, index + 1, names, rest[1:], previous=None, groups=groups, **carried, **then_user
        )
        then = _task_from_spec(
            rest[0], step_id(chain_id, index + 1), add_sections(meta, after_group=group_id), now
        )
    group_meta = write_meta(chain={"id": chain_id, "step": index, "names": names, "groups": groups})
    return NewGroup(id=group_id, members=stored, then=then, created_at=now, meta=group_meta)


def _task_from_spec(spec: dict[str, Any], task_id: str, meta: str | None, now: float) -> NewTask:
    """A later step (or a member of a group step) stored from its spec, at ``now``."""
    run_at = now
    if spec.get("at") is not None:
        run_at = as_epoch(float(spec["at"]), "chain step at")
    elif spec.get("delay") is not None:
        run_at = now + check_seconds(float(spec["delay"]), "chain step delay", allow_zero=True)
    expires_at = None
    if spec.get("expires_at") is not None:
        expires_at = float(spec["expires_at"])
    elif spec.get("expires") is not None:
        expires_at = now + float(spec["expires"])
    key = spec.get("concurrency_key")
    return NewTask(
        id=_text(task_id),
        name=_text(str(spec["name"])),
        queue=_text(str(spec["queue"])),
        payload=base64.b64decode(spec["payload"]),
        max_retries=int(spec["max_retries"]),
        timeout=None if spec.get("timeout") is None else float(spec["timeout"]),
        enqueued_at=now,
        run_at=run_at,
        meta=meta,
        priority=int(spec.get("priority", 0)),
        concurrency_key=None if key is None else _text(str(key)),
        expires_at=expires_at,
    )


def follow_up(
    record: TaskRecord, result: bytes | None, now: float
) -> tuple[tuple[NewTask, ...], tuple[NewGroup, ...]]:
    """The next step to store with the success of ``record``: a task, or a group (none when it is not a chain
    step, the last one, or a member of a group step). ``ValueError`` when the chain bookkeeping in ``meta``
    is damaged."""
    meta = read_meta(record.meta)
    section = meta.get("chain")
    if section is None:
        return (), ()
    # The enqueuer's trace context goes on with the chain (a traced worker replaces it with its own span's).
    carried = {key: meta[key] for key in _CARRIED if key in meta}
    try:
        if section.get("member") is not None:  # the group's fan-in moves the chain, not its members
            return (), ()
        chain_id = str(section["id"])
        index = int(section["step"])
        names = [str(name) for name in section["names"]]
        groups = [int(step) for step in section.get("groups", [])]
        rest = list(section["rest"])
        if not rest:
            return (), ()
        spec = rest[0]
        previous = None if result is None else base64.b64encode(result).decode("ascii")
        user = read_user_meta(record.meta)
        if "group" in spec:
            members = [  # ids and meta are set by _group_step (from each member's own user metadata here)
                _task_from_spec(member, "", with_user_meta(None, _user_items(member.get("meta"))), now)
                for member in spec["group"]
            ]
            group = _group_step(
                chain_id,
                index + 1,
                members,
                names,
                groups,
                rest[1:],
                previous=previous,
                now=now,
                carried=carried,
                user=user,
            )
            return (), (group,)
        step_meta = _step_meta(
            chain_id,
            index + 1,
            names,
            rest[1:],
            previous=previous,
            groups=groups,
            **carried,
            **_user_section(None, {**user, **_user_items(spec.get("meta"))}),
        )
        step = _task_from_spec(spec, step_id(chain_id, index + 1), step_meta, now)
    except Exception as exc:  # whatever is wrong with it (a missing key, a wrong type, bad base64, ...)
        raise ValueError(f"the chain bookkeeping of task {record.id} is damaged ({exc!r})") from None
    return (step,), ()


def _text(value: str) -> str:
    """``value``, refused (``ValueError``) when no backend could store it: damaged bookkeeping must make
    its step dead, not block the saving of the verdicts around it."""
    if "\x00" in value:
        raise ValueError(f"{value!r} holds a NUL character")
    value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return value


def _user_items(value: object) -> dict[str, str]:
    """A step spec's ``meta`` (``ValueError`` when it is not a mapping of text, as no enqueue stores)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise ValueError(f"the step's meta is not a mapping of str to str: {value!r}")
    return {_text(key): _text(item) for key, item in value.items()}


def _user_section(meta: str | None, items: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"user": ...}`` to pass to :func:`_step_meta`: ``items``, or else the user metadata in ``meta``
    (``{}`` when there is none)."""
    user = read_user_meta(meta) if items is None else items
    return {USER: user} if user else {}


def previous_result(record: TaskRecord) -> bytes | None:
    """The encoded result of the previous step of a chain, or ``None``."""
    try:
        section = read_meta(record.meta).get("chain")
        previous = None if not isinstance(section, dict) else section.get("prev")
        return None if previous is None else base64.b64decode(previous)
    except Exception:  # damaged bookkeeping (a wrong type, bad base64): no previous result
        return None


def chain_fields(record: TaskRecord) -> tuple[str | None, int | None, str | None]:
    """``(chain_id, chain_step, schedule name)`` from a record's meta (``None`` where absent or damaged)."""
    try:
        meta = read_meta(record.meta)
    except ValueError:
        return None, None, None
    chain = meta.get("chain")
    schedule = meta.get("schedule")
    chain_id = chain_step = schedule_name = None
    if isinstance(chain, dict) and "id" in chain and "step" in chain:
        try:
            chain_id, chain_step = str(chain["id"]), int(chain["step"])
        except (TypeError, ValueError, OverflowError):  # damaged bookkeeping: shown as no chain
            chain_id = chain_step = None
    if isinstance(schedule, dict) and "name" in schedule:
        schedule_name = str(schedule["name"])
    return chain_id, chain_step, schedule_name


async def chain_progress(
    backend: Backend, chain_id: str, decode: Callable[[bytes], Any]
) -> tuple[ChainInfo, TaskRecord | None] | None:
    """The chain's progress and the record of the step it is at (for a group step, its first member's;
    ``None`` when that is gone), or ``None`` when its first step is not there (never stored, or removed by
    retention)."""
    get_group: Callable[[str], Any] | None = getattr(backend, "get_group", None)
    first_id = step_id(chain_id, 0)
    first: TaskRecord | GroupRecord | None = await backend.get(first_id)
    if first is None and get_group is not None:
        first = await get_group(first_id)
    if first is None:
        return None
    try:
        section = read_meta(first.meta)["chain"]
        names = [str(name) for name in section["names"]]
        groups = {int(step) for step in section.get("groups", [])}
    except Exception:  # damaged bookkeeping: not readable as a chain
        return None

    async def read_step(index: int) -> TaskRecord | GroupRecord | None:
        if index in groups:
            return None if get_group is None else await get_group(step_id(chain_id, index))
        return await backend.get(step_id(chain_id, index))

    stored: list[TaskRecord | GroupRecord] = [first]
    for index in range(1, len(names)):
        # Steps are enqueued in order, so the first missing one ends the walk.
        found = await read_step(index)
        if found is None:
            break
        stored.append(found)
    # The reads are one after another, not one snapshot: a step read while it ran may have succeeded (and
    # its successor run) before the next read. A later step exists only once the one before it succeeded,
    # so a step before the last that read as unfinished is read again, after the later read: what it shows
    # then is at least as new as the last step's record (found on a busy machine, where a whole group and
    # the step after it finished between two reads).
    for index in range(len(stored) - 1):
        if not _step_state(stored[index]).is_final:
            again = await read_step(index)
            if again is not None:
                stored[index] = again
    last = stored[-1]
    current = len(stored) - 1
    state = _step_state(last)
    result: Any = None
    if state is TaskState.SUCCEEDED:
        if current < len(names) - 1:  # only seen if the next step's record was removed meanwhile
            state, current = TaskState.PENDING, current + 1
        else:
            result = _step_result(last, decode)
    steps = tuple(
        ChainStep(
            index=index,
            name=name,
            task_id=step_id(chain_id, index),
            state=_step_state(stored[index]) if index < len(stored) else None,
            last_error=_step_error(stored[index]) if index < len(stored) else None,
        )
        for index, name in enumerate(names)
    )
    chain = ChainInfo(id=chain_id, state=state, current=current, steps=steps, result=result)
    if isinstance(last, TaskRecord):
        return chain, last
    return chain, await backend.get(last.task_ids[0]) if last.task_ids else None


def _step_error(step: TaskRecord | GroupRecord) -> str | None:
    return step.last_error if isinstance(step, TaskRecord) else None


def _step_state(step: TaskRecord | GroupRecord) -> TaskState:
    return step.state if isinstance(step, TaskRecord) else group_state(step)


def _step_result(step: TaskRecord | GroupRecord, decode: Callable[[bytes], Any]) -> Any:
    """A finished step's result (a group's: the list of its members' results); undecodable reads as None."""
    encoded = [step.result] if isinstance(step, TaskRecord) else list(step.results)
    decoded: list[Any] = []
    for value in encoded:
        try:
            decoded.append(None if value is None else decode(value))
        except Exception:  # an undecodable result reads as None, as in TaskInfo
            decoded.append(None)
    return decoded[0] if isinstance(step, TaskRecord) else decoded


def _spec(call: Call, task: NewTask) -> dict[str, Any]:
    # A later step's delay counts from the previous step's success; its `at` is absolute.
    delay = None
    if call.delay is not None:
        delay = check_seconds(call.delay, f"chain step {task.name!r} delay", allow_zero=True)
    at = None if call.at is None else as_epoch(call.at, f"chain step {task.name!r} at")
    spec: dict[str, Any] = {
        "name": task.name,
        "queue": task.queue,
        "payload": base64.b64encode(task.payload).decode("ascii"),
        "max_retries": task.max_retries,
        "timeout": task.timeout,
        "delay": delay,
        "at": at,
    }
    if task.priority:
        spec["priority"] = task.priority
    if task.concurrency_key is not None:
        spec["concurrency_key"] = task.concurrency_key
    own = read_user_meta(task.meta)
    if own:
        spec["meta"] = own
    # An expiry in seconds counts from the step's enqueue (when the previous step succeeded), like a delay.
    if isinstance(call.expires, datetime):
        spec["expires_at"] = task.expires_at
    elif call.expires is not None and task.expires_at is not None:
        spec["expires"] = task.expires_at - task.enqueued_at
    return spec


def _step_meta(
    chain_id: str,
    index: int,
    names: list[str],
    rest: list[dict[str, Any]],
    *,
    previous: str | None,
    groups: list[int] | None = None,
    member: int | None = None,
    **carried: Any,
) -> str:
    chain: dict[str, Any] = {"id": chain_id, "step": index, "names": names, "rest": rest, "prev": previous}
    if groups:
        chain["groups"] = groups
    if member is not None:
        chain["member"] = member
    return write_meta(chain=chain, **carried)
