"""The errors a :class:`~lifecycle.TaskManager` reports: one per failed stage, all of them together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._compat import ExceptionGroup
from ._task import Stage, TaskType

__all__ = ["TaskError", "TaskManagerError", "UnexpectedStopError"]


class TaskError(Exception):
    """A task failed in one of its stages; the original exception is its ``__cause__``.

    Attributes:
        task_name: the name the task was added under.
        stage: the stage that failed (:class:`~lifecycle.Stage`).
        task_type: the task's :class:`~lifecycle.TaskType`.
        restarts: how many times the task had been restarted (by its :class:`~lifecycle.Restart` policy)
            when this error ended it; 0 without a policy. The message says so when it is not 0.

    Example::

        try:
            await manager.run()
        except lifecycle.TaskManagerError as group:
            for error in group.exceptions:
                print(error.task_name, error.stage.value, repr(error.__cause__))
    """

    task_name: str
    stage: Stage
    task_type: TaskType
    restarts: int
    restart_note: str
    __cause__: BaseException | None  # the task's own exception (the base class's declaration, restated)

    def __init__(
        self,
        task_name: str,
        stage: Stage,
        task_type: TaskType,
        cause: BaseException | None = None,
        restarts: int = 0,
        restart_note: str = "",
    ) -> None:
        self.task_name = task_name
        self.stage = stage
        self.task_type = task_type
        self.restarts = restarts
        self.restart_note = restart_note
        detail = "" if cause is None else f": {type(cause).__name__}: {cause}"
        after = ""
        if restart_note:
            after = f" ({restart_note})"
        elif restarts:
            after = f" after {restarts} restart{'s' if restarts != 1 else ''}"
        super().__init__(f"task {task_name!r} ({task_type.name}) failed in {stage.value}{after}{detail}")
        if cause is not None:
            self.__cause__ = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-free constructor arguments so the error survives pickling (multiprocessing, logging).
        return (
            type(self),
            (self.task_name, self.stage, self.task_type, self.__cause__, self.restarts, self.restart_note),
        )


class UnexpectedStopError(Exception):
    """A ``STRICT`` task's ``execute`` returned before shutdown was requested.

    It is the ``__cause__`` of the :class:`TaskError` the manager records, and stops the manager. Provided
    tasks raise it too when what they manage ends on its own (a child process exiting, for example).
    """


class TaskManagerError(ExceptionGroup[TaskError]):
    """Raised by :meth:`TaskManager.run` when anything failed; ``exceptions`` holds every :class:`TaskError`.

    The errors are in the order they happened: initialize errors, then execute errors, then cleanup errors.
    Being an ``ExceptionGroup``, it works with ``except*``::

        try:
            await manager.run()
        except* lifecycle.TaskError as group:
            ...
    """

    def __new__(cls, message: str, exceptions: Sequence[TaskError]) -> TaskManagerError:
        return super().__new__(cls, message, exceptions)

    def derive(self, excs: Sequence[TaskError]) -> TaskManagerError:  # type: ignore[override]
        """Keep the type (and message) when the group is split by ``except*`` or ``subgroup``."""
        return TaskManagerError(self.message, excs)

    @property
    def errors(self) -> tuple[TaskError, ...]:
        """The task errors, flattened, in order (same as ``exceptions`` for groups the manager builds)."""
        flat: list[TaskError] = []
        for error in self.exceptions:
            if isinstance(error, TaskError):
                flat.append(error)
            else:
                flat.extend(e for e in error.exceptions if isinstance(e, TaskError))
        return tuple(flat)


def summarize(manager_name: str, errors: Sequence[TaskError]) -> str:
    """The message of a :class:`TaskManagerError`: how many failed, and which task in which stage."""
    parts = ", ".join(
        f"{e.task_name} in {e.stage.value}"
        + ("" if e.__cause__ is None else f" ({type(e.__cause__).__name__})")
        for e in errors
    )
    noun = "error" if len(errors) == 1 else "errors"
    return f"task manager {manager_name!r}: {len(errors)} task {noun}: {parts}"
