"""Argument checks shared by the provided tasks, with messages that say what to pass instead."""

from __future__ import annotations

import math
import sys

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    from builtins import BaseExceptionGroup
else:  # pragma: no cover - depends on the interpreter
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BaseExceptionGroup", "positive_seconds", "unwrap_single"]


def positive_seconds(what: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a float of seconds, or ``ValueError`` naming ``what`` and what is accepted."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or math.isinf(value)
    ):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "greater than zero"
        raise ValueError(f"{what} must be {bound} seconds, got {value!r}")
    return float(value)


def unwrap_single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The only exception of a task group's ``ExceptionGroup`` (recursively), or the group itself.

    Provided tasks run helpers in a private task group; unwrapping keeps the error the manager records (and
    its ``__cause__``) the one the user's code raised, not a group around it.
    """
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
