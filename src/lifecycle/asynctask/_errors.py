"""Errors raised by :mod:`lifecycle.asynctask` and by backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["BackendError", "DuplicateTaskError", "StoreNotFoundError", "WorkerLostError"]


class DuplicateTaskError(Exception):
    """An enqueue named a ``task_id`` that belongs to a task still pending or active, or an enqueue with
    ``unique_for`` found the window of an equal task still open.

    ``task_id`` is the first conflicting id; ``task_ids`` holds every conflicting id of the batch. Nothing of
    the batch was stored. A finished task's id (succeeded, dead, cancelled) may be reused, once any
    uniqueness window it opened has ended. ``reason``, when given, is the message.
    """

    def __init__(
        self, task_id: str, task_ids: Sequence[str] | None = None, reason: str | None = None
    ) -> None:
        self.task_id = task_id
        self.task_ids: tuple[str, ...] = tuple(task_ids) if task_ids else (task_id,)
        self.reason = reason
        super().__init__(
            reason
            or (
                f"a task with id {task_id!r} is already pending or active; "
                "pick another task_id, or wait until that task has finished"
            )
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by the constructor's arguments (``args`` holds the message, not them)."""
        return type(self), (self.task_id, self.task_ids, self.reason), self.__dict__


class BackendError(Exception):
    """A backend could not be used as configured (wrong URL, unsupported async library, newer schema)."""


class StoreNotFoundError(BackendError):
    """``open(create=False)`` found no task storage where the backend points (no file, schema or keys).

    A :class:`BackendError` to callers; the ``lifecycle tasks`` commands report it as a usage error (the URL
    names no store). Not exported: catch :class:`BackendError`.
    """


class WorkerLostError(RuntimeError):
    """Passed to ``on_error`` for an attempt whose worker died (its lease expired before it finished).

    The attempt counts: the task is retried after its backoff, or is ``dead`` when no retry is left; its
    ``last_error`` says ``worker lost``.
    """
