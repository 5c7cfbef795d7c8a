"""TaskStatus: one row of :meth:`TaskManager.status`, a snapshot of where a task is in its life."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._task import Stage, TaskType

__all__ = ["TaskKind", "TaskRunState", "TaskStatus"]

#: ``"task"`` for a full :class:`~lifecycle.Task`, ``"execute"`` for an execute task.
TaskKind = Literal["task", "execute"]

#: Where the task is within ``stage``:
#: ``"pending"`` (not started yet), ``"running"``, ``"done"`` (the stage completed: initialized, execute
#: returned, cleaned up), ``"cancelled"`` (execute cancelled by shutdown or by its handle), ``"failed"``, or
#: ``"skipped"`` (the manager stopped before the task's turn came: ``stage`` is ``None``).
TaskRunState = Literal["pending", "running", "done", "cancelled", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of one task, as returned by :meth:`TaskManager.status`.

    Attributes:
        name: the name the task was added under.
        kind: ``"task"`` (initialize / execute / cleanup) or ``"execute"`` (execute only).
        task_type: its :class:`~lifecycle.TaskType`.
        stage: the stage it is in, or last was in; ``None`` before it started.
        state: where it is within that stage (see :data:`TaskRunState`).
        started_at: wall-clock time (``time.time()``) its first stage started, or ``None``.
        ended_at: wall-clock time its last stage ended (cleanup for a task, execute for an execute task),
            or ``None`` while it has not ended.
        error: the first error it raised, or ``None``.

    Example: a ``Task`` whose execute was cancelled at shutdown and then cleaned up reads
    ``stage=Stage.CLEANUP, state="done"``; a ``STRICT`` execute task that returned early reads
    ``stage=Stage.EXECUTE, state="failed"`` with an :class:`~lifecycle.UnexpectedStopError` cause.
    """

    name: str
    kind: TaskKind
    task_type: TaskType
    stage: Stage | None
    state: TaskRunState
    started_at: float | None
    ended_at: float | None
    error: BaseException | None

    @property
    def duration(self) -> float | None:
        """Seconds from ``started_at`` to ``ended_at`` (wall clock), or ``None`` while it has not ended."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at
