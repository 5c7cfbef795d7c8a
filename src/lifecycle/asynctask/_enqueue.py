"""Turning calls into stored tasks: the checks ``enqueue`` makes before anything is stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from .._checks import check_name, check_seconds
from ._clock import as_epoch
from ._encoding import Encoding
from ._model import Call, describe_target
from ._records import NewTask
from ._registry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    Registry,
    TaskDefinition,
    check_max_retries,
    check_queue,
    check_timeout,
)

__all__ = ["build_task", "check_calls", "encode_arguments"]


def build_task(call: Call, now: float, registry: Registry, encoding: Encoding) -> NewTask:
    """The :class:`NewTask` for ``call``, every check done: ``TypeError``/``ValueError`` say what is wrong."""
    target = call.target
    definition: TaskDefinition | None
    if isinstance(target, str):
        check_name(target, "enqueue(): the task name")
        definition = registry.get(target)
        name = target
    else:
        definition = registry.for_function(target)
        if definition is None:
            raise TypeError(
                f"{describe_target(target)} is not registered with this AsyncTasks: decorate it with "
                "@tasks.register (or enqueue it by its registered name)"
            )
        name = definition.name
    where = f"enqueue({name!r})"
    if definition is not None:
        definition.check_arguments(call.args)
    queue = (
        check_queue(call.queue, where)
        if call.queue is not None
        else (definition.queue if definition is not None else DEFAULT_QUEUE)
    )
    if call.max_retries is not None:
        max_retries = check_max_retries(call.max_retries, where)
    else:
        max_retries = definition.max_retries if definition is not None else DEFAULT_MAX_RETRIES
    if call.timeout is not None:
        timeout = check_timeout(call.timeout, where)
    else:
        timeout = definition.timeout if definition is not None else None
    if call.delay is not None and call.at is not None:
        raise TypeError(f"{where}: pass delay= or at=, not both")
    run_at = now
    if call.delay is not None:
        run_at = now + check_seconds(call.delay, f"{where}: delay", allow_zero=True)
    elif call.at is not None:
        run_at = as_epoch(call.at, f"{where}: at")
    task_id = uuid.uuid4().hex if call.task_id is None else check_name(call.task_id, f"{where}: task_id")
    return NewTask(
        id=task_id,
        name=name,
        queue=queue,
        payload=encode_arguments(encoding, name, call.args, definition),
        max_retries=max_retries,
        timeout=timeout,
        enqueued_at=now,
        run_at=run_at,
    )


def encode_arguments(
    encoding: Encoding, name: str, args: tuple[Any, ...], definition: TaskDefinition | None
) -> bytes:
    """The payload of ``args``; a ``TypeError`` naming the first argument that cannot be encoded."""
    try:
        return encoding.encode(args)
    except TypeError as whole:
        for index, arg in enumerate(args):
            try:
                encoding.encode(arg)
            except TypeError as exc:
                names = definition.parameter_names if definition is not None else ()
                which = f"argument {index + 1}" + (f" ({names[index]})" if index < len(names) else "")
                raise TypeError(f"cannot enqueue {name!r}: {which}: {exc}") from None
        raise TypeError(f"cannot enqueue {name!r}: {whole}") from None


def check_calls(calls: Iterable[Call]) -> list[Call]:
    """``calls`` as a list; ``TypeError`` for anything that is not a :class:`Call`."""
    if isinstance(calls, Call):
        raise TypeError("enqueue_many() takes a list of Call objects; for one call use enqueue()")
    items = list(calls)
    for item in items:
        if not isinstance(item, Call):
            raise TypeError(f"enqueue_many() takes Call objects, got {item!r}; write Call(fn, *args)")
    return items
