"""The stage machine behind TaskManager: initialize in order, execute together, clean up in reverse.

:class:`StageMachine` drives the three phases over the steps of ``_steps.py``;
:class:`~lifecycle.TaskManager` adds the public surface (adding work, ``run()``, ``shutdown()``, the Task
protocol) on top of it. The manager moves NEW → INITIALIZING → RUNNING → STOPPING → STOPPED, once. On
shutdown from RUNNING, readiness turns false first, then the manager waits ``drain_delay`` (the executes
keep running), then cancels the executes, then cleans up.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import anyio

from ._entry import Entry
from ._errors import UnexpectedStopError
from ._events import EventKind
from ._steps import Failure, StageSteps
from ._stuck import format_stuck_report, innermost_user_line
from ._task import ManagerState, Stage, TaskType

__all__ = ["StageMachine"]

_INITIALIZING, _RUNNING, _STOPPED = ManagerState.INITIALIZING, ManagerState.RUNNING, ManagerState.STOPPED
_INFO, _WARNING, _ERROR = logging.INFO, logging.WARNING, logging.ERROR

# anyio >= 4.14 gives every task spawned by start_soon() its own cancel scope, reachable through the
# TaskHandle it returns; older versions return None, so each execute task then needs a scope of ours.
_OWN_SCOPE = not hasattr(anyio, "TaskHandle")


class StageMachine(StageSteps):
    """A run's phases. Not public: subclassed by :class:`~lifecycle.TaskManager`."""

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
                            since = self._timing.clock() if drained else self._stop_requested_at
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
                await self._timing.sleep(delay)
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
            remaining = since + timeout - self._timing.clock()
            with anyio.move_on_after(remaining):
                await self._executes_ended.wait()
                return
            self._stuck = True
            # Not the stage's running time: an execute may have run for days before the shutdown.
            after = self._timing.clock() - self._stop_requested_at
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
