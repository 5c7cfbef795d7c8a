"""A watchdog for a blocked event loop: a thread that notices when the loop has not run for longer than a
threshold, and reports where the loop thread was stuck at that moment.

The loop side is one small task that records the time every ``threshold / 4`` seconds; the watchdog thread
wakes as often, compares, and when the last ping is older than ``threshold`` it samples the loop thread's
stack (``sys._current_frames``) and hands it to a callback, once per block. Nothing runs per task or per
callback of the loop, so watching costs nothing measurable. Works on asyncio and trio alike.

Several watches of one loop share one thread and report each block once: a :class:`~lifecycle.TaskManager`
with ``loop_block_warning`` runs its watch inside :func:`sharing_watches`, and every watch started in that
context (the AsyncTasks worker's) joins the same thread. Each watch is still called when a block passes its
own threshold, with :attr:`LoopBlock.reported` telling it whether another watch was told first (then it only
counts, it does not log again), and :attr:`LoopBlock.blockers` naming who blocks, from every watch's
``describe`` hook (the worker names the durable task, the manager its own task).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import FrameType

import anyio

from .._checks import check_seconds
from .._redact import library_logger

__all__ = ["LoopBlock", "LoopWatch", "format_block_stack", "sharing_watches"]

logger = library_logger("lifecycle")

_JOIN_TIMEOUT = 5.0  # the thread wakes at once when told to stop; only a hanging callback could delay it
_IDLE_WAKE = 0.05  # only between the last watch leaving and the thread being told to stop
_STACK_LIMIT = 20  # the innermost frames shown of a blocked loop's stack


def format_block_stack(frame: FrameType, limit: int = _STACK_LIMIT) -> str:
    """The ``limit`` innermost frames of a blocked loop's stack, as a traceback prints them (outermost
    first), without the trailing newline."""
    frames = [each for _, each in zip(range(limit), traceback.walk_stack(frame), strict=False)]
    return "".join(traceback.StackSummary.extract(reversed(frames)).format()).rstrip("\n")


@dataclass(frozen=True, slots=True)
class LoopBlock:
    """A blocked loop, as the watchdog saw it.

    ``seconds`` is how long the loop had not run when the watchdog looked (the block may go on), and
    ``frame`` the innermost frame of the loop thread at that moment (``None`` if the thread is gone): walk
    ``f_back`` from it to find what blocks the loop. ``reported`` is true when another watch of the same loop
    (with a lower threshold, or an equal one and joined earlier) was already told of this block: count it, do
    not log it again. ``blockers`` says who blocks, as the watches' ``describe`` hooks named it (innermost
    first), e.g. ``("AsyncTasks task 1f3a (send_mail)",)``.
    """

    seconds: float
    threshold: float
    frame: FrameType | None
    reported: bool = False
    blockers: tuple[str, ...] = ()


class _Hub:
    """The one watchdog thread of one event loop, shared by the watches that run on it."""

    def __init__(self, loop_thread: int, name: str | None = None) -> None:
        self.loop_thread = loop_thread
        self.name = name  # of the thread; None: the name of the first watch that joins
        self.members: list[LoopWatch] = []  # changed by the loop thread, copied by the watchdog thread
        self.pinged = [time.monotonic()]  # one slot, written by the loop and read by the thread (atomic)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def join(self, watch: LoopWatch) -> None:
        self.pinged[0] = time.monotonic()
        self.members.append(watch)
        if self._thread is None:
            self._stop = threading.Event()
            name = self.name or watch.name
            self._thread = threading.Thread(target=self._watch, args=(self._stop,), name=name, daemon=True)
            self._thread.start()

    def leave(self, watch: LoopWatch) -> None:
        self.members.remove(watch)
        if not self.members and self._thread is not None:
            self._stop.set()
            self._thread.join(_JOIN_TIMEOUT)
            self._thread = None

    def _watch(self, stop: threading.Event) -> None:
        told: dict[int, float] = {}  # id(watch) -> the ping after which that watch was told of a block
        block_told: float | None = None  # the ping after which some watch was told
        while True:
            members = list(self.members)
            if stop.wait(min((watch.interval for watch in members), default=_IDLE_WAKE)):
                return
            last = self.pinged[0]
            stalled = time.monotonic() - last
            due = [watch for watch in members if stalled > watch.threshold and told.get(id(watch)) != last]
            if not due:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            try:
                if self.pinged[0] != last:  # the loop ran again meanwhile: not blocked any more
                    continue
                blockers = _describe(members, frame)
                for watch in sorted(due, key=lambda each: each.threshold):  # stable: joined first, told first
                    told[id(watch)] = last
                    block = LoopBlock(stalled, watch.threshold, frame, block_told == last, blockers)
                    block_told = last
                    watch.tell(block)
            finally:
                del frame


def _describe(members: list[LoopWatch], frame: FrameType | None) -> tuple[str, ...]:
    if frame is None:
        return ()
    names: list[str] = []
    for watch in reversed(members):  # the innermost (joined last) first: the most precise name
        name = watch.describe(frame)
        if name:
            names.append(name)
    return tuple(names)


_HUB: ContextVar[_Hub | None] = ContextVar("lifecycle_loopwatch_hub", default=None)


@contextmanager
def sharing_watches(name: str = "lifecycle-loopwatch") -> Iterator[None]:
    """Make every :meth:`LoopWatch.run` started in this context, on this thread, share one watchdog thread
    named ``name`` (one per event loop: the one of an enclosing block is reused)."""
    hub = _HUB.get()
    if hub is None or hub.loop_thread != threading.get_ident():
        hub = _Hub(threading.get_ident(), name)
    token = _HUB.set(hub)
    try:
        yield
    finally:
        _HUB.reset(token)


class LoopWatch:
    """Watches the event loop that awaits :meth:`run`, and calls ``on_block`` from its own thread whenever
    that loop has not run for more than ``threshold`` seconds (once per block).

    ``on_block`` runs in the watchdog thread while the loop may still be blocked: it must only read (walk the
    frames, look things up in plain dicts, log). Its exceptions are logged. ``describe``, if given, is asked
    (in the same thread, on every block any watch of the loop reports) to name what the innermost frame of
    the loop thread belongs to, or to return ``None``.

    Inside :func:`sharing_watches`, the watches started on one loop share one thread, and each block is
    reported once (see :class:`LoopBlock`).

    Raises ``TypeError`` for a threshold that is not a number of seconds, ``ValueError`` for one that is not
    finite and greater than zero.

    Example::

        watch = LoopWatch(1.0, lambda block: print(f"loop blocked for {block.seconds:.1f} s"))
        async with anyio.create_task_group() as group:
            group.start_soon(watch.run)
            ...
    """

    def __init__(
        self,
        threshold: float,
        on_block: Callable[[LoopBlock], None],
        *,
        name: str = "lifecycle-loopwatch",
        describe: Callable[[FrameType], str | None] | None = None,
    ) -> None:
        seconds = check_seconds(threshold, "LoopWatch threshold")
        if seconds >= 1e9:  # a thread cannot wait that long (OverflowError): far past any useful threshold
            raise ValueError(f"LoopWatch threshold must be less than 1e9 seconds, got {threshold!r}")
        self.threshold = seconds
        self.interval = self.threshold / 4
        self.name = name
        self._on_block = on_block
        self._describe = describe

    async def run(self) -> None:
        """Watch the calling task's event loop until cancelled; the watchdog thread (when no other watch of
        the loop still uses it) is stopped and joined before this returns."""
        hub = _HUB.get()
        if hub is None or hub.loop_thread != threading.get_ident():
            hub = _Hub(threading.get_ident())
        hub.join(self)
        try:
            pinged = hub.pinged
            while True:
                pinged[0] = time.monotonic()
                await anyio.sleep(self.interval)
        finally:
            hub.leave(self)

    def tell(self, block: LoopBlock) -> None:
        """Hand ``block`` to ``on_block`` (from the watchdog thread); an exception it raises is logged."""
        try:
            self._on_block(block)
        except Exception:
            logger.exception("the loop watchdog's callback raised; it goes on watching")

    def describe(self, frame: FrameType) -> str | None:
        """What ``describe`` names on the stack of ``frame`` (``None`` without a hook, or if it raised)."""
        if self._describe is None:
            return None
        try:
            return self._describe(frame)
        except Exception:
            logger.exception("the loop watchdog's describe hook raised; it goes on watching")
            return None
