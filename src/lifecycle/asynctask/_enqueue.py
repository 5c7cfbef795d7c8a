"""Turning calls into stored tasks: the checks ``enqueue`` makes before anything is stored."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from .._checks import check_name, check_seconds
from ._clock import as_epoch
from ._encoding import Encoding
from ._flow import check_concurrency_key, check_priority, expiry_time, unique_key
from ._meta import check_user_meta, with_user_meta
from ._model import Call, describe_target
from ._records import NewTask, new_task
from ._registry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    Registry,
    TaskDefinition,
    check_max_retries,
    check_queue,
    check_timeout,
)

__all__ = [
    "build_plain_task",
    "build_task",
    "build_tasks",
    "check_calls",
    "encode_arguments",
    "if_exists_for",
    "new_task_id",
    "new_task_ids",
]

# The version (4) and variant (RFC 4122) bits of a random UUID, as uuid.uuid4() sets them, byte by byte:
# byte 6 holds the version, byte 8 the variant (each table maps a random byte to that byte with them set).
_UUID4_VERSION_BYTE = bytes(value & 0x0F | 0x40 for value in range(256))
_UUID4_VARIANT_BYTE = bytes(value & 0x3F | 0x80 for value in range(256))


def new_task_id() -> str:
    """A new random task id: ``uuid.uuid4().hex``, made without building a ``UUID`` object. The ids come from
    a pool drawn ``_ID_POOL`` at a time, as :func:`new_task_ids` draws a batch's (one read of the system's
    random source and one hex conversion for the pool: a read per id was a tenth of an engine's single
    enqueue; written out here, so that a refill adds no call); a forked child drops the pool it inherited, so
    parent and child never hand out the same ids."""
    global _next_pooled_id
    try:
        return _next_pooled_id()
    except StopIteration:
        raw = bytearray(os.urandom(16 * _ID_POOL))
        raw[6::16] = raw[6::16].translate(_UUID4_VERSION_BYTE)
        raw[8::16] = raw[8::16].translate(_UUID4_VARIANT_BYTE)
        text = raw.hex()
        starts = range(0, 32 * _ID_POOL, 32)
        _next_pooled_id = map(text.__getitem__, map(slice, starts, range(32, 32 * _ID_POOL + 1, 32))).__next__
        return _next_pooled_id()


_ID_POOL = 64
_next_pooled_id: Callable[[], str] = iter(()).__next__


def _drop_id_pool() -> None:
    global _next_pooled_id
    _next_pooled_id = iter(()).__next__


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_drop_id_pool)


def new_task_ids(count: int) -> Callable[[], str]:
    """A function returning, at each call, one of ``count`` new ids such as :func:`new_task_id` makes (then
    ``StopIteration``), drawn from the system's random source at once: one read of ``16 * count`` bytes
    and one hex conversion for a batch, instead of one each per id."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_UUID4_VERSION_BYTE)
    raw[8::16] = raw[8::16].translate(_UUID4_VARIANT_BYTE)
    text = raw.hex()
    return iter([text[start : start + 32] for start in range(0, 32 * count, 32)]).__next__


def _resolve(target: Callable[..., Any] | str, registry: Registry) -> tuple[str, TaskDefinition | None]:
    """The task name of ``target`` (a registered function, or a name) and its definition (``None`` for a
    name registered only in other processes)."""
    if isinstance(target, str):
        definition = registry.get(target)
        if definition is None or definition.name != target:  # a registered name was checked at register
            check_name(target, "enqueue(): the task name")
        return target, definition
    definition = registry.for_function(target)
    if definition is None:
        raise TypeError(
            f"{describe_target(target)} is not registered with this AsyncTasks: decorate it with "
            "@tasks.register (or enqueue it by its registered name)"
        )
    return definition.name, definition


def build_plain_task(
    target: Callable[..., Any] | str,
    args: tuple[Any, ...],
    now: float,
    registry: Registry,
    encoding: Encoding,
    new_id: Callable[[], str] = new_task_id,
) -> NewTask:
    """What :func:`build_task` makes of ``Call(target, *args)`` without options (the registered defaults, a
    generated id, due now), without building the ``Call`` or looking at each of its options: the common
    single enqueue, whose CPU counts once per call."""
    if type(target) is str:  # what _resolve() does for a name, written out
        definition = registry.get(target)
        if definition is None or definition.name != target:  # a registered name was checked at register
            check_name(target, "enqueue(): the task name")
        return _plain_task(target, definition, args, now, encoding, new_id)
    definition = registry.for_function(target)
    if definition is None:  # not a registered function: _resolve() says what it is instead
        name, definition = _resolve(target, registry)
        return _plain_task(name, definition, args, now, encoding, new_id)
    return _plain_task(definition.name, definition, args, now, encoding, new_id)


def _plain_task(
    name: str,
    definition: TaskDefinition | None,
    args: tuple[Any, ...],
    now: float,
    encoding: Encoding,
    new_id: Callable[[], str],
) -> NewTask:
    """:func:`build_plain_task` once its target is resolved."""
    if definition is None:
        queue, max_retries, timeout, priority = DEFAULT_QUEUE, DEFAULT_MAX_RETRIES, None, 0
    else:
        definition.check_arguments(args)
        queue, max_retries = definition.queue, definition.max_retries
        timeout, priority = definition.timeout, definition.priority
    try:
        payload = encoding.encode(args)
    except TypeError:  # encoded again, to name the argument at fault
        payload = encode_arguments(encoding, name, args, definition)
    return new_task(
        new_id(), name, queue, payload, max_retries, timeout, now, now, None, priority, generated_id=True
    )


def _without_options(call: Call) -> bool:
    """Whether ``call`` sets none of its options (its task is built from the registered defaults)."""
    return (
        call.delay is None
        and call.at is None
        and call.queue is None
        and call.max_retries is None
        and call.timeout is None
        and call.task_id is None
        and call.concurrency_key is None
        and call.priority is None
        and call.unique_for is None
        and call.debounce is None
        and call.expires is None
        and call.meta is None
    )


def build_tasks(
    calls: Sequence[Call], now: float, registry: Registry, encoding: Encoding, new_id: Callable[[], str]
) -> list[NewTask]:
    """:func:`build_task` of each of ``calls``, in order, each target of the calls without options resolved
    once for the batch (a bulk enqueue's calls mostly share one)."""
    resolved: dict[int, tuple[str, TaskDefinition | None]] = {}  # by id(): the calls keep their targets
    tasks: list[NewTask] = []
    for call in calls:
        if _without_options(call):
            target = call.target
            known = resolved.get(id(target))
            if known is None:
                known = resolved[id(target)] = _resolve(target, registry)
            tasks.append(_plain_task(known[0], known[1], call.args, now, encoding, new_id))
        else:
            tasks.append(build_task(call, now, registry, encoding, new_id))
    return tasks


def build_task(
    call: Call, now: float, registry: Registry, encoding: Encoding, new_id: Callable[[], str] = new_task_id
) -> NewTask:
    """The :class:`NewTask` for ``call``, every check done: ``TypeError``/``ValueError`` say what is wrong.
    ``new_id`` makes the id of a call without ``task_id``."""
    if _without_options(call):  # the same task, without the option checks (and the text naming the call)
        return build_plain_task(call.target, call.args, now, registry, encoding, new_id)
    name, definition = _resolve(call.target, registry)
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
    if call.debounce is not None:
        if call.delay is not None or call.at is not None:
            raise TypeError(f"{where}: pass debounce= or delay=/at=, not both (debounce sets the start time)")
        if call.task_id is None:
            raise ValueError(
                f"{where}: debounce= needs task_id= (the id whose enqueues are merged into one run): "
                f"enqueue({name!r}, ..., task_id='...', debounce={call.debounce!r})"
            )
        if call.unique_for is not None:
            raise ValueError(
                f"{where}: pass debounce= or unique_for=, not both (a uniqueness window would refuse the "
                "enqueues that debounce merges)"
            )
        run_at = now + check_seconds(call.debounce, f"{where}: debounce", allow_zero=True)
    task_id = new_id() if call.task_id is None else check_name(call.task_id, f"{where}: task_id")
    if call.priority is not None:
        priority = check_priority(call.priority, where)
    else:
        priority = definition.priority if definition is not None else 0
    key = None if call.concurrency_key is None else check_concurrency_key(call.concurrency_key, where)
    expires_at = None if call.expires is None else expiry_time(call.expires, now, run_at, where)
    meta = None if call.meta is None else with_user_meta(None, check_user_meta(call.meta, where))
    payload = encode_arguments(encoding, name, call.args, definition)
    window_key = window_until = None
    if call.unique_for is not None:
        window_until = now + check_seconds(call.unique_for, f"{where}: unique_for")
        window_key = unique_key(call.task_id, name, payload)
    return new_task(
        id=task_id,
        name=name,
        queue=queue,
        payload=payload,
        max_retries=max_retries,
        timeout=timeout,
        enqueued_at=now,
        run_at=run_at,
        meta=meta,
        priority=priority,
        concurrency_key=key,
        expires_at=expires_at,
        unique_key=window_key,
        unique_until=window_until,
        generated_id=call.task_id is None,
    )


def if_exists_for(calls: list[Call]) -> Literal["error", "debounce"]:
    """How a batch of checked ``calls`` is stored: ``"debounce"`` when its calls debounce (all of them must:
    ``ValueError`` for a mix), else ``"error"``."""
    debounced = [call for call in calls if call.debounce is not None]
    if not debounced:
        return "error"
    if len(debounced) != len(calls):
        raise ValueError(
            "enqueue_many(): calls with debounce= cannot share a batch with calls without it (a debounced "
            "call replaces a pending task with its id, the others must not): enqueue them separately"
        )
    return "debounce"


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
