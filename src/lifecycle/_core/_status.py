"""TaskStatus: one row of :meth:`TaskManager.status`, a snapshot of where a task is in its life."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ._task import Stage, TaskType

__all__ = ["TaskKind", "TaskRunState", "TaskStatus", "describe_error"]

#: ``"task"`` for a full :class:`~lifecycle.Task`, ``"execute"`` for an execute task.
TaskKind = Literal["task", "execute"]

#: Where the task is within ``stage``:
#: ``"pending"`` (not started yet), ``"running"``, ``"done"`` (the stage completed: initialized, execute
#: returned, cleaned up), ``"cancelled"`` (execute cancelled by shutdown or by its handle), ``"failed"``,
#: ``"skipped"`` (the manager stopped before the task's turn came: ``stage`` is ``None``), or
#: ``"restarting"`` (its execute ended and its :class:`~lifecycle.Restart` policy waits out the backoff
#: before running it again).
TaskRunState = Literal["pending", "running", "done", "cancelled", "failed", "skipped", "restarting"]


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
        error: the error that ended it (the first one), or ``None``. Failures its restart policy recovered
            from are not here but in ``last_error``.
        restarts: how many times its :class:`~lifecycle.Restart` policy has restarted it.
        last_error: the most recent failure (a :class:`~lifecycle.TaskError`), restarted or not, or ``None``.

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
    restarts: int = 0
    last_error: BaseException | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from ``started_at`` to ``ended_at`` (wall clock), or ``None`` while it has not ended."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """This row as JSON-ready data (enums as their values, errors as ``"Type: message"`` of the cause)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "task_type": self.task_type.value,
            "stage": None if self.stage is None else self.stage.value,
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration": self.duration,
            "error": describe_error(self.error),
            "restarts": self.restarts,
            "last_error": describe_error(self.last_error),
        }


def describe_error(error: BaseException | None) -> str | None:
    """``"Type: message"`` of a task error's cause (or of the error itself), for JSON and status lines."""
    if error is None:
        return None
    cause = error.__cause__ if error.__cause__ is not None else error
    text = str(cause)
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
