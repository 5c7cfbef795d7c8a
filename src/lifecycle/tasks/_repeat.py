"""Repeat: call an async function (or a Task's execute) every ``interval`` seconds, start to start."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio

from .._checks import check_name, check_seconds
from .._core._task import ExecuteTask, Task
from .._redact import library_logger

__all__ = ["Repeat"]

logger = library_logger("lifecycle.tasks")


class _NotAwaitableError(Exception):
    """``fn`` returned something that is not awaitable (a programming error, raised as ``TypeError``)."""


def _has_async(obj: object, method: str) -> bool:
    return inspect.iscoroutinefunction(getattr(obj, method, None))


class Repeat:
    """Calls ``fn`` every ``interval`` seconds until it is cancelled: a zero-argument async function, or the
    ``execute`` of a whole :class:`~lifecycle.Task` (goasync's ``Repeatable`` / ``RepeatTimer``).

    Calls keep to a fixed schedule measured start to start: ``t0, t0 + interval, t0 + 2*interval, ...``
    where ``t0`` is when ``execute`` starts (with ``run_immediately=False`` the first call is at
    ``t0 + interval``). A call that runs longer than ``interval`` makes the ticks that fell during it be
    dropped, not queued: the next call happens at the first tick that has not passed yet, so ``fn`` never
    runs twice at once and never in a burst.

    An exception raised by ``fn`` is logged with its traceback on the ``lifecycle.tasks`` logger (ERROR, with
    the number of failures in a row) and the repetition goes on at the next tick; cancellation (the manager
    shutting down) stops it at once, even in the middle of a call.

    Given a :class:`~lifecycle.Task` (an object with async ``initialize``, ``execute`` and ``cleanup``),
    Repeat is a Task too: its ``initialize`` runs the wrapped task's ``initialize`` once, its ``cleanup`` the
    wrapped ``cleanup`` once (only after a completed ``initialize``), and only the wrapped ``execute`` is
    repeated, with the same schedule and failure handling as a function. Add it with
    :meth:`~lifecycle.TaskManager.add_task` (with a :class:`~lifecycle.Restart` policy, a restart runs the
    wrapped cleanup and initialize again). An :class:`~lifecycle.ExecuteTask` (async ``execute`` only) has
    its ``execute`` repeated. Around a function, ``initialize`` and ``cleanup`` do nothing, so
    ``Repeat(fn)`` fits :meth:`~lifecycle.TaskManager.add_execute_task` and ``add_task`` alike.

    Args:
        fn: a zero-argument async function (or any callable returning an awaitable), a Task or an
            ExecuteTask.
        interval: seconds between the starts of two calls: a number or ``timedelta`` greater than zero.
        run_immediately: call ``fn`` as soon as ``execute`` starts (default) rather than one interval later.
        name: shown in log messages (a non-empty string); defaults to ``fn``'s qualified name (a task's
            class name).
        clock: the time source, ``anyio.current_time`` by default (a seam for tests).
        sleep: the sleep function, ``anyio.sleep`` by default (a seam for tests).

    Raises ``TypeError`` when ``fn`` is neither callable nor a task, ``interval`` is not a number (``bool``
    is not one) or ``name`` is not a string; ``ValueError`` for an ``interval`` that is not a finite number
    greater than zero, or an empty ``name``. ``execute`` raises ``TypeError`` when ``fn`` returns something
    that cannot be awaited, and ``RuntimeError`` for a wrapped Task that was not initialized (added with
    ``add_execute_task``, which runs no ``initialize``).

    Example::

        async def report_health() -> None:
            logger.info("healthy: %d connections", server.connections)

        manager.add_execute_task("health", Repeat(report_health, interval=30))
        manager.add_task("sync", Repeat(InventorySync(), interval=60))  # connect once, sync every minute
    """

    def __init__(
        self,
        fn: Callable[[], Awaitable[object]] | Task | ExecuteTask,
        *,
        interval: float | timedelta,
        run_immediately: bool = True,
        name: str | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
    ) -> None:
        self._task: Task | None = None
        if _has_async(fn, "execute"):
            if _has_async(fn, "initialize") and _has_async(fn, "cleanup"):
                self._task = fn  # type: ignore[assignment]
            call: Callable[[], Awaitable[object]] = fn.execute  # type: ignore[union-attr]
            default_name = type(fn).__name__
        elif callable(fn):
            call = fn
            default_name = getattr(fn, "__qualname__", None) or repr(fn)
        else:
            raise TypeError(
                "Repeat needs a zero-argument async function to call, or a Task / ExecuteTask (an object "
                f"with async def execute()) whose execute is repeated, got {fn!r}"
            )
        self._fn = call
        self._interval = check_seconds(interval, "Repeat interval")
        self._run_immediately = bool(run_immediately)
        if name is not None:
            check_name(name, "Repeat name")
        self._name = name or default_name
        self._clock = clock or anyio.current_time
        self._sleep = sleep or anyio.sleep
        self._initialized = False
        self._calls = 0
        self._failures = 0
        self._skipped = 0
        self._failures_in_a_row = 0

    @property
    def interval(self) -> float:
        """Seconds between the starts of two calls."""
        return self._interval

    @property
    def calls(self) -> int:
        """How many times ``fn`` has been called (failed calls included)."""
        return self._calls

    @property
    def failures(self) -> int:
        """How many calls of ``fn`` raised an exception."""
        return self._failures

    @property
    def skipped(self) -> int:
        """How many ticks were dropped because the call before them was still running."""
        return self._skipped

    async def initialize(self) -> None:
        """Initialize the wrapped Task once (nothing to do around a function or an ExecuteTask)."""
        if self._task is not None and not self._initialized:
            await self._task.initialize()
            self._initialized = True

    async def cleanup(self) -> None:
        """Clean up the wrapped Task once, if its ``initialize`` completed (nothing to do otherwise)."""
        if self._task is not None and self._initialized:
            self._initialized = False
            await self._task.cleanup()

    async def execute(self) -> None:
        """Call ``fn`` (the wrapped ``execute``) on every tick until cancelled; never returns on its own."""
        if self._task is not None and not self._initialized:
            raise RuntimeError(
                f"Repeat({self._name}) wraps a whole Task whose initialize has not run: add it with "
                "manager.add_task(), which runs its initialize once and its cleanup at the end (not "
                "add_execute_task(), which only runs execute)"
            )
        interval = self._interval
        next_tick = self._clock() + (0.0 if self._run_immediately else interval)
        while True:
            delay = next_tick - self._clock()
            if delay > 0:
                await self._sleep(delay)
            else:
                # Behind schedule: still yield, so cancellation and other tasks get their turn.
                await anyio.lowlevel.checkpoint()
            await self._call_once()
            next_tick += interval
            now = self._clock()
            if next_tick < now:
                # The call overran one or more ticks: drop them and keep to the original schedule.
                missed = math.ceil((now - next_tick) / interval)
                self._skipped += missed
                next_tick += missed * interval
                logger.debug(
                    "%s: the call took longer than %gs; dropped %d tick(s)", self._name, interval, missed
                )

    async def _call_once(self) -> None:
        """Run ``fn`` once; an exception it raises is logged with its traceback, cancellation propagates."""
        self._calls += 1
        try:
            result = self._fn()
            if not inspect.isawaitable(result):
                raise _NotAwaitableError(type(result).__name__)
            await result
        except _NotAwaitableError as error:
            raise TypeError(
                f"Repeat({self._name}): fn returned {error}, not an awaitable; pass an async def function "
                "(or a callable returning an awaitable, or a Task)"
            ) from None
        except Exception:
            self._failures += 1
            self._failures_in_a_row += 1
            logger.error(
                "%s: call %d failed (%d in a row); it runs again at the next tick (every %gs)",
                self._name,
                self._calls,
                self._failures_in_a_row,
                self._interval,
                exc_info=True,
            )
        else:
            self._failures_in_a_row = 0

    def __repr__(self) -> str:
        return f"<Repeat {self._name} every {self._interval:g}s, {self._calls} call(s)>"
