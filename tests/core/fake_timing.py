"""A controllable clock and sleep for a TaskManager (its documented ``clock=``, ``sleep=`` and ``rng=``
seam): restart backoff and windows, the drain, ``shutdown_timeout`` and the systemd watchdog.

No test waits for real time: a sleep either returns at once (advancing the fake clock by its delay) or, when
gated, waits until the test releases it, so the test sees what happens *during* the sleep.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel


class FakeTiming:
    """A fake ``clock``, ``sleep`` and ``rng`` for ``TaskManager(**timing.seams())``.

    Args:
        now: the clock's start.
        gated: sleeps wait for :meth:`release` (else they return at once).
        advance: a sleep moves the clock forward by its delay.
        rng: the jitter source (``None``: the ``random`` module).
    """

    def __init__(
        self,
        now: float = 1000.0,
        *,
        gated: bool = False,
        advance: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.now = now
        self.gated = gated
        self.advance = advance
        self.rng = rng
        self.sleeps: list[float] = []
        self._asleep: list[tuple[float, anyio.Event]] = []
        self._changed = anyio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.gated:
            gate = anyio.Event()
            self._asleep.append((delay, gate))
            self._changed.set()
            self._changed = anyio.Event()
            try:
                await gate.wait()
            finally:
                self._asleep = [item for item in self._asleep if item[1] is not gate]
        else:
            await anyio.lowlevel.checkpoint()
        if self.advance:
            self.now += delay

    async def sleeping(self) -> float:
        """Wait until somebody sleeps (gated) and return the delay it asked for."""
        with anyio.fail_after(10):
            while not self._asleep:
                await self._changed.wait()
        return self._asleep[0][0]

    def release(self) -> None:
        """Let the oldest gated sleep return."""
        _, gate = self._asleep.pop(0)
        gate.set()

    def seams(self) -> dict[str, Any]:
        """The keyword arguments that make a ``TaskManager`` take its time from this fake."""
        return {"clock": self.clock, "sleep": self.sleep, "rng": self.rng}
