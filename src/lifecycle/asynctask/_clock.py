"""Time for the engine: the clock type, a manual clock for tests, and conversions of user-given times."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import anyio

from .._checks import check_seconds

__all__ = ["Clock", "ManualClock", "as_epoch"]

Clock = Callable[[], float]
"""A function returning the current time in seconds since the epoch, like :func:`time.time` (the default)."""


class ManualClock:
    """A clock that moves only when told to, for tests about delays, retries and retention.

    Pass it as ``AsyncTasks(..., clock=clock)``: every time the engine stores (``run_at``, leases, finish
    times) comes from it, so a test advances it and asserts stored times instead of waiting.

    Example::

        clock = ManualClock(1_000_000.0)
        tasks = AsyncTasks(MemoryBackend(clock=clock), clock=clock)
        clock.advance(30)
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else float(start)
        self._waiters: list[anyio.Event] = []

    def __call__(self) -> float:
        """The current (manual) time."""
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self._now!r})"

    def advance(self, seconds: float | timedelta) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new time.

        Raises ``TypeError`` for a value that is not a number or ``timedelta``, ``ValueError`` for a negative
        or non-finite one.
        """
        amount = check_seconds(seconds, "ManualClock.advance(seconds)", allow_zero=True)
        self._now += amount
        self._wake()
        return self._now

    def set(self, now: float) -> None:
        """Jump to ``now`` (seconds since the epoch); going backwards is allowed, for clock-skew tests."""
        self._now = float(now)
        self._wake()

    async def wait_until(self, deadline: float) -> None:
        """Return once the clock reads ``deadline`` or later (the scheduler waits for fire times this way,
        so a test moves schedules along with :meth:`advance`)."""
        while self._now < deadline:
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()


def as_epoch(value: datetime | float, where: str) -> float:
    """``value`` as seconds since the epoch: a number as it is, an aware ``datetime`` by its instant.

    A naive ``datetime`` is refused (``ValueError``): it is ambiguous across machines; attach a timezone.
    Anything else is a ``TypeError``, NaN and infinity a ``ValueError`` (as in :mod:`lifecycle._checks`).
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{where}: the datetime {value!r} has no timezone; pass an aware datetime such as "
                "datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where} must be an aware datetime or seconds since the epoch, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number of seconds since the epoch, got {value!r}")
    return float(value)
