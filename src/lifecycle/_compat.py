"""Version seams, in one place: what differs between the Python versions this package supports (3.10+)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    from builtins import BaseExceptionGroup, ExceptionGroup
else:  # pragma: no cover - depends on the interpreter
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

__all__ = ["BaseExceptionGroup", "ExceptionGroup", "unwrap_single"]


def unwrap_single(error: BaseException) -> BaseException:
    """``error``, or the one exception inside it while it is an exception group holding exactly one.

    Code that runs helpers in a private task group unwraps what it raises, so the error a user sees is the one
    their code raised, not a group around it.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
