"""TaskManager: initialize in order, execute together, shut down and clean up in reverse (goasync on anyio).

The manager moves NEW → INITIALIZING → RUNNING → STOPPING → STOPPED, once. ``run()`` drives all three
phases; a manager added to another manager as a Task drives them through ``initialize`` / ``execute`` /
``cleanup`` instead, which is what makes managers nest.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from types import EllipsisType
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from ._entry import Entry
from ._errors import TaskError, TaskManagerError, UnexpectedStopError, summarize
from ._events import EventKind, EventSink, LifecycleEvent
from ._handle import ExecuteHandle
from ._status import TaskStatus
from ._stuck import StuckTask, await_stack, format_stuck_report, innermost_user_line
from ._task import ExecuteTask, ManagerState, Stage, Task, TaskType

__all__ = ["TaskManager"]

_NEW, _INITIALIZING, _RUNNING = ManagerState.NEW, ManagerState.INITIALIZING, ManagerState.RUNNING
_STOPPING, _STOPPED = ManagerState.STOPPING, ManagerState.STOPPED
_INFO, _ERROR = logging.INFO, logging.ERROR

# anyio >= 4.14 gives every task spawned by start_soon() its own cancel scope, reachable through the
# TaskHandle it returns; older versions return None, so each execute task then needs a scope of ours.
_OWN_SCOPE = not hasattr(anyio, "TaskHandle")


def _check_timeout(what: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return float(value)


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

    Raises ``ValueError`` for a timeout that is not a positive number or ``None``.

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
        initialize_timeout: float | None = None,
        cleanup_timeout: float | None = None,
        shutdown_timeout: float | None = None,
        on_event: Callable[[LifecycleEvent], None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"TaskManager name must be a non-empty string, got {name!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking a LifecycleEvent, got {on_event!r}")
        self._name = name
        self._initialize_timeout = _check_timeout("initialize_timeout", initialize_timeout)
        self._cleanup_timeout = _check_timeout("cleanup_timeout", cleanup_timeout)
        self._shutdown_timeout = _check_timeout("shutdown_timeout", shutdown_timeout)
        self._events = EventSink(name, on_event)
        self._entries: dict[str, Entry] = {}
        self._tasks: list[Entry] = []  # full Tasks, in add order
        self._queued: list[Entry] = []  # execute stages waiting for the execute phase, in add order
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

    # ------------------------------------------------------------------ public surface

    @property
    def name(self) -> str:
        """The manager's name."""
        return self._name

    @property
    def state(self) -> ManagerState:
        """Where the manager is: NEW, INITIALIZING, RUNNING, STOPPING or STOPPED."""
        return self._state

    def add_task(
        self,
        name: str,
        task: Task,
        task_type: TaskType = TaskType.STRICT,
        *,
        initialize_timeout: float | EllipsisType | None = ...,
        cleanup_timeout: float | EllipsisType | None = ...,
    ) -> None:
        """Add a :class:`~lifecycle.Task` (initialize / execute / cleanup). Only before :meth:`run`.

        ``initialize_timeout`` / ``cleanup_timeout`` override the manager's defaults for this task (``...``
        keeps the default, ``None`` removes the bound).

        Raises ``RuntimeError`` once the manager has started (use :meth:`add_execute_task` for work added
        while running), ``ValueError`` for a name already in use, ``TypeError`` for an object without async
        ``initialize``, ``execute`` and ``cleanup`` methods (the message names what is missing).
        """
        if self._mode is not None or self._state is not _NEW or self._stop_requested:
            raise RuntimeError(
                f"add_task({name!r}): tasks can only be added before run(); task manager {self._name!r} is "
                f"{self._state.value}. Use add_execute_task() to add work while the manager runs."
            )
        self._check_new_name(name)
        self._check_task_type(name, task_type)
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
                else _check_timeout("initialize_timeout", initialize_timeout)
            ),
            cleanup_timeout=(
                self._cleanup_timeout
                if cleanup_timeout is ...
                else _check_timeout("cleanup_timeout", cleanup_timeout)
            ),
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
    ) -> ExecuteHandle:
        """Add execute-only work: an :class:`~lifecycle.ExecuteTask` or a zero-argument ``async def``.

        Before :meth:`run` and while initializing it is queued (it starts with the execute stage, in add
        order); while running it starts at once. Every :class:`~lifecycle.TaskType` is accepted, STOP_GROUP
        included. Call it from the manager's event loop (any task); from another thread use
        ``anyio.from_thread.run_sync(manager.add_execute_task, ...)`` or a blocking portal. An execute task
        added while running is forgotten (its row leaves :meth:`status`, its name is free again) once it ends
        without error, so a long-running service can add one per request.

        Returns an :class:`~lifecycle.ExecuteHandle` to cancel or await this one task.

        Raises ``RuntimeError`` once shutdown has begun or from a foreign thread, ``ValueError`` for a name
        in use, ``TypeError`` for something that is neither an ExecuteTask nor callable.
        """
        if self._stop_requested or self._state is _STOPPING or self._state is _STOPPED:
            raise RuntimeError(
                f"add_execute_task({name!r}): task manager {self._name!r} is shutting down "
                f"({self._state.value}); no work can be added once shutdown has begun"
            )
        self._check_thread("add_execute_task")
        if name in self._entries or not isinstance(name, str) or not name:
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
        task_group = self._task_group
        entry = Entry(name, "execute", task, task_type, fn, runtime=task_group is not None)
        self._entries[name] = entry
        if task_type is TaskType.STOP_GROUP:
            self._stop_group_left += 1
        if task_group is not None:
            entry.task_handle = task_group.start_soon(self._execute_one, entry, name=name)
        else:
            self._queued.append(entry)
        return ExecuteHandle(self, entry)

    async def run(self) -> None:
        """Initialize every task in order, execute them together until shutdown, then clean up in reverse.

        Returns ``None`` when nothing failed. Raises :class:`~lifecycle.TaskManagerError` holding every
        :class:`~lifecycle.TaskError` (initialize, then execute as they happened, then cleanup). When
        cancelled from outside it shuts down and cleans up, then lets the cancellation propagate; a task's
        ``KeyboardInterrupt`` / ``SystemExit`` is re-raised after the cleanup. Raises ``RuntimeError`` when
        called a second time, or on a manager already started as another manager's task.
        """
        self._claim("run")
        try:
            await self._initialize_phase()
            if not self._init_failed:
                await self._execute_phase()
            if self._fatal is not None:
                raise self._fatal
        finally:
            await self._cleanup_phase()
        if self._errors:
            raise TaskManagerError(summarize(self._name, self._errors), self._errors)

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

    def cancel_cleanups(self) -> int:
        """Cancel the cleanup running now (forced shutdown: the second signal of :func:`lifecycle.run`).

        The cleanup gets a cancellation inside its shield and is recorded as a failed cleanup; later
        cleanups still run. Reaches into a nested manager's running cleanup too. Returns how many cleanups
        were cancelled (0 when none is running).
        """
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

    # ------------------------------------------------------------------ the Task protocol (nesting)

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
            raise TaskManagerError(summarize(self._name, self._errors), self._errors)
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
            await self._execute_phase()
        except anyio.get_cancelled_exc_class():
            if len(self._errors) > mark:
                errors = self._errors[mark:]
                raise TaskManagerError(summarize(self._name, errors), errors) from None
            raise
        if self._fatal is not None:
            raise self._fatal
        if len(self._errors) > mark:
            errors = self._errors[mark:]
            raise TaskManagerError(summarize(self._name, errors), errors)

    async def cleanup(self) -> None:
        """Clean up every initialized task in reverse order; raises :class:`~lifecycle.TaskManagerError`."""
        mark = len(self._errors)
        await self._cleanup_phase()
        if len(self._errors) > mark:
            errors = self._errors[mark:]
            raise TaskManagerError(summarize(self._name, errors), errors)

    def __repr__(self) -> str:
        return f"<TaskManager {self._name!r} {self._state.value}, {len(self._entries)} task(s)>"

    # ------------------------------------------------------------------ phases

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

    async def _initialize_phase(self) -> None:
        self._set_state(_INITIALIZING)
        for entry in self._tasks:
            if self._stop_requested:
                break
            if not await self._initialize_one(entry):
                self._init_failed = True
                self._request_stop(f"task {entry.name!r} failed to initialize")
                break

    async def _initialize_one(self, entry: Entry) -> bool:
        """Initialize one task; False when it failed (the error is recorded)."""
        self._begin_stage(entry, Stage.INITIALIZE, EventKind.TASK_INITIALIZING)
        timeout = entry.initialize_timeout
        deadline = anyio.move_on_after(timeout)
        try:
            with anyio.CancelScope() as stop_scope:
                self._init_scope = stop_scope
                with deadline:
                    awaitable = entry.task.initialize()
                    entry.awaitable = awaitable
                    await awaitable
        except Exception as exc:
            cause: BaseException = exc
            if deadline.cancel_called:
                cause = TimeoutError(f"initialize did not complete within {timeout} s")
                cause.__cause__ = exc
            self._fail(entry, Stage.INITIALIZE, cause)
            return False
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                entry.state = "cancelled"
            else:  # KeyboardInterrupt, SystemExit...: reported, then re-raised by run() after cleanup
                self._fail(entry, Stage.INITIALIZE, exc, record=False)
            raise
        finally:
            self._init_scope = None
            entry.awaitable = None
        if deadline.cancelled_caught:
            timeout_error = TimeoutError(f"initialize did not complete within {timeout} s")
            self._fail(entry, Stage.INITIALIZE, timeout_error)
            return False
        if stop_scope.cancelled_caught:
            entry.state = "cancelled"
            self._emit_end(entry, EventKind.TASK_CANCELLED)
            return True
        entry.initialized = True
        entry.state = "done"
        self._emit_end(entry, EventKind.TASK_INITIALIZED)
        return True

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
                    self._set_state(_RUNNING)
                    for entry in queued:
                        entry.task_handle = task_group.start_soon(self._execute_one, entry, name=entry.name)
                    try:
                        await self._stop_event.wait()
                    finally:
                        self._request_stop("the task manager was cancelled")
                        self._task_group = None
                        if self._shutdown_timeout is not None:
                            watch_group.start_soon(self._watch_shutdown, self._shutdown_timeout)
                        task_group.cancel_scope.cancel()
            finally:
                executes_ended.set()

    async def _execute_one(self, entry: Entry) -> None:
        cancelled_before_start = entry.cancel_requested
        if cancelled_before_start:
            self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
            return
        self._begin_stage(entry, Stage.EXECUTE, EventKind.TASK_EXECUTING)
        try:
            if _OWN_SCOPE:
                with anyio.CancelScope() as scope:
                    entry.scope = scope
                    awaitable = entry.execute_fn()
                    entry.awaitable = awaitable
                    await awaitable
            else:
                awaitable = entry.execute_fn()
                entry.awaitable = awaitable
                await awaitable
        except Exception as exc:
            self._fail(entry, Stage.EXECUTE, exc)
            self._request_stop(f"task {entry.name!r} failed in execute")
            self._end_execute(entry, "failed", None)
            return
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
                raise
            # KeyboardInterrupt, SystemExit...: stop, clean up, and let run() re-raise it.
            self._fail(entry, Stage.EXECUTE, exc, record=False)
            if self._fatal is None:
                self._fatal = exc
            self._request_stop(f"task {entry.name!r} raised {type(exc).__name__}")
            self._end_execute(entry, "failed", None)
            return
        if entry.cancel_requested:
            self._end_execute(entry, "cancelled", EventKind.TASK_CANCELLED)
        elif entry.task_type is TaskType.STRICT and not self._stop_requested:
            self._fail(
                entry,
                Stage.EXECUTE,
                UnexpectedStopError(
                    f"execute of STRICT task {entry.name!r} returned before shutdown; add it as "
                    "TaskType.ERROR if returning early is fine, or as TaskType.STOP_GROUP to stop the manager"
                ),
            )
            self._request_stop(f"STRICT task {entry.name!r} stopped unexpectedly")
            self._end_execute(entry, "failed", None)
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
        if entry.task_type is TaskType.STOP_GROUP:
            self._stop_group_left -= 1
            if self._stop_group_left == 0:
                self._request_stop("every STOP_GROUP task has returned")
        if entry.runtime and entry.error is None:
            del self._entries[entry.name]
        entry.finish()

    async def _watch_shutdown(self, timeout: float) -> None:
        with anyio.CancelScope(shield=True):
            assert self._executes_ended is not None
            remaining = self._stop_requested_at + timeout - time.monotonic()
            with anyio.move_on_after(remaining):
                await self._executes_ended.wait()
                return
            stuck = [s for s in self._running_stages() if s.stage is Stage.EXECUTE]
            report = format_stuck_report(
                self._name,
                f"shutdown stuck: {len(stuck)} task(s) still running {timeout} s after the shutdown request",
                stuck,
            )
            for item in stuck:
                entry = self._entries[item.name]
                where = innermost_user_line(item.stack) or "an unknown place"
                cause = TimeoutError(
                    f"execute still running {item.running_for:.1f} s after shutdown was requested "
                    f"(shutdown_timeout={timeout} s), waiting at {where}"
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

    async def _cleanup_one(self, entry: Entry) -> None:
        entry.initialized = False  # never cleaned up twice
        self._begin_stage(entry, Stage.CLEANUP, EventKind.TASK_CLEANING_UP)
        timeout = entry.cleanup_timeout
        deadline = anyio.move_on_after(timeout)
        failure: BaseException | None = None
        with anyio.CancelScope(shield=True) as scope:
            entry.scope = scope
            self._cleaning = entry
            try:
                with deadline:
                    awaitable = entry.task.cleanup()
                    entry.awaitable = awaitable
                    await awaitable
            except Exception as exc:
                failure = exc
                if deadline.cancel_called:
                    failure = TimeoutError(f"cleanup did not complete within {timeout} s")
                    failure.__cause__ = exc
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                failure = exc
                if self._fatal is None:
                    self._fatal = exc
            finally:
                self._cleaning = None
        if failure is None and deadline.cancelled_caught:
            failure = TimeoutError(f"cleanup did not complete within {timeout} s")
        elif failure is None and scope.cancelled_caught:
            failure = RuntimeError(
                "cleanup was cancelled before it finished by a forced shutdown (cancel_cleanups(), e.g. the "
                "second SIGINT/SIGTERM under lifecycle.run)"
            )
        entry.ended_at = time.time()
        if failure is not None:
            self._fail(entry, Stage.CLEANUP, failure, record=isinstance(failure, Exception))
        else:
            entry.state = "done"
            self._emit_end(entry, EventKind.TASK_CLEANED_UP)
        entry.finish()

    # ------------------------------------------------------------------ helpers

    def _request_stop(self, reason: str) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        self._stop_requested_at = time.monotonic()
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
    ) -> TaskError:
        error = TaskError(entry.name, stage, entry.task_type, cause)
        if record:
            self._errors.append(error)
        if entry.error is None:
            entry.error = error
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

    def _cancel_entry(self, entry: Entry) -> None:
        if entry.finished:
            return
        self._check_thread("ExecuteHandle.cancel")
        entry.cancel_requested = True
        if entry.scope is not None:
            entry.scope.cancel()
        elif entry.task_handle is not None:
            entry.task_handle.cancel()

    def _add_listener(self, listener: Callable[[LifecycleEvent], None]) -> None:
        self._events.add_listener(listener)

    def _check_thread(self, what: str) -> None:
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                f"{what}() was called from a thread that is not running task manager {self._name!r}; call it "
                f"through anyio.from_thread.run_sync({what.split('.')[-1]}, ...) or a BlockingPortal"
            )

    def _check_new_name(self, name: object) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a task name must be a non-empty string, got {name!r}")
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
