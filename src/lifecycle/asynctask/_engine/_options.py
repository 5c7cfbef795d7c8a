"""Validation of ``AsyncTasks`` options, and their defaults."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from datetime import timedelta

from .._clock import as_seconds
from .._records import TaskState

__all__ = ["DEFAULT_RETENTION", "check_positive", "check_retention", "check_states"]

DEFAULT_RETENTION: Mapping[TaskState, float | None] = {
    TaskState.SUCCEEDED: 86_400.0,
    TaskState.DEAD: 7 * 86_400.0,
    TaskState.CANCELLED: 7 * 86_400.0,
}
"""How long finished tasks are kept by default (seconds after they finished): succeeded 1 day, dead and
cancelled 7 days."""


def check_states(state: TaskState | str | Collection[TaskState | str]) -> set[TaskState]:
    """One state or several (``TaskState`` or their values) as a set; ``ValueError`` for an unknown one."""
    values = [state] if isinstance(state, TaskState | str) else list(state)
    try:
        return {TaskState(value) for value in values}
    except ValueError:
        known = ", ".join(s.value for s in TaskState)
        raise ValueError(f"unknown task state in {state!r}; use one of: {known}") from None


def check_positive(value: float, name: str) -> float:
    """``value`` as a positive, finite float; ``ValueError`` naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def check_retention(
    retention: Mapping[TaskState | str, float | timedelta | None] | None,
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
        merged[state] = None if age is None else as_seconds(age, f"retention[{state.value!r}]")
    return merged
