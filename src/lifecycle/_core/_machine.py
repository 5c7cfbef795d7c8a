"""The state of one manager's run and the bookkeeping every stage shares: events, failures, readiness.

:class:`MachineCore` is the bottom of the manager's class stack: ``MachineCore`` (state, readiness) →
``StageSteps`` (one stage of one task, restarts) → ``StageMachine`` (the three phases, drain) →
:class:`~lifecycle.TaskManager` (the public surface).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from ._entry import Entry
from ._errors import TaskError
from ._events import EventKind, EventSink
from ._readiness import Health, TaskHealth
from ._restart import Timing
from ._stuck import StuckTask, await_stack
from ._task import ManagerState, Stage

__all__ = ["MachineCore"]

_NEW, _INITIALIZING, _RUNNING = ManagerState.NEW, ManagerState.INITIALIZING, ManagerState.RUNNING
_STOPPING, _STOPPED = ManagerState.STOPPING, ManagerState.STOPPED
_INFO, _ERROR = logging.INFO, logging.ERROR


class MachineCore:
    """A run's mutable state and shared bookkeeping. Not public."""

    def __init__(
        self, name: str, shutdown_timeout: float | None, drain_delay: float | None, events: EventSink
    ) -> None:
        self._name = name
        self._shutdown_timeout = shutdown_timeout
        self._drain_delay = drain_delay
        self._events = events
        self._timing = Timing()
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
        # readiness and drain
        self._ready = False
        self._starting_left = 0  # executes queued at the start of the execute phase, not started yet
        self._restarting_left = 0  # tasks between a failure and their next execute
        self._draining = False  # inside the drain delay: executes still run, add_execute_task still works
        self._drain_scope: anyio.CancelScope | None = None
        self._stuck = False
        self._restart_totals: dict[str, int] = {}

    # ------------------------------------------------------------------ run state

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
        self._stop_requested_at = self._timing.clock()
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

    # ------------------------------------------------------------------ readiness

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
            self._events.emit(EventKind.NOT_READY, logging.WARNING, detail=reason or "not ready")

    def health(self) -> Health:
        """A typed snapshot: ready, live, draining, and each task's state (see :class:`~lifecycle.Health`)."""
        tasks = tuple(
            TaskHealth(e.name, e.kind, e.stage, e.state, e.error is None, e.restarts, e.restarting)
            for e in self._entries.values()
        )
        state = self._state
        live = state is not _STOPPED and not self._stuck and all(t.live for t in tasks)
        draining = self._stop_requested and state is not _STOPPED and state is not _NEW
        return Health(self._name, state, self._ready, live, draining, tasks)

    # ------------------------------------------------------------------ events and failures

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
