"""TaskManager: initialize in order, execute together, shut down and clean up in reverse (goasync on anyio).

The whole state machine is this one class, in this one module, read top to bottom:

- the public surface: adding work, ``run()``, ``shutdown()``, the snapshots (``status()``, ``health()``),
  cancelling;
- the Task protocol (``initialize`` / ``execute`` / ``cleanup``), which is what makes managers nest;
- the run's state (NEW → INITIALIZING → RUNNING → STOPPING → STOPPED, once) and readiness;
- the three phases: initialize in order, execute together (then the drain), clean up in reverse;
- the steps of one task: one initialize, one execute attempt, one cleanup, and the restart loop built from
  them.

On shutdown from RUNNING, readiness turns false first, then the manager waits ``drain_delay`` (the executes
keep running), then cancels the executes, then cleans up. What other modules need (the signal policy of
:func:`lifecycle.run`, :class:`lifecycle.Metrics`, an :class:`~lifecycle.ExecuteHandle`) they get through
public methods or a bound callback, never through the private attributes below.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from datetime import timedelta
from types import EllipsisType, FrameType
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from .._checks import check_name, check_optional_seconds
from .._redact import library_logger, redact
from ._background import background_group
from ._entry import Entry
from ._errors import TaskError, TaskManagerError, UnexpectedStopError, summarize
from ._events import EventKind, EventSink, LifecycleEvent
from ._handle import ExecuteHandle
from ._loopwatch import LoopBlock, LoopWatch, format_block_stack, sharing_watches
from ._readiness import Health, TaskHealth
from ._restart import Restart
from ._status import TaskStatus
from ._stuck import (
    StuckTask,
    await_stack,
    format_stack_report,
    format_stuck_report,
    frame_of,
    innermost_user_line,
    loop_task_stacks,
)
from ._systemd import SystemdNotifier
from ._task import ExecuteTask, ManagerState, Stage, Task, TaskType

__all__ = ["TaskManager"]

logger = library_logger("lifecycle")

_NEW, _INITIALIZING, _RUNNING = ManagerState.NEW, ManagerState.INITIALIZING, ManagerState.RUNNING
_STOPPING, _STOPPED = ManagerState.STOPPING, ManagerState.STOPPED
_INFO, _WARNING, _ERROR = logging.INFO, logging.WARNING, logging.ERROR

# anyio >= 4.14 gives every task spawned by start_soon() its own cancel scope, reachable through the
# TaskHandle it returns; older versions return None, so each execute task then needs a scope of ours.
_OWN_SCOPE = not hasattr(anyio, "TaskHandle")

#: A stage that failed and why (an ``Exception``; a ``TimeoutError`` for a stage past its bound).
Failure = tuple[Stage, BaseException]


async def _sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def _timed_out(stage: Stage, timeout: float | None, cause: BaseException | None = None) -> TimeoutError:
    """The failure of a stage that ran past its bound (``cause``: what the stage raised when cancelled)."""
    error = TimeoutError(f"{stage.value} did not complete within {timeout} s")
    if cause is not None:
        error.__cause__ = cause
    return error


def _check_restart(name: str, restart: object) -> Restart | None:
    if restart is None or isinstance(restart, Restart):
        return restart
    raise TypeError(
        f"task {name!r}: restart must be a lifecycle.Restart (e.g. Restart(max_restarts=5, within=60)) or "
        f"None, got {restart!r}"
    )


def _check_callable(value: object, what: str, expected: str) -> None:
    if not callable(value):
        raise TypeError(f"{what} must be {expected}, got {value!r}")


class TaskManager:
    """Runs a service's long-lived parts: initialize in order, execute together, clean up in reverse.

    Args:
        name: shown in logs, events and errors.
        initialize_timeout: default bound, per task, on ``initialize`` (``None``: unbounded).
        cleanup_timeout: default bound, per task, on ``cleanup`` (``None``: unbounded).
        shutdown_timeout: bound on the time from the shutdown request until every ``execute`` has ended; past
            it the manager reports the stuck tasks (a :class:`~lifecycle.TaskError` each, and a report of
            where each one waits) and keeps waiting. :func:`lifecycle.run` exits with status 1 at that point.
        on_event: called with every :class:`~lifecycle.LifecycleEvent`; an exception it raises is logged.
        drain_delay: on a shutdown from RUNNING, readiness turns false at once (:meth:`health`,
            ``/readyz``), then the executes keep running for ``drain_delay`` seconds (so load balancers stop
            sending traffic) before they are cancelled and the cleanups run. ``None`` or 0: no delay.
            ``shutdown_timeout`` counts from the end of the drain. During the drain
            :meth:`add_execute_task` still accepts work.
        clock: where the manager reads time for restart windows, the drain and ``shutdown_timeout``:
            monotonic seconds (default ``time.monotonic``).
        sleep: how the manager waits out a restart backoff, the drain and the systemd watchdog interval
            (default ``anyio.sleep``).
        rng: the jitter source of restart backoffs (default: the ``random`` module).
        loop_block_warning: watch the event loop from a thread and, whenever it has not run for this many
            seconds (a task holding it with blocking code: a sync database call, ``time.sleep``, heavy CPU
            work), log a WARNING on the ``lifecycle`` logger with the stack of the code that holds it, once
            per block, and count it (:attr:`loop_blocks`, ``lifecycle_loop_blocks_total`` in
            :class:`lifecycle.Metrics`). ``None`` (the default): not watched. It watches for the whole
            :meth:`run` (a manager used as another manager's task: during its execute stage). An
            :class:`~lifecycle.asynctask.AsyncTasks` worker in the manager shares the watch: one warning
            per block, naming the durable task that blocks.

    ``clock``, ``sleep`` and ``rng`` are the manager's one time seam: tests pass a fake clock whose ``sleep``
    moves it forward (and a seeded ``random.Random``), so delays, windows and timeouts are tested without
    waiting. Time-stamps shown to humans (``TaskStatus.started_at``, event times) stay wall-clock.

    Raises ``TypeError`` for a name that is not a string, a timeout or ``drain_delay`` that is not a number of
    seconds (an ``int``, ``float`` or ``timedelta``; ``bool`` is not one) or ``None``, or an ``on_event``,
    ``clock`` or ``sleep`` that is not callable; ``ValueError`` for an empty name, a timeout that is not
    greater than zero, a negative ``drain_delay``, a ``loop_block_warning`` of 1e9 seconds or more, or NaN or
    infinity anywhere (``None`` means no limit).

    When the environment has ``NOTIFY_SOCKET`` (a systemd ``Type=notify`` unit), :meth:`run` sends
    ``READY=1``, ``STATUS=...``, ``STOPPING=1`` and, with ``WatchdogSec=``, ``WATCHDOG=1`` while
    :meth:`health` says live (see ``docs/operations.md``).

    A TaskManager is itself a :class:`~lifecycle.Task`, so a task of one manager can be another manager.

    Example::

        manager = lifecycle.TaskManager(name="shop", cleanup_timeout=10, shutdown_timeout=30)
        manager.add_task("database", Database())
        manager.add_task("http", HttpServer(port=8080))
        manager.add_execute_task("reporter", report_forever, lifecycle.TaskType.ERROR)
        raise SystemExit(lifecycle.run(manager))
    """

    def __init__(
        self,
        *,
        name: str = "lifecycle",
        initialize_timeout: float | timedelta | None = None,
        cleanup_timeout: float | timedelta | None = None,
        shutdown_timeout: float | timedelta | None = None,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        drain_delay: float | timedelta | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        loop_block_warning: float | timedelta | None = None,
    ) -> None:
        self._name = check_name(name, "TaskManager name")
        if on_event is not None:
            _check_callable(on_event, "on_event", "a callable taking a LifecycleEvent")
        if clock is not None:
            _check_callable(clock, "clock", "a callable returning monotonic seconds, like time.monotonic")
        if sleep is not None:
            _check_callable(sleep, "sleep", "an async callable taking seconds, like anyio.sleep")
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random (e.g. random.Random(7)) or None, got {rng!r}")
        self._initialize_timeout = check_optional_seconds(initialize_timeout, "initialize_timeout")
        self._cleanup_timeout = check_optional_seconds(cleanup_timeout, "cleanup_timeout")
        self._shutdown_timeout = check_optional_seconds(shutdown_timeout, "shutdown_timeout")
        self._drain_delay = check_optional_seconds(drain_delay, "drain_delay", allow_zero=True) or None
        block_warning = check_optional_seconds(loop_block_warning, "loop_block_warning")
        if block_warning is not None and block_warning >= 1e9:
            raise ValueError(f"loop_block_warning must be less than 1e9 seconds, got {loop_block_warning!r}")
        self._loopwatch = (
            None
            if block_warning is None
            else LoopWatch(block_warning, self._loop_blocked, describe=self._blocking_stage)
        )
        self._loop_blocks = 0
        self._events = EventSink(self._name, on_event)
        # The time seam: restart backoff and windows, the drain, shutdown_timeout and the watchdog.
        self._clock: Callable[[], float] = clock or time.monotonic
        self._sleep: Callable[[float], Awaitable[None]] = sleep or _sleep
        self._rng = rng
        # What was added
        self._entries: dict[str, Entry] = {}
        self._tasks: list[Entry] = []  # full Tasks, in add order
        self._queued: list[Entry] = []  # execute stages waiting for the execute phase, in add order
        self._restart_totals: dict[str, int] = {}
        # The run
        self._state = _NEW
        self._mode: Literal["run", "task"] | None = None
        self._loop_thread: int | None = None
        self._stop_requested = False
        self._stop_requested_at = 0.0
        self._stop_event: anyio.Event | None = None
        self._executes_ended: anyio.Event | None = None
        self._init_scope: anyio.CancelScope | None = None
        self._task_group: TaskGroup | None = None
        self._cleaning: Entry | None = None
        self._errors: list[TaskError] = []
        self._fatal: BaseException | None = None
        self._init_failed = False
        self._stop_group_left = 0
        # Readiness and drain
        self._ready = False
        self._starting_left = 0  # executes queued at the start of the execute phase, not started yet
        self._restarting_left = 0  # tasks between a failure and their next execute
        self._draining = False  # inside the drain delay: executes still run, add_execute_task still works
        self._drain_scope: anyio.CancelScope | None = None
        self._stuck = False

    # ================================================================== the public surface

    @property
    def name(self) -> str:
        """The manager's name."""
        return self._name

    @property
    def state(self) -> ManagerState:
        """Where the manager is: NEW, INITIALIZING, RUNNING, STOPPING or STOPPED."""
        return self._state

    @property
    def loop_blocks(self) -> int:
        """How many times the event loop was found blocked longer than ``loop_block_warning`` (0 when not
        watched). :class:`lifecycle.Metrics` reports it as ``lifecycle_loop_blocks_total``."""
        return self._loop_blocks

    def add_task(
        self,
        name: str,
        task: Task,
        task_type: TaskType = TaskType.STRICT,
        *,
        initialize_timeout: float | timedelta | EllipsisType | None = ...,
        cleanup_timeout: float | timedelta | EllipsisType | None = ...,
        restart: Restart | None = None,
    ) -> None:
        """Add a :class:`~lifecycle.Task` (initialize / execute / cleanup). Only before :meth:`run`.

        ``initialize_timeout`` / ``cleanup_timeout`` override the manager's defaults for this task (``...``
        keeps the default, ``None`` removes the bound). ``restart``: a :class:`~lifecycle.Restart` policy;
        when execute fails the task is cleaned up, initialized and executed again (a failing first
        ``initialize`` is never restarted: startup stops as usual).

        Raises ``RuntimeError`` once the manager has started (use :meth:`add_execute_task` for work added
        while running); ``ValueError`` for a name already in use or empty, or a timeout that is not a finite
        number of seconds greater than zero; ``TypeError`` for a name that is not a string or an object
        without async ``initialize``, ``execute`` and ``cleanup`` methods (the message names what is missing).

        Example::

            manager.add_task("db", Database(), initialize_timeout=10, restart=lifecycle.Restart())
        """
        if self._mode is not None or self._state is not _NEW or self._stop_requested:
            raise RuntimeError(
                f"add_task({name!r}): tasks can only be added before run(); task manager {self._name!r} is "
                f"{self._state.value}. Use add_execute_task() to add work while the manager runs."
            )
        self._check_new_name(name)
        self._check_task_type(name, task_type)
        policy = _check_restart(name, restart)
        missing = [
            method
            for method in ("initialize", "execute", "cleanup")
            if not inspect.iscoroutinefunction(getattr(task, method, None))
        ]
        if missing:
            described = ", ".join(
                f"{m}() is missing" if getattr(task, m, None) is None else f"{m}() is not an async def"
                for m in missing
            )
            raise TypeError(
                f"add_task({name!r}): {type(task).__name__} is not a lifecycle Task: {described}. A Task "
                "needs async def initialize(), execute() and cleanup(); for execute-only work use "
                "add_execute_task()."
            )
        entry = Entry(
            name,
            "task",
            task,
            task_type,
            task.execute,
            initialize_timeout=(
                self._initialize_timeout
                if initialize_timeout is ...
                else check_optional_seconds(initialize_timeout, f"add_task({name!r}): initialize_timeout")
            ),
            cleanup_timeout=(
                self._cleanup_timeout
                if cleanup_timeout is ...
                else check_optional_seconds(cleanup_timeout, f"add_task({name!r}): cleanup_timeout")
            ),
            restart=policy,
        )
        self._entries[name] = entry
        self._tasks.append(entry)
        self._queued.append(entry)
        if task_type is TaskType.STOP_GROUP:
            self._stop_group_left += 1

    def add_execute_task(
        self,
        name: str,
        task: ExecuteTask | Callable[[], Awaitable[None]],
        task_type: TaskType = TaskType.STRICT,
        *,
        restart: Restart | None = None,
    ) -> ExecuteHandle:
        """Add execute-only work: an :class:`~lifecycle.ExecuteTask` or a zero-argument ``async def``.

        Before :meth:`run` and while initializing it is queued (it starts with the execute stage, in add
        order); while running it starts at once. Every :class:`~lifecycle.TaskType` is accepted, STOP_GROUP
        included. Call it from the manager's event loop (any task); from another thread use
        ``anyio.from_thread.run_sync(manager.add_execute_task, ...)`` or a blocking portal. An execute task
        added while running is forgotten (its row leaves :meth:`status`, its name is free again) once it ends
        without error, so a long-running service can add one per request.

        ``restart``: a :class:`~lifecycle.Restart` policy; a failed execute runs again after its backoff.

        Returns an :class:`~lifecycle.ExecuteHandle` to cancel or await this one task (or use
        :meth:`cancel` with its name).

        Raises ``RuntimeError`` once shutdown has begun (the ``drain_delay``, when there is one, excepted:
        the service keeps serving during it) or from a foreign thread, ``ValueError`` for a name in use or
        empty, ``TypeError`` for a name that is not a string or a task that is neither an ExecuteTask nor
        callable.

        Example::

            handle = manager.add_execute_task(f"conn-{n}", serve_connection, lifecycle.TaskType.ERROR)
        """
        # STOPPING and STOPPED both come after the stop request, which is all there is to check.
        if self._stop_requested and not self._draining:
            raise RuntimeError(
                f"add_execute_task({name!r}): task manager {self._name!r} is shutting down "
                f"({self._state.value}); no work can be added once shutdown has begun"
            )
        self._check_thread("add_execute_task")
        # The full check only when the cheap one fails: this is the hot path of one task per request.
        if name in self._entries or not isinstance(name, str) or not name or "\x00" in name:
            self._check_new_name(name)
        execute = getattr(task, "execute", None)
        if execute is not None:
            if not inspect.iscoroutinefunction(execute):
                raise TypeError(
                    f"add_execute_task({name!r}): {type(task).__name__}.execute must be an async def method"
                )
            fn = execute
        elif callable(task):
            fn = task
        else:
            raise TypeError(
                f"add_execute_task({name!r}): expected an ExecuteTask (an object with async def execute()) "
                f"or a zero-argument async function, got {type(task).__name__}"
            )
        if task_type.__class__ is not TaskType:
            self._check_task_type(name, task_type)
        if restart is not None:
            restart = _check_restart(name, restart)
        task_group = self._task_group
        entry = Entry(name, "execute", task, task_type, fn, runtime=task_group is not None, restart=restart)
        self._entries[name] = entry
        if task_type is TaskType.STOP_GROUP:
            self._stop_group_left += 1
        if task_group is not None:
            entry.task_handle = task_group.start_soon(self._execute_one, entry, name=name)
        else:
            self._queued.append(entry)
        return ExecuteHandle(entry, self._cancel_entry)

    def add_listener(self, listener: Callable[[LifecycleEvent], None]) -> None:
        """Also deliver every :class:`~lifecycle.LifecycleEvent` to ``listener``, after ``on_event``.

        For observers that come after the manager was built: :func:`lifecycle.run` uses it to exit on a
        stuck shutdown. Like ``on_event``, an exception it raises is logged and the manager goes on; call it
        from the manager's event loop, or before :meth:`run`.

        Raises ``TypeError`` when ``listener`` is not callable.

        Example::

            manager.add_listener(lambda event: print(event.kind.value, event.task_name))
        """
        _check_callable(listener, "add_listener(listener)", "a callable taking a LifecycleEvent")
        self._events.add_listener(listener)

    async def run(self) -> None:
        """Initialize every task in order, execute them together until shutdown, then clean up in reverse.

        Returns ``None`` when nothing failed. Raises :class:`~lifecycle.TaskManagerError` holding every
        :class:`~lifecycle.TaskError` (initialize, then execute as they happened, then cleanup). When
        cancelled from outside it shuts down and cleans up, then lets the cancellation propagate; a task's
        ``KeyboardInterrupt`` / ``SystemExit`` is re-raised after the cleanup. Raises ``RuntimeError`` when
        called a second time, or on a manager already started as another manager's task.

        Example::

            async def main() -> None:
                await manager.run()
        """
        self._claim("run")
        notifier = SystemdNotifier.from_environment()
        outcome: BaseException | None = None
        # The background group outlives the phases: the systemd watchdog and work a task's initialize starts
        # for the whole run (HealthServer) live there. Errors are raised outside it, never wrapped in a group.
        async with anyio.create_task_group() as background:
            with background_group(background), sharing_watches() if self._loopwatch else nullcontext():
                if self._loopwatch is not None:
                    background.start_soon(self._loopwatch.run, name=f"{self._name}: loop watch")
                if notifier is not None:
                    self._events.add_listener(notifier.on_event, steps=False)
                    background.start_soon(notifier.watchdog, self.health, self._sleep)
                try:
                    await self._run_phases()
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    outcome = exc
                finally:
                    background.cancel_scope.cancel()
                    if notifier is not None:
                        self._events.remove_listener(notifier.on_event)
                        notifier.close()
        if outcome is not None:
            raise outcome

    def shutdown(self) -> None:
        """Request a graceful stop: idempotent, callable from any task at any time (even before :meth:`run`).

        During initialize it cancels the initialize in progress and initializes nothing more; while running it
        cancels every execute; cleanups then run in reverse. Before :meth:`run`, the run ends at once.
        From another thread, call it through ``anyio.from_thread.run_sync(manager.shutdown)``.
        """
        if not self._stop_requested:
            self._check_thread("shutdown")
            self._request_stop("shutdown() was called")

    def status(self) -> list[TaskStatus]:
        """One :class:`~lifecycle.TaskStatus` row per task, in add order (a snapshot)."""
        return [entry.snapshot() for entry in self._entries.values()]

    def health(self) -> Health:
        """A typed snapshot for probes: ``ready``, ``live``, ``draining`` and each task's state.

        Ready: RUNNING, every task initialized, every execute added before the execute stage started, no
        task restarting, no shutdown begun. Live: no task failed for good, no shutdown stuck past
        ``shutdown_timeout``, not STOPPED. See :class:`~lifecycle.Health`.
        """
        tasks = tuple(
            TaskHealth(e.name, e.kind, e.stage, e.state, e.error is None, e.restarts, e.restarting, e.runtime)
            for e in self._entries.values()
        )
        state = self._state
        live = state is not _STOPPED and not self._stuck and all(t.live for t in tasks)
        draining = self._stop_requested and state is not _STOPPED and state is not _NEW
        return Health(self._name, state, self._ready, live, draining, tasks)

    def restart_totals(self) -> dict[str, int]:
        """How many times each task was restarted by its :class:`~lifecycle.Restart` policy, by name.

        Counted since the manager was built, so unlike :meth:`status` it keeps the restarts of execute
        tasks that ended and were forgotten; tasks never restarted are not in it. A new dict each call.
        :class:`lifecycle.Metrics` reports it as ``lifecycle_task_restarts_total``.
        """
        return dict(self._restart_totals)

    def cancel(self, name: str) -> bool:
        """Cancel the execute task added under ``name``, like its handle's ``cancel()``; not an error.

        Returns ``True`` when the task was running or queued (it never starts), ``False`` when no execute
        task of that name is running any more (it has ended, or a runtime task ended and was forgotten).
        Raises ``ValueError`` when ``name`` is a :class:`~lifecycle.Task` (those stop with the manager),
        ``RuntimeError`` from a foreign thread.
        """
        self._check_thread("cancel")
        entry = self._entries.get(name)
        if entry is not None and entry.kind == "task":
            raise ValueError(
                f"cancel({name!r}): {name!r} is a Task (initialize/execute/cleanup) of task manager "
                f"{self._name!r}; only execute tasks can be cancelled on their own. A Task stops when the "
                "manager shuts down"
            )
        if entry is None or entry.finished:
            return False
        self._cancel_entry(entry)
        return True

    def cancel_cleanups(self) -> int:
        """Cancel the cleanup running now (forced shutdown: the second signal of :func:`lifecycle.run`).

        The cleanup gets a cancellation inside its shield and is recorded as a failed cleanup; later
        cleanups still run. Reaches into a nested manager's running cleanup too. A ``drain_delay`` in
        progress is cut short as well (the executes are cancelled at once). Returns how many cleanups were
        cancelled (0 when none is running).
        """
        if self._drain_scope is not None:
            self._drain_scope.cancel()
        entry = self._cleaning
        if entry is None or entry.scope is None:
            return 0
        entry.scope.cancel()
        cancelled = 1
        if isinstance(entry.task, TaskManager):
            cancelled += entry.task.cancel_cleanups()
        return cancelled

    def stuck_report(self, headline: str | None = None) -> str:
        """A report of every task stage running now and where it waits (``file:line``), for humans."""
        stuck = self._running_stages()
        return format_stuck_report(self._name, headline or f"{len(stuck)} task stage(s) still running", stuck)

    def stack_report(self, headline: str | None = None) -> str:
        """Where everything waits now, for humans debugging a live service: each task stage of this manager
        (as in the stuck-shutdown report), then every task of the event loop (durable tasks, connection
        handlers...) with its await stack, outermost first. Passwords of URLs and DSNs are masked.

        What ``lifecycle.run(manager, dump_stacks_on="SIGUSR1")`` logs and ``HealthServer(debug=True)``
        serves at ``/debug/stacks``. Call it from a task of the manager's event loop (``RuntimeError`` from
        another thread).

        Example::

            print(manager.stack_report())
        """
        self._check_thread("stack_report")
        stages = self._running_stages()
        headline = headline or f"stack report: {len(stages)} task stage(s) running"
        return redact(format_stack_report(self._name, headline, stages, loop_task_stacks()))

    # ================================================================== the Task protocol (nesting)

    async def initialize(self) -> None:
        """Initialize every task in order (this manager used as another manager's Task).

        On failure, cleans up what it initialized and raises :class:`~lifecycle.TaskManagerError`.
        """
        self._claim("task")
        try:
            await self._initialize_phase()
        except BaseException:
            await self._cleanup_phase()
            raise
        if self._init_failed:
            await self._cleanup_phase()
            raise self._error_group(self._errors)
        if self._stop_requested:
            await self._cleanup_phase()

    async def execute(self) -> None:
        """Execute every task until this manager stops (returns) or is cancelled (shuts down, re-raises).

        Raises :class:`~lifecycle.TaskManagerError` with the execute errors, even when cancelled.
        """
        if self._mode != "task":
            raise RuntimeError(
                f"task manager {self._name!r}: execute() is for a manager used as a Task; "
                "call initialize() first, or use run()"
            )
        if self._state is _STOPPED:
            return
        mark = len(self._errors)
        try:
            await self._watched(self._execute_phase)
        except anyio.get_cancelled_exc_class():
            if len(self._errors) > mark:
                raise self._error_group(self._errors[mark:]) from None
            raise
        if self._fatal is not None:
            raise self._fatal
        if len(self._errors) > mark:
            raise self._error_group(self._errors[mark:])

    async def cleanup(self) -> None:
        """Clean up every initialized task in reverse order; raises :class:`~lifecycle.TaskManagerError`."""
        mark = len(self._errors)
        await self._cleanup_phase()
        if self._fatal is not None:
            raise self._fatal
        if len(self._errors) > mark:
            raise self._error_group(self._errors[mark:])

    def __repr__(self) -> str:
        return f"<TaskManager {self._name!r} {self._state.value}, {len(self._entries)} task(s)>"

    # ================================================================== the loop watch

    async def _watched(self, phase: Callable[[], Awaitable[None]]) -> None:
        """Run ``phase`` with the loop watch beside it (for a manager used as a Task: run() does not run)."""
        watch = self._loopwatch
        if watch is None:
            await phase()
            return
        outcome: BaseException | None = None
        with sharing_watches():
            async with anyio.create_task_group() as group:
                group.start_soon(watch.run, name=f"{self._name}: loop watch")
                try:
                    await phase()
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    outcome = exc  # raised outside the group, so it is not wrapped in one
                finally:
                    group.cancel_scope.cancel()
        if outcome is not None:
            raise outcome

    def _loop_blocked(self, block: LoopBlock) -> None:
        """Called from the watchdog thread: count the block and log it, unless a watch told first did."""
        self._loop_blocks += 1
        if block.reported or block.frame is None:
            return
        by = f" by {', '.join(block.blockers)}" if block.blockers else ""
        logger.warning(
            "%s: the event loop was blocked for %.2f s (more than loop_block_warning=%g s)%s: nothing else "
            "ran meanwhile (requests, timers, probes, lease renewals). Await instead of blocking, or run "
            "blocking code in a thread (anyio.to_thread.run_sync). The loop was at:\n%s",
            self._name,
            block.seconds,
            block.threshold,
            by,
            format_block_stack(block.frame),
        )

    def _blocking_stage(self, frame: FrameType) -> str | None:
        """Called from the watchdog thread: this manager's task stage whose code is on ``frame``'s stack."""
        try:
            stages = {
                frame_of(e.awaitable): e for e in list(self._entries.values()) if e.awaitable is not None
            }
        except RuntimeError:  # the loop ran again and changed the tasks meanwhile: nothing to name
            return None
        for each, _ in traceback.walk_stack(frame):
            entry = stages.get(each)
            if entry is not None and entry.stage is not None:
                return f"task {entry.name!r} ({entry.stage.value}) of task manager {self._name!r}"
        return None

    # ================================================================== the run's state

    def _claim(self, mode: Literal["run", "task"]) -> None:
        if self._mode is not None or self._state is not _NEW:
            raise RuntimeError(
                f"task manager {self._name!r} has already been started ({self._state.value}); a TaskManager "
                "runs once: create a new one to run again"
            )
        self._mode = mode
        self._loop_thread = threading.get_ident()
        self._stop_event = anyio.Event()
        if self._stop_requested:
            self._stop_event.set()

    def _request_stop(self, reason: str) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        self._stop_requested_at = self._clock()
        self._ready = False  # readiness turns false before anything else happens
        self._events.emit(EventKind.SHUTDOWN_REQUESTED, _INFO, detail=f"shutting down: {reason}")
        if self._state is _INITIALIZING or self._state is _RUNNING:
            self._set_state(_STOPPING)
        if self._init_scope is not None:
            self._init_scope.cancel()
        if self._stop_event is not None:
            self._stop_event.set()

    def _set_state(self, state: ManagerState) -> None:
        self._state = state
        self._events.emit(EventKind.STATE_CHANGED, _INFO, state=state)

    async def _run_phases(self) -> None:
        try:
            await self._initialize_phase()
            if not self._init_failed:
                await self._execute_phase()
            if self._fatal is not None:
                raise self._fatal
        finally:
            await self._cleanup_phase()
        if self._fatal is not None:  # a KeyboardInterrupt / SystemExit raised by a cleanup
            raise self._fatal
        if self._errors:
            raise self._error_group(self._errors)

    def _error_group(self, errors: list[TaskError]) -> TaskManagerError:
        return TaskManagerError(summarize(self._name, errors), errors)

    # ================================================================== readiness

    def _settle_readiness(self, entry: Entry) -> None:
        """``entry`` (re)entered its execute stage, or its execute ended: it is no longer starting or
        restarting, which may make the manager ready."""
        if entry.starting:
            entry.starting = False
            self._starting_left -= 1
            if self._starting_left == 0:
                self._update_readiness()
        self._restarting_done(entry)

    def _restarting_begins(self, entry: Entry) -> None:
        if not entry.restarting:
            entry.restarting = True
            self._restarting_left += 1
            self._update_readiness(f"task {entry.name!r} is restarting")

    def _restarting_done(self, entry: Entry) -> None:
        if entry.restarting:
            entry.restarting = False
            self._restarting_left -= 1
            self._update_readiness()

    def _update_readiness(self, reason: str = "") -> None:
        ready = (
            self._state is _RUNNING
            and not self._stop_requested
            and self._starting_left == 0
            and self._restarting_left == 0
        )
        if ready is self._ready:
            return
        self._ready = ready
        if ready:
            self._events.emit(EventKind.READY, _INFO, detail="every task is initialized and executing")
        else:
            self._events.emit(EventKind.NOT_READY, _WARNING, detail=reason or "not ready")

    # ================================================================== events and failures

    def _begin_stage(self, entry: Entry, stage: Stage, kind: EventKind) -> None:
        entry.stage = stage
        entry.state = "running"
        entry.stage_t0 = time.monotonic()
        if entry.started_at is None:
            entry.started_at = time.time()
        if self._events.wants(entry.level):
            self._events.emit(kind, entry.level, task_name=entry.name, task_type=entry.task_type, stage=stage)

    def _emit_end(self, entry: Entry, kind: EventKind) -> None:
        if self._events.wants(entry.level):
            self._events.emit(
                kind,
                entry.level,
                task_name=entry.name,
                task_type=entry.task_type,
                stage=entry.stage,
                duration=time.monotonic() - entry.stage_t0,
            )

    def _fail(
        self,
        entry: Entry,
        stage: Stage,
        cause: BaseException,
        *,
        record: bool = True,
        keep_state: bool = False,
        restart_note: str = "",
    ) -> TaskError:
        error = TaskError(entry.name, stage, entry.task_type, cause, entry.restarts, restart_note)
        if record:
            self._errors.append(error)
        if entry.error is None:
            entry.error = error
        entry.last_error = error
        if not keep_state:
            entry.state = "failed"
        self._events.emit(
            EventKind.TASK_FAILED,
            _ERROR,
            task_name=entry.name,
            task_type=entry.task_type,
            stage=stage,
            duration=time.monotonic() - entry.stage_t0,
            error=error,
        )
        return error

    def _running_stages(self) -> list[StuckTask]:
        now = time.monotonic()
        return [
            StuckTask(
                entry.name, entry.task_type, entry.stage, now - entry.stage_t0, await_stack(entry.awaitable)
            )
            for entry in self._entries.values()
            if entry.state == "running" and entry.stage is not None
        ]

    # ================================================================== the three phases

    async def _initialize_phase(self) -> None:
        self._set_state(_INITIALIZING)
        for entry in self._tasks:
            if self._stop_requested:
                break
            if not await self._initialize_one(entry):
                self._init_failed = True
                self._request_stop(f"task {entry.name!r} failed to initialize")
                break

    async def _execute_phase(self) -> None:
        if self._stop_requested:
            return
        assert self._stop_event is not None
        executes_ended = self._executes_ended = anyio.Event()
        async with anyio.create_task_group() as watch_group:
            try:
                async with anyio.create_task_group() as task_group:
                    queued, self._queued = self._queued, []
                    self._task_group = task_group
                    for entry in queued:
                        entry.starting = True
                    self._starting_left = len(queued)
                    self._set_state(_RUNNING)
                    for entry in queued:
                        entry.task_handle = task_group.start_soon(self._execute_one, entry, name=entry.name)
                    self._update_readiness()
                    drained = False
                    try:
                        await self._stop_event.wait()
                        drained = await self._drain()
                    finally:
                        self._request_stop("the task manager was cancelled")
                        self._draining = False
                        self._task_group = None
                        if self._shutdown_timeout is not None:
                            since = self._clock() if drained else self._stop_requested_at
                            watch_group.start_soon(
                                self._watch_shutdown, self._shutdown_timeout, since, drained
                            )
                        task_group.cancel_scope.cancel()
            finally:
                executes_ended.set()

    async def _drain(self) -> bool:
        """Wait ``drain_delay`` with readiness false and the executes still running; True when it did."""
        delay = self._drain_delay
        if not delay:
            return False
        self._draining = True
        self._events.emit(
            EventKind.DRAINING,
            _INFO,
            detail=f"not ready any more; the executes keep running for drain_delay={delay:g} s",
        )
        with anyio.CancelScope() as scope:
            self._drain_scope = scope
            try:
                await self._sleep(delay)
            finally:
                self._drain_scope = None
                self._draining = False
        cut = " (cut short)" if scope.cancelled_caught else ""
        self._events.emit(EventKind.DRAINED, _INFO, detail=f"drain delay over{cut}: cancelling the executes")
        return True

    async def _execute_one(self, entry: Entry) -> None:
        cancelled_before_start = entry.cancel_requested  # a local: mypy would keep the attribute narrowed
        if cancelled_before_start:
            self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
            return
        failure: Failure | None = None
        note = ""
        try:
            if _OWN_SCOPE:
                with anyio.CancelScope() as scope:
                    entry.scope = scope
                    failure, note = await self._execute_supervised(entry)
            else:
                failure, note = await self._execute_supervised(entry)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
                raise
            # KeyboardInterrupt, SystemExit...: stop, clean up, and let run() re-raise it.
            self._fail(entry, entry.stage or Stage.EXECUTE, exc, record=False)
            if self._fatal is None:
                self._fatal = exc
            self._request_stop(f"task {entry.name!r} raised {type(exc).__name__}")
            self._end_execute(entry, "failed", None)
            return
        if failure is not None:
            stage, cause = failure
            self._fail(entry, stage, cause, restart_note=note)
            if isinstance(cause, UnexpectedStopError):
                reason = f"STRICT task {entry.name!r} stopped unexpectedly"
            else:
                reason = f"task {entry.name!r} failed in {stage.value}"
            self._request_stop(reason)
            self._end_execute(entry, "failed", None)
        elif entry.cancel_requested:
            self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
        elif note:
            # Restart("always") ran out of restarts after a return: the task ends, but never quietly.
            self._events.emit(
                EventKind.TASK_RETURNED,
                _WARNING,
                task_name=entry.name,
                task_type=entry.task_type,
                stage=Stage.EXECUTE,
                duration=time.monotonic() - entry.stage_t0,
                detail=f"returned and is not restarted again ({note})",
            )
            self._end_execute(entry, "done", None)
        else:
            self._end_execute(entry, "done", EventKind.TASK_RETURNED)

    def _end_execute(
        self, entry: Entry, state: Literal["done", "cancelled", "failed"], kind: EventKind | None
    ) -> None:
        if entry.error is not None:
            state = "failed"
        entry.state = state
        if entry.kind == "execute":
            entry.ended_at = time.time()
        if kind is not None:
            self._emit_end(entry, kind)
        if entry.starting or entry.restarting:
            self._settle_readiness(entry)
        if entry.task_type is TaskType.STOP_GROUP:
            self._stop_group_left -= 1
            if self._stop_group_left == 0:
                self._request_stop("every STOP_GROUP task has returned")
        if entry.runtime and entry.error is None:
            del self._entries[entry.name]
        entry.finish()

    async def _watch_shutdown(self, timeout: float, since: float, drained: bool) -> None:
        with anyio.CancelScope(shield=True):
            assert self._executes_ended is not None
            remaining = since + timeout - self._clock()
            with anyio.move_on_after(remaining):
                await self._executes_ended.wait()
                return
            self._stuck = True
            # Not the stage's running time: an execute may have run for days before the shutdown.
            after = self._clock() - self._stop_requested_at
            drain = f"drain_delay={self._drain_delay:g} s, then " if drained else ""
            stuck = [s for s in self._running_stages() if s.stage is Stage.EXECUTE]
            report = format_stuck_report(
                self._name,
                f"shutdown stuck: {len(stuck)} task(s) still running {timeout} s after the executes were "
                "cancelled",
                stuck,
            )
            for item in stuck:
                entry = self._entries[item.name]
                where = innermost_user_line(item.stack) or "an unknown place"
                cause = TimeoutError(
                    f"execute still running {after:.1f} s after shutdown was requested "
                    f"({drain}shutdown_timeout={timeout} s), waiting at {where}"
                )
                self._fail(entry, Stage.EXECUTE, cause, keep_state=True)
            self._events.emit(EventKind.SHUTDOWN_STUCK, _ERROR, detail=report)

    async def _cleanup_phase(self) -> None:
        if self._state is not _STOPPED:
            self._request_stop("the task manager is stopping")
            for entry in reversed(self._tasks):
                if entry.initialized:
                    await self._cleanup_one(entry)
            for entry in self._entries.values():
                if entry.state == "pending":
                    entry.state = "skipped"
                if not entry.finished and (entry.kind == "execute" or not entry.initialized):
                    entry.finish()
            self._queued = []
            self._set_state(_STOPPED)

    # ================================================================== the steps of one task

    async def _initialize_stage(self, entry: Entry) -> BaseException | None:
        """Run ``entry``'s initialize within its timeout; returns its failure or ``None``.

        Cancellation and non-``Exception`` errors (reported first) propagate.
        """
        self._begin_stage(entry, Stage.INITIALIZE, EventKind.TASK_INITIALIZING)
        timeout = entry.initialize_timeout
        deadline = anyio.move_on_after(timeout)
        try:
            with deadline:
                awaitable = entry.task.initialize()
                entry.awaitable = awaitable
                await awaitable
        except Exception as exc:
            return _timed_out(Stage.INITIALIZE, timeout, exc) if deadline.cancel_called else exc
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                entry.state = "cancelled"
            else:  # KeyboardInterrupt, SystemExit...: reported, then re-raised by run() after cleanup
                self._fail(entry, Stage.INITIALIZE, exc, record=False)
            raise
        finally:
            entry.awaitable = None
        if deadline.cancelled_caught:
            return _timed_out(Stage.INITIALIZE, timeout)
        entry.initialized = True
        entry.state = "done"
        self._emit_end(entry, EventKind.TASK_INITIALIZED)
        return None

    async def _initialize_one(self, entry: Entry) -> bool:
        """Initialize one task in the initialize phase; False when it failed (the error is recorded)."""
        failure: BaseException | None = None
        with anyio.CancelScope() as stop_scope:
            self._init_scope = stop_scope
            try:
                failure = await self._initialize_stage(entry)
            finally:
                self._init_scope = None
        if stop_scope.cancelled_caught and failure is None and not entry.initialized:
            entry.state = "cancelled"
            self._emit_end(entry, EventKind.TASK_CANCELLED)
            return True
        if failure is not None:
            self._fail(entry, Stage.INITIALIZE, failure)
            return False
        return True

    async def _cleanup_stage(self, entry: Entry, *, forcible: bool) -> BaseException | None:
        """Run ``entry``'s cleanup shielded and within its timeout; returns its failure or ``None``.

        ``forcible``: :meth:`cancel_cleanups` may cancel it (the cleanup phase); a restart's cleanup runs
        inside the task's execute and is only bounded by its timeout.
        """
        entry.initialized = False  # never cleaned up twice
        self._begin_stage(entry, Stage.CLEANUP, EventKind.TASK_CLEANING_UP)
        timeout = entry.cleanup_timeout
        deadline = anyio.move_on_after(timeout)
        failure: BaseException | None = None
        with anyio.CancelScope(shield=True) as scope:
            if forcible:
                entry.scope = scope
                self._cleaning = entry
            try:
                with deadline:
                    awaitable = entry.task.cleanup()
                    entry.awaitable = awaitable
                    await awaitable
            except Exception as exc:
                failure = _timed_out(Stage.CLEANUP, timeout, exc) if deadline.cancel_called else exc
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                failure = exc
                if self._fatal is None:
                    self._fatal = exc
            finally:
                entry.awaitable = None
                if forcible:
                    self._cleaning = None
        if failure is None and deadline.cancelled_caught:
            failure = _timed_out(Stage.CLEANUP, timeout)
        elif failure is None and scope.cancelled_caught:
            failure = RuntimeError(
                "cleanup was cancelled before it finished by a forced shutdown (cancel_cleanups(), e.g. the "
                "second SIGINT/SIGTERM under lifecycle.run)"
            )
        if failure is None:
            entry.state = "done"
            self._emit_end(entry, EventKind.TASK_CLEANED_UP)
        return failure

    async def _cleanup_one(self, entry: Entry) -> None:
        """Clean up one task in the cleanup phase, recording a failure; the entry's run is then over."""
        failure = await self._cleanup_stage(entry, forcible=True)
        entry.ended_at = time.time()
        if failure is not None:
            self._fail(entry, Stage.CLEANUP, failure, record=isinstance(failure, Exception))
        entry.finish()

    async def _execute_attempt(self, entry: Entry) -> Failure | None:
        """Run ``entry``'s execute once; its failure (a STRICT early return included) or ``None``."""
        self._begin_stage(entry, Stage.EXECUTE, EventKind.TASK_EXECUTING)
        if entry.starting or entry.restarting:
            self._settle_readiness(entry)
        try:
            awaitable = entry.execute_fn()
            entry.awaitable = awaitable
            await awaitable
        except Exception as exc:
            return Stage.EXECUTE, exc
        if entry.task_type is TaskType.STRICT and not self._stop_requested and not entry.cancel_requested:
            return Stage.EXECUTE, UnexpectedStopError(
                f"execute of STRICT task {entry.name!r} returned before shutdown; add it as "
                "TaskType.ERROR if returning early is fine, or as TaskType.STOP_GROUP to stop the manager"
            )
        return None

    # ================================================================== restarts

    async def _execute_supervised(self, entry: Entry) -> tuple[Failure | None, str]:
        """Run ``entry``'s execute, then its restart policy if it has one (see :meth:`_supervise`)."""
        failure = await self._execute_attempt(entry)
        if entry.window is None:
            return failure, ""
        return await self._supervise(entry, failure)

    async def _supervise(self, entry: Entry, failure: Failure | None) -> tuple[Failure | None, str]:
        """Apply ``entry``'s restart policy to how its execute ended, as long as it allows.

        A task with a :class:`~lifecycle.Restart` policy goes through the same steps again when its execute
        ends: cleanup (at once, releasing what it held), the backoff delay, initialize, execute.

        Returns the final outcome (``None``: ended without error) and, when the policy gave up (also after a
        return, with ``"always"``), a note saying how many restarts happened. Cancellation (shutdown, the
        handle) propagates.
        """
        policy, window = entry.restart, entry.window
        assert policy is not None
        assert window is not None
        while True:
            if self._stop_requested or entry.cancel_requested:
                return failure, ""
            if failure is None and policy.mode != "always":
                return None, ""
            now = self._clock()
            if not window.allows(now):
                self._restarting_done(entry)
                return failure, (
                    f"gave up after {entry.restarts} restart{'s' if entry.restarts != 1 else ''}: "
                    f"{window.in_window(now)} within {policy.within:g} s reached max_restarts="
                    f"{policy.max_restarts}"
                )
            number = window.record(now)
            entry.restarts += 1
            self._restart_totals[entry.name] = self._restart_totals.get(entry.name, 0) + 1
            delay = policy.backoff.delay(number, self._rng)
            self._announce_restart(entry, failure, number, delay)
            failure = None
            if entry.kind == "task" and entry.initialized:
                cleanup_failure = await self._cleanup_stage(entry, forcible=False)
                if cleanup_failure is not None and not isinstance(cleanup_failure, Exception):
                    raise cleanup_failure  # KeyboardInterrupt, SystemExit...: stop, never restart
                if cleanup_failure is not None:
                    failure = (Stage.CLEANUP, cleanup_failure)
                    continue
            entry.state = "restarting"
            await self._sleep(delay)
            if entry.kind == "task":
                init_failure = await self._initialize_stage(entry)
                if init_failure is not None:
                    failure = (Stage.INITIALIZE, init_failure)
                    continue
            failure = await self._execute_attempt(entry)

    def _announce_restart(self, entry: Entry, failure: Failure | None, number: int, delay: float) -> None:
        policy = entry.restart
        assert policy is not None
        error = None
        stage = Stage.EXECUTE
        if failure is not None:
            stage, cause = failure
            error = TaskError(entry.name, stage, entry.task_type, cause, entry.restarts - 1)
            entry.last_error = error
        entry.state = "restarting"
        self._events.emit(
            EventKind.TASK_RESTARTING,
            _WARNING,
            task_name=entry.name,
            task_type=entry.task_type,
            stage=stage,
            duration=delay,
            error=error,
            detail=(
                f"restarting in {delay:.3f} s (restart {number} of {policy.max_restarts} within "
                f"{policy.within:g} s, {entry.restarts} in total)"
            ),
        )
        self._restarting_begins(entry)

    # ================================================================== checks and cancellation

    def _cancel_entry(self, entry: Entry) -> None:
        """Cancel one execute task: what :meth:`cancel` and the task's :class:`ExecuteHandle` call."""
        if entry.finished:
            return
        self._check_thread("ExecuteHandle.cancel")
        entry.cancel_requested = True
        if entry.scope is not None:
            entry.scope.cancel()
        elif entry.task_handle is not None:
            entry.task_handle.cancel()

    def _check_thread(self, what: str) -> None:
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                f"{what}() was called from a thread that is not running task manager {self._name!r}; call it "
                f"through anyio.from_thread.run_sync({what.split('.')[-1]}, ...) or a BlockingPortal"
            )

    def _check_new_name(self, name: object) -> None:
        check_name(name, "a task name")
        if name in self._entries:
            raise ValueError(
                f"a task named {name!r} is already in task manager {self._name!r}; task names must be unique"
            )

    @staticmethod
    def _check_task_type(name: str, task_type: object) -> None:
        if not isinstance(task_type, TaskType):
            raise TypeError(
                f"task {name!r}: task_type must be a lifecycle.TaskType (STRICT, ERROR or STOP_GROUP), "
                f"got {task_type!r}"
            )
