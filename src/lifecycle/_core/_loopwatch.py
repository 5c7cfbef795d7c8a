"""A watchdog for a blocked event loop: a thread that notices when the loop has not run for longer than a
threshold, and reports where the loop thread was stuck at that moment.

The loop side is one small task that records the time every ``threshold / 4`` seconds; the watchdog thread
wakes as often, compares, and when the last ping is older than ``threshold`` it samples the loop thread's
stack (``sys._current_frames``) and hands it to a callback, once per block. Nothing runs per task or per
callback of the loop, so watching costs nothing measurable. Works on asyncio and trio alike.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import anyio

from .._checks import check_seconds
from .._redact import library_logger

__all__ = ["LoopBlock", "LoopWatch"]

logger = library_logger("lifecycle")

_JOIN_TIMEOUT = 5.0  # the thread wakes at once when told to stop; only a hanging callback could delay it


@dataclass(frozen=True, slots=True)
class LoopBlock:
    """A blocked loop, as the watchdog saw it.

    ``seconds`` is how long the loop had not run when the watchdog looked (the block may go on), and
    ``frame`` the innermost frame of the loop thread at that moment (``None`` if the thread is gone): walk
    ``f_back`` from it to find what blocks the loop.
    """

    seconds: float
    threshold: float
    frame: FrameType | None


class LoopWatch:
    """Watches the event loop that awaits :meth:`run`, and calls ``on_block`` from its own thread whenever
    that loop has not run for more than ``threshold`` seconds (once per block).

    ``on_block`` runs in the watchdog thread while the loop may still be blocked: it must only read (walk the
    frames, look things up in plain dicts, log). Its exceptions are logged.

    Raises ``TypeError`` for a threshold that is not a number of seconds, ``ValueError`` for one that is not
    finite and greater than zero.

    Example::

        watch = LoopWatch(1.0, lambda block: print(f"loop blocked for {block.seconds:.1f} s"))
        async with anyio.create_task_group() as group:
            group.start_soon(watch.run)
            ...
    """

    def __init__(
        self, threshold: float, on_block: Callable[[LoopBlock], None], *, name: str = "lifecycle-loopwatch"
    ) -> None:
        seconds = check_seconds(threshold, "LoopWatch threshold")
        if seconds >= 1e9:  # a thread cannot wait that long (OverflowError): far past any useful threshold
            raise ValueError(f"LoopWatch threshold must be less than 1e9 seconds, got {threshold!r}")
        self.threshold = seconds
        self._interval = self.threshold / 4
        self._on_block = on_block
        self._name = name

    async def run(self) -> None:
        """Watch the calling task's event loop until cancelled; the watchdog thread is stopped and joined
        before this returns."""
        loop_thread = threading.get_ident()
        pinged = [time.monotonic()]  # one slot, written by the loop and read by the thread (atomic)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(loop_thread, pinged, stop), name=self._name, daemon=True
        )
        thread.start()
        try:
            while True:
                pinged[0] = time.monotonic()
                await anyio.sleep(self._interval)
        finally:
            stop.set()
            thread.join(_JOIN_TIMEOUT)

    def _watch(self, loop_thread: int, pinged: list[float], stop: threading.Event) -> None:
        reported: float | None = None  # the ping after which the block was reported
        while not stop.wait(self._interval):
            last = pinged[0]
            stalled = time.monotonic() - last
            if stalled <= self.threshold or last == reported:
                continue
            frame = sys._current_frames().get(loop_thread)
            if pinged[0] != last:  # the loop ran again meanwhile: not blocked any more
                continue
            reported = last
            try:
                self._on_block(LoopBlock(seconds=stalled, threshold=self.threshold, frame=frame))
            except Exception:
                logger.exception("the loop watchdog's callback raised; it goes on watching")
            finally:
                del frame
