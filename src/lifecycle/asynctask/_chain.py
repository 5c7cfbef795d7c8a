"""Chains: steps run one after the other, each enqueued atomically with the previous step's success.

A chain is stored as its steps' task records, nothing else. Step ``i`` has the id ``"<chain id>.<i>"`` and
carries in its ``meta`` the chain id, its index, the names of all steps, the not-yet-enqueued later steps
(already encoded) and the previous step's encoded result. When step ``i`` succeeds, the worker's success
:class:`Settlement` holds step ``i + 1`` in ``then``: the backend stores it in the same atomic step, so a
chain never stalls between two steps and a step run twice (at-least-once delivery) never enqueues its
successor twice (the successor's id is fixed). A dead or cancelled step enqueues nothing: the chain stops.

The user's metadata (the ``"user"`` meta section) goes on from step to step: a step's is the previous
step's, updated with the ``meta`` of its own :class:`Call`.
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
from ._enqueue import build_task, check_calls
from ._meta import USER, read_meta, read_user_meta, write_meta
from ._model import Call, ChainInfo, ChainStep
from ._records import NewTask, TaskRecord, TaskState
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
    calls: Sequence[Call], now: float, registry: Registry, encoding: Encoding
) -> tuple[str, NewTask]:
    """The chain id and its first step, every call checked like an enqueue (``TypeError``/``ValueError``)."""
    items = check_calls(calls)
    if not items:
        raise ValueError("enqueue_chain() needs at least one Call: enqueue_chain([Call(a), Call(b), ...])")
    for index, call in enumerate(items):
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
    tasks = [build_task(call, now, registry, encoding) for call in items]
    chain_id = f"{CHAIN_PREFIX}{uuid.uuid4().hex}"
    names = [task.name for task in tasks]
    rest = [_spec(call, task) for call, task in zip(items[1:], tasks[1:], strict=True)]
    own = read_user_meta(tasks[0].meta)
    carried = {USER: own} if own else {}
    first = replace(
        tasks[0],
        id=step_id(chain_id, 0),
        meta=_step_meta(chain_id, 0, names, rest, previous=None, **carried),
    )
    return chain_id, first


def follow_up(record: TaskRecord, result: bytes | None, now: float) -> tuple[NewTask, ...]:
    """The next step to enqueue with the success of ``record`` (none when it is not a chain step, or the last
    one). ``ValueError`` when the chain bookkeeping in ``meta`` is damaged."""
    meta = read_meta(record.meta)
    section = meta.get("chain")
    if section is None:
        return ()
    # The enqueuer's trace context goes on with the chain (a traced worker replaces it with its own span's).
    carried = {key: meta[key] for key in _CARRIED if key in meta}
    try:
        chain_id = str(section["id"])
        index = int(section["step"])
        names = [str(name) for name in section["names"]]
        rest = list(section["rest"])
        if not rest:
            return ()
        spec = rest[0]
        run_at = now
        if spec.get("at") is not None:
            run_at = as_epoch(float(spec["at"]), "chain step at")
        elif spec.get("delay") is not None:
            run_at = now + check_seconds(float(spec["delay"]), "chain step delay", allow_zero=True)
        previous = None if result is None else base64.b64encode(result).decode("ascii")
        expires_at = None
        if spec.get("expires_at") is not None:
            expires_at = float(spec["expires_at"])
        elif spec.get("expires") is not None:
            expires_at = now + float(spec["expires"])
        key = spec.get("concurrency_key")
        user = {**read_user_meta(record.meta), **_user_items(spec.get("meta"))}
        if user:
            carried[USER] = user
        step = NewTask(
            id=_text(step_id(chain_id, index + 1)),
            name=_text(str(spec["name"])),
            queue=_text(str(spec["queue"])),
            payload=base64.b64decode(spec["payload"]),
            max_retries=int(spec["max_retries"]),
            timeout=None if spec.get("timeout") is None else float(spec["timeout"]),
            enqueued_at=now,
            run_at=run_at,
            meta=_step_meta(chain_id, index + 1, names, rest[1:], previous=previous, **carried),
            priority=int(spec.get("priority", 0)),
            concurrency_key=None if key is None else _text(str(key)),
            expires_at=expires_at,
        )
    except Exception as exc:  # whatever is wrong with it (a missing key, a wrong type, bad base64, ...)
        raise ValueError(f"the chain bookkeeping of task {record.id} is damaged ({exc!r})") from None
    return (step,)


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
) -> tuple[ChainInfo, TaskRecord] | None:
    """The chain's progress and the record of the step it is at, or ``None`` when its first step's record is
    not there (never stored, or removed by retention)."""
    first = await backend.get(step_id(chain_id, 0))
    if first is None:
        return None
    try:
        names = [str(name) for name in read_meta(first.meta)["chain"]["names"]]
    except Exception:  # damaged bookkeeping: not readable as a chain
        return None
    records: list[TaskRecord] = [first]
    for index in range(1, len(names)):
        # Steps are enqueued in order, so the first missing one ends the walk.
        record = await backend.get(step_id(chain_id, index))
        if record is None:
            break
        records.append(record)
    last = records[-1]
    current = len(records) - 1
    state = last.state
    result: Any = None
    if state is TaskState.SUCCEEDED:
        if current < len(names) - 1:  # only seen if the next step's record was removed meanwhile
            state, current = TaskState.PENDING, current + 1
        elif last.result is not None:
            try:
                result = decode(last.result)
            except Exception:  # an undecodable result reads as None, as in TaskInfo
                result = None
    steps = tuple(
        ChainStep(
            index=index,
            name=name,
            task_id=step_id(chain_id, index),
            state=records[index].state if index < len(records) else None,
            last_error=records[index].last_error if index < len(records) else None,
        )
        for index, name in enumerate(names)
    )
    return ChainInfo(id=chain_id, state=state, current=current, steps=steps, result=result), last


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
    **carried: Any,
) -> str:
    chain = {"id": chain_id, "step": index, "names": names, "rest": rest, "prev": previous}
    return write_meta(chain=chain, **carried)
