"""The engine's settings (:class:`EngineOptions`), their defaults, and the checks of the options
``AsyncTasks`` takes that only the engine uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta

from ..._checks import check_optional_seconds
from .._clock import Clock
from .._model import TaskInfo
from .._observer import TaskObserver
from .._records import TaskState
from ._queues import QueueOrder
from ._verdict import Policy

__all__ = ["DEFAULT_RETENTION", "EngineOptions", "ErrorHook", "check_retention", "check_states"]

ErrorHook = Callable[[TaskInfo, BaseException], Awaitable[None] | None]
"""``AsyncTasks(on_error=...)``: called as ``on_error(info, exc)`` after every failed attempt."""

DEFAULT_RETENTION: Mapping[TaskState, float | None] = {
    TaskState.SUCCEEDED: 86_400.0,
    TaskState.DEAD: 7 * 86_400.0,
    TaskState.CANCELLED: 7 * 86_400.0,
}
"""How long finished tasks are kept by default (seconds after they finished): succeeded 1 day, dead and
cancelled 7 days."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """The engine's settings, validated by :class:`~lifecycle.asynctask.AsyncTasks`."""

    concurrency: int
    queues: QueueOrder
    lease: float
    poll_interval: float
    recovery_interval: float
    retention: Mapping[TaskState, float | None]
    retention_interval: float
    shutdown_grace: float
    clock: Clock
    policy: Policy
    on_error: ErrorHook | None
    observer: TaskObserver | None = None


def check_states(state: TaskState | str | Collection[TaskState | str]) -> set[TaskState]:
    """One state or several (``TaskState`` or their values) as a set; ``ValueError`` for an unknown one."""
    values = [state] if isinstance(state, TaskState | str) else list(state)
    try:
        return {TaskState(value) for value in values}
    except ValueError:
        known = ", ".join(s.value for s in TaskState)
        raise ValueError(f"unknown task state in {state!r}; use one of: {known}") from None


def check_retention(
    retention: Mapping[TaskState, float | timedelta | None] | Mapping[str, float | timedelta | None] | None,
) -> dict[TaskState, float | None]:
    """``retention`` merged over :data:`DEFAULT_RETENTION`; only final states, seconds >= 0 or ``None``."""
    merged: dict[TaskState, float | None] = dict(DEFAULT_RETENTION)
    for key, age in (retention or {}).items():
        try:
            state = TaskState(key)
        except ValueError:
            raise ValueError(f"retention: unknown state {key!r}; use succeeded, dead or cancelled") from None
        if not state.is_final:
            raise ValueError(
                f"retention: {state.value} tasks are not finished and are never purged automatically; "
                "give retention for succeeded, dead or cancelled"
            )
        merged[state] = check_optional_seconds(age, f"retention[{state.value!r}]", allow_zero=True)
    return merged
