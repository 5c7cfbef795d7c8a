"""The stage machine behind TaskManager: initialize in order, execute together, clean up in reverse.

:class:`StageMachine` owns a run's mutable state and the three phases; :class:`~lifecycle.TaskManager`
adds the public surface (adding work, ``run()``, ``shutdown()``, the Task protocol) on top of it. The
manager moves NEW → INITIALIZING → RUNNING → STOPPING → STOPPED, once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from ._entry import Entry
from ._errors import TaskError, UnexpectedStopError
from ._events import EventKind, EventSink
from ._stuck import StuckTask, await_stack, format_stuck_report, innermost_user_line
from ._task import ManagerState, Stage, TaskType

__all__ = ["StageMachine"]

_NEW, _INITIALIZING, _RUNNING = ManagerState.NEW, ManagerState.INITIALIZING, ManagerState.RUNNING
_STOPPING, _STOPPED = ManagerState.STOPPING, ManagerState.STOPPED
_INFO, _ERROR = logging.INFO, logging.ERROR

# anyio >= 4.14 gives every task spawned by start_soon() its own cancel scope, reachable through the
# TaskHandle it returns; older versions return None, so each execute task then needs a scope of ours.
_OWN_SCOPE = not hasattr(anyio, "TaskHandle")


class StageMachine:
    """A run's state and phases. Not public: subclassed by :class:`~lifecycle.TaskManager`."""

    def __init__(self, name: str, shutdown_timeout: float | None, events: EventSink) -> None:
        self._name = name
        self._shutdown_timeout = shutdown_timeout
        self._events = events
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
