"""Timer: an execute task that returns after a number of seconds."""

from __future__ import annotations

from datetime import timedelta

import anyio

from .._checks import check_seconds

__all__ = ["Timer"]


class Timer:
    """An :class:`~lifecycle.ExecuteTask` whose ``execute`` returns after ``seconds``.

    Added as ``STOP_GROUP`` it bounds how long a service runs (the manager shuts down gracefully when every
    STOP_GROUP task has returned); added as ``STRICT`` it is a deadline that fails the service when reached.
    Each call of ``execute`` waits the full ``seconds`` again. Cancellation ends it at once.

    ``seconds`` is a number or a ``timedelta``; ``0`` returns at the next scheduling point.

    Raises ``TypeError`` when ``seconds`` is not a number (``bool`` is not one), ``ValueError`` when it is
    negative, NaN or infinite.

    Example::

        manager.add_execute_task("run-for-a-minute", Timer(60), lifecycle.TaskType.STOP_GROUP)
    """

    def __init__(self, seconds: float | timedelta) -> None:
        self._seconds = check_seconds(seconds, "Timer seconds", allow_zero=True)

    @property
    def seconds(self) -> float:
        """How long ``execute`` waits before returning."""
        return self._seconds

    async def execute(self) -> None:
        """Wait ``seconds``, then return."""
        await anyio.sleep(self._seconds)

    def __repr__(self) -> str:
        return f"Timer({self._seconds:g})"
