"""The manager's private record of one task: what it is and where it is in its life."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._restart import Restart, RestartWindow
from ._status import TaskKind, TaskRunState, TaskStatus
from ._task import Stage, TaskType

__all__ = ["Entry"]


class Entry:
    """Mutable, slot-based bookkeeping for one task; the hot path only sets attributes on it."""

    __slots__ = (
        "awaitable",
        "cancel_requested",
        "cleanup_timeout",
        "done_event",
        "ended_at",
        "error",
        "execute_fn",
        "finished",
        "initialize_timeout",
        "initialized",
        "kind",
        "last_error",
        "level",
        "name",
        "restart",
        "restarting",
        "restarts",
        "runtime",
        "scope",
        "stage",
        "stage_t0",
        "started_at",
        "starting",
        "state",
        "task",
        "task_handle",
        "task_type",
        "window",
    )

    def __init__(
        self,
        name: str,
        kind: TaskKind,
        task: Any,
        task_type: TaskType,
        execute_fn: Callable[[], Awaitable[None]],
        *,
        runtime: bool = False,
        initialize_timeout: float | None = None,
        cleanup_timeout: float | None = None,
        restart: Restart | None = None,
    ) -> None:
        self.name: str = name
        self.kind: TaskKind = kind
        self.task: Any = task
        self.task_type: TaskType = task_type
        self.execute_fn: Callable[[], Awaitable[None]] = execute_fn
        self.runtime: bool = runtime
        # Work hot-added while running (one per connection, say) reports its steps at DEBUG, not INFO.
        self.level: int = logging.DEBUG if runtime else logging.INFO
        self.initialize_timeout: float | None = initialize_timeout
        self.cleanup_timeout: float | None = cleanup_timeout
        self.stage: Stage | None = None
        self.state: TaskRunState = "pending"
        self.stage_t0: float = 0.0
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self.initialized: bool = False
        self.finished: bool = False
        self.cancel_requested: bool = False
        self.scope: anyio.CancelScope | None = None
        # anyio >= 4.14: the TaskHandle start_soon returns (it has its own cancel scope, so cancelling one
        # execute task needs no extra scope of ours); None on older anyio.
        self.task_handle: Any = None
        self.awaitable: object | None = None
        self.done_event: anyio.Event | None = None
        self.restart: Restart | None = restart
        self.window: RestartWindow | None = None if restart is None else RestartWindow(restart)
        self.restarts: int = 0
        self.last_error: BaseException | None = None
        # Between a failure and the next execute (backoff, cleanup, initialize):
        self.restarting: bool = False
        # Queued at the start of the execute phase and not executing yet (readiness):
        self.starting: bool = False

    def snapshot(self) -> TaskStatus:
        """This entry as an immutable :class:`TaskStatus` row."""
        return TaskStatus(
            name=self.name,
            kind=self.kind,
            task_type=self.task_type,
            stage=self.stage,
            state=self.state,
            started_at=self.started_at,
            ended_at=self.ended_at,
            error=self.error,
            restarts=self.restarts,
            last_error=self.last_error,
        )

    def finish(self) -> None:
        """Mark the entry's part in this run as over and wake whoever waits on its handle."""
        self.finished = True
        self.scope = None
        self.task_handle = None
        self.awaitable = None
        if self.done_event is not None:
            self.done_event.set()
