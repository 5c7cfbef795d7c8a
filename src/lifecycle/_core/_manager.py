"""TaskManager: initialize in order, execute together, shut down and clean up in reverse (goasync on anyio).

The manager moves NEW → INITIALIZING → RUNNING → STOPPING → STOPPED, once. ``run()`` drives all three
phases; a manager added to another manager as a Task drives them through ``initialize`` / ``execute`` /
``cleanup`` instead, which is what makes managers nest.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable
from types import EllipsisType

import anyio

from ._background import background_group
from ._entry import Entry
from ._errors import TaskError, TaskManagerError, summarize
from ._events import EventSink, LifecycleEvent
from ._handle import ExecuteHandle
from ._readiness import Health
from ._restart import Restart
from ._stages import StageMachine
from ._status import TaskStatus
from ._stuck import format_stuck_report
from ._systemd import SystemdNotifier
from ._task import ExecuteTask, ManagerState, Task, TaskType

__all__ = ["TaskManager"]

_NEW, _STOPPED = ManagerState.NEW, ManagerState.STOPPED


def _check_timeout(what: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def _check_restart(name: str, restart: object) -> Restart | None:
    if restart is None or isinstance(restart, Restart):
        return restart
    raise TypeError(
        f"task {name!r}: restart must be a lifecycle.Restart (e.g. Restart(max_restarts=5, within=60)) or "
        f"None, got {restart!r}"
    )


class TaskManager(StageMachine):
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

    Raises ``ValueError`` for a timeout that is not a positive number or ``None``, or a negative
    ``drain_delay``.

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
        initialize_timeout: float | None = None,
        cleanup_timeout: float | None = None,
        shutdown_timeout: float | None = None,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        drain_delay: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"TaskManager name must be a non-empty string, got {name!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking a LifecycleEvent, got {on_event!r}")
        self._initialize_timeout = _check_timeout("initialize_timeout", initialize_timeout)
        self._cleanup_timeout = _check_timeout("cleanup_timeout", cleanup_timeout)
        if drain_delay is not None and (
            isinstance(drain_delay, bool) or not isinstance(drain_delay, (int, float)) or not drain_delay >= 0
        ):
            raise ValueError(f"drain_delay must be a number of seconds >= 0 or None, got {drain_delay!r}")
        super().__init__(
            name,
            _check_timeout("shutdown_timeout", shutdown_timeout),
            None if not drain_delay else float(drain_delay),
            EventSink(name, on_event),
        )

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
        restart: Restart | None = None,
    ) -> None:
        """Add a :class:`~lifecycle.Task` (initialize / execute / cleanup). Only before :meth:`run`.

        ``initialize_timeout`` / ``cleanup_timeout`` override the manager's defaults for this task (``...``
        keeps the default, ``None`` removes the bound). ``restart``: a :class:`~lifecycle.Restart` policy;
        when execute fails the task is cleaned up, initialized and executed again (a failing first
        ``initialize`` is never restarted: startup stops as usual).

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
                else _check_timeout("initialize_timeout", initialize_timeout)
            ),
            cleanup_timeout=(
                self._cleanup_timeout
                if cleanup_timeout is ...
                else _check_timeout("cleanup_timeout", cleanup_timeout)
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
        the service keeps serving during it) or from a foreign thread, ``ValueError`` for a name in use,
        ``TypeError`` for something that is neither an ExecuteTask nor callable.
        """
        # STOPPING and STOPPED both come after the stop request, which is all there is to check.
        if self._stop_requested and not self._draining:
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
        notifier = SystemdNotifier.from_environment()
        outcome: BaseException | None = None
        # The background group outlives the phases: the systemd watchdog and work a task's initialize starts
        # for the whole run (HealthServer) live there. Errors are raised outside it, never wrapped in a group.
        async with anyio.create_task_group() as background:
            with background_group(background):
                if notifier is not None:
                    self._events.add_listener(notifier.on_event, steps=False)
                    background.start_soon(notifier.watchdog, self.health, self._timing.sleep)
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
        return super().health()

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
            await self._execute_phase()
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

    def _error_group(self, errors: list[TaskError]) -> TaskManagerError:
        return TaskManagerError(summarize(self._name, errors), errors)

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
