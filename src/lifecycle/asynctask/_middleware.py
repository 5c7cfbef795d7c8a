"""Middleware around every attempt, ``on_enqueue`` hooks before every store, and the helpers hooks use to read
and set a task's metadata (:func:`with_meta`, :func:`meta_of`).

One :class:`Hooks` per ``AsyncTasks`` holds both lists in registration order. The enqueue paths
(``enqueue``, ``enqueue_many``, chains, schedules; groups) pass each batch through :meth:`Hooks.prepare`
(a group through :meth:`Hooks.prepare_group`) just before the backend stores it; the worker passes what a
success enqueues next (the next chain step, a group step) through :meth:`Hooks.prepare_settlement`; the
runner calls the task through :func:`run_middleware`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from .._checks import check_name
from ._meta import (
    USER,
    check_user_meta,
    engine_sections,
    read_meta,
    read_user_meta,
    with_user_meta,
)
from ._model import TaskContext
from ._records import NewGroup, NewTask, Settlement
from ._registry import is_async_callable

__all__ = [
    "EnqueueHook",
    "Hooks",
    "Middleware",
    "meta_of",
    "run_middleware",
    "with_meta",
]


class Middleware(Protocol):
    """What ``@tasks.middleware`` takes: ``async def mw(ctx: TaskContext, call_next) -> Any``.

    It wraps every attempt run by this process's worker: ``await call_next()`` runs the task (or the next
    middleware) and returns its result; what the middleware returns is the attempt's result, and what it
    raises (``Retry`` and ``Abort`` included) fails the attempt exactly as if the task had raised it. A
    middleware that does not call ``call_next`` does not run the task: its return value is the result.
    ``call_next`` may be called once per attempt (``RuntimeError`` on a second call).

    Example::

        @tasks.middleware
        async def timed(ctx: TaskContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
            started = time.monotonic()
            try:
                return await call_next()
            finally:
                ctx.logger.info("took %.3f s", time.monotonic() - started)
    """

    def __call__(self, ctx: TaskContext, call_next: Callable[[], Awaitable[Any]], /) -> Awaitable[Any]:
        """Run around one attempt; ``await call_next()`` runs the task and returns its result."""
        ...


class EnqueueHook(Protocol):
    """What ``tasks.on_enqueue`` takes: a plain (synchronous) ``hook(task: NewTask) -> NewTask | None``.

    It is called once for each task just before it is stored, and may return a changed copy to store
    instead (``dataclasses.replace``; set metadata with :func:`with_meta`), or ``None`` to keep it.
    Raising makes the enqueue raise that exception, and nothing of its batch is stored.

    Example::

        @tasks.on_enqueue
        def tag_tenant(task: NewTask) -> NewTask:
            return with_meta(task, tenant=current_tenant.get())
    """

    def __call__(self, task: NewTask, /) -> NewTask | None:
        """The task to store instead of ``task``, or ``None`` to store ``task`` as it is."""
        ...


def meta_of(task: NewTask) -> Mapping[str, str]:
    """The user metadata of a task about to be stored (read-only), for an ``on_enqueue`` hook: what
    ``meta=`` gave and hooks set; never the engine's own bookkeeping.

    Example::

        @tasks.on_enqueue
        def default_tenant(task: NewTask) -> NewTask | None:
            return None if "tenant" in meta_of(task) else with_meta(task, tenant="public")
    """
    if not isinstance(task, NewTask):
        raise TypeError(f"meta_of() takes a NewTask (what an on_enqueue hook receives), got {task!r}")
    return read_user_meta(task.meta)


def with_meta(task: NewTask, items: Mapping[str, str | None] | None = None, /, **more: str | None) -> NewTask:
    """A copy of ``task`` whose user metadata has ``items`` and ``more`` set (a value of ``None`` removes
    its key), the engine's own bookkeeping in ``NewTask.meta`` kept as it is: how an ``on_enqueue`` hook sets
    metadata. Keys and values are ``str`` without NUL characters (``TypeError``/``ValueError`` otherwise).

    Example::

        @tasks.on_enqueue
        def tag_tenant(task: NewTask) -> NewTask:
            return with_meta(task, {"tenant": current_tenant.get()}, source="web")
    """
    if not isinstance(task, NewTask):
        raise TypeError(f"with_meta() takes a NewTask (what an on_enqueue hook receives), got {task!r}")
    if items is not None and not isinstance(items, Mapping):
        raise TypeError(f"with_meta(): items must be a mapping of str to str, got {items!r}")
    changes = {**(items or {}), **more}
    merged: dict[str, object] = dict(read_user_meta(task.meta))
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    checked = check_user_meta(merged, "with_meta()")
    try:
        meta = with_user_meta(task.meta, checked)
    except ValueError as exc:
        raise ValueError(f"with_meta(): task {task.id!r} has damaged meta text: {exc}") from None
    return replace(task, meta=meta)


async def run_middleware(
    middleware: Sequence[Middleware], ctx: TaskContext, invoke: Callable[[], Awaitable[Any]]
) -> Any:
    """Run ``invoke`` (the task) inside ``middleware``, the first outermost, and return the result."""

    async def layer(index: int) -> Any:
        if index == len(middleware):
            return await invoke()
        called = False

        async def call_next() -> Any:
            nonlocal called
            if called:
                raise RuntimeError(
                    f"middleware {_describe(middleware[index])} called call_next() twice in one attempt: "
                    "it runs the task once; to run the task again, raise Retry"
                )
            called = True
            return await layer(index + 1)

        return await middleware[index](ctx, call_next)

    return await layer(0)


class Hooks:
    """The middleware and ``on_enqueue`` hooks of one ``AsyncTasks``, each in registration order.

    Both may be added at any time, also while the worker runs: an attempt that starts afterwards runs inside
    the new middleware (an attempt already running keeps the middleware it started with), and an enqueue
    that starts afterwards calls the new hook.
    """

    __slots__ = ("middleware", "on_enqueue")

    def __init__(self) -> None:
        self.middleware: tuple[Middleware, ...] = ()
        self.on_enqueue: tuple[EnqueueHook, ...] = ()

    def add_middleware(self, fn: Middleware) -> None:
        """Add ``fn`` innermost; ``TypeError`` unless it is an ``async def`` taking ``(ctx, call_next)``."""
        if isinstance(fn, type) or not callable(fn):
            raise TypeError(
                f"@tasks.middleware takes an async def mw(ctx: TaskContext, call_next) function, got {fn!r}"
            )
        if not is_async_callable(fn):
            raise TypeError(
                f"@tasks.middleware: {_describe(fn)} is not an async def; middleware awaits call_next(): "
                "write it `async def mw(ctx: TaskContext, call_next) -> Any`"
            )
        _check_takes(fn, 2, f"@tasks.middleware: {_describe(fn)}", "(ctx, call_next)")
        self.middleware = (*self.middleware, fn)

    def add_enqueue_hook(self, fn: EnqueueHook) -> None:
        """Add ``fn`` last; ``TypeError`` unless it is a plain function taking the ``NewTask``."""
        if isinstance(fn, type) or not callable(fn):
            raise TypeError(
                f"tasks.on_enqueue() takes a function hook(task: NewTask) -> NewTask | None, got {fn!r}"
            )
        if is_async_callable(fn):
            raise TypeError(
                f"tasks.on_enqueue(): {_describe(fn)} is an async def; hooks are plain functions (called "
                "where no await is possible, such as inside a worker's settlement): make it a def"
            )
        _check_takes(fn, 1, f"tasks.on_enqueue(): {_describe(fn)}", "(task)")
        self.on_enqueue = (*self.on_enqueue, fn)

    def prepare(self, tasks: Sequence[NewTask]) -> list[NewTask]:
        """``tasks`` (one batch, stored together) as the hooks leave them: each task through every hook in
        order. What a hook raises propagates (nothing of the batch may be stored then); a hook returning
        something else than a ``NewTask`` or ``None`` is a ``TypeError``; one that changes the engine's
        bookkeeping, an id the engine fixed, or an id to one another task of the batch has, a ``ValueError``.
        """
        hooks = self.on_enqueue
        if not hooks:
            return list(tasks)
        prepared: list[NewTask] = []
        for task in tasks:
            for hook in hooks:
                changed = hook(task)
                if changed is None or changed is task:
                    continue
                _check_change(hook, task, changed)
                if changed.generated_id and (changed.id != task.id or not task.generated_id):
                    changed = replace(changed, generated_id=False)  # a hook's id may be stored already
                task = changed
            prepared.append(task)
        _check_ids(tasks, prepared)
        return prepared

    def prepare_group(self, group: NewGroup) -> NewGroup:
        """``group`` with its members, then its ``then``, through :meth:`prepare` as one batch."""
        if not self.on_enqueue:
            return group
        batch = [*group.members, *(() if group.then is None else (group.then,))]
        prepared = self.prepare(batch)
        members = tuple(prepared[: len(group.members)])
        then = None if group.then is None else prepared[-1]
        return replace(group, members=members, then=then)

    def prepare_settlement(self, settlement: Settlement) -> Settlement:
        """``settlement`` with what it enqueues (``then``, ``then_groups``) through the hooks: run in the
        worker that saves the success, so its hooks apply."""
        if not self.on_enqueue or not (settlement.then or settlement.then_groups):
            return settlement
        return replace(
            settlement,
            then=tuple(self.prepare(settlement.then)),
            then_groups=tuple(self.prepare_group(group) for group in settlement.then_groups),
        )


def _check_takes(fn: Callable[..., Any], count: int, what: str, shape: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or extension callable without a readable signature: trust it
    try:
        signature.bind(*([None] * count))
    except TypeError:
        raise TypeError(f"{what} must take {count} positional argument{'s' * (count > 1)} {shape}") from None


def _check_change(hook: EnqueueHook, before: NewTask, after: object) -> None:
    """``TypeError``/``ValueError`` unless ``after`` is a task ``hook`` may store instead of ``before``."""
    where = f"the on_enqueue hook {_describe(hook)}"
    if not isinstance(after, NewTask):
        raise TypeError(
            f"{where} returned {after!r} for task {before.id!r} ({before.name}); a hook returns a NewTask "
            "(a changed copy: dataclasses.replace(task, ...) or with_meta(task, ...)), or None to keep the "
            "task"
        )
    if after.meta is not None and not isinstance(after.meta, str):
        raise TypeError(f"{where} set NewTask.meta of task {before.id!r} to {after.meta!r}; use with_meta()")
    try:
        engine_before, engine_after = engine_sections(before.meta), engine_sections(after.meta)
        user = read_meta(after.meta).get(USER, {})
    except ValueError as exc:
        raise ValueError(
            f"{where} made NewTask.meta of task {before.id!r} unreadable ({exc}); use with_meta()"
        ) from None
    if engine_after != engine_before:
        raise ValueError(
            f"{where} changed the engine's bookkeeping in NewTask.meta of task {before.id!r} "
            f"({before.name}); set metadata with lifecycle.asynctask.with_meta(task, key=value), which "
            "keeps it"
        )
    check_user_meta(user, f"{where} (task {before.id!r})")
    if after.group_id != before.group_id:
        raise ValueError(f"{where} changed the group_id of task {before.id!r}; the engine sets it, leave it")
    if after.id != before.id and (engine_before.keys() - {"trace"} or before.group_id is not None):
        raise ValueError(
            f"{where} changed the id of task {before.id!r} ({before.name}) to {after.id!r}; the engine fixes "
            "the ids of chain steps, schedule fires and group members: leave them"
        )
    check_name(after.id, f"{where}: the task id")
    check_name(after.name, f"{where}: the task name")
    check_name(after.queue, f"{where}: the queue name")
    if after.concurrency_key is not None:
        check_name(after.concurrency_key, f"{where}: the concurrency_key")


def _check_ids(before: Sequence[NewTask], after: Sequence[NewTask]) -> None:
    """``ValueError`` when a hook gave a task an id that another task of the batch has."""
    counts = Counter(task.id for task in after)
    for old, new in zip(before, after, strict=True):
        if old.id != new.id and counts[new.id] > 1:
            raise ValueError(
                f"an on_enqueue hook changed the id of task {old.id!r} ({old.name}) to {new.id!r}, the id "
                "of another task of the same batch; ids in one enqueue must differ"
            )


def _describe(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))
