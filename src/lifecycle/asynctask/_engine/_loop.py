"""The running event loop's primitives, looked up once per worker.

``anyio.Event()``, ``anyio.CancelScope()``, ``anyio.current_time()`` and ``anyio.lowlevel.checkpoint()`` find
the running async library anew on every call (a sniffio look-up; ``anyio.Event()`` also initialises its
event twice, as the class it returns is a subclass whose ``__init__`` runs again). A worker that serves one
task at a time calls them several times per task, and on an idle worker's path from a claim to the task's
start every call counts, so the worker looks them up once, in the loop it serves, and hands them to its
runner and its settler.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import anyio
import anyio.lowlevel

__all__ = ["ANYIO_PRIMITIVES", "LoopPrimitives", "Scope", "loop_primitives"]


class Scope(Protocol):
    """A cancel scope of the running event loop: anyio's, or trio's own on trio (the same semantics)."""

    @property
    def cancel_called(self) -> bool: ...

    def cancel(self) -> Any: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> bool | None: ...


class LoopPrimitives(NamedTuple):
    """What :func:`loop_primitives` found for the running event loop."""

    new_scope: Callable[..., Scope]
    """A cancel scope (``deadline=`` in :attr:`clock`'s time), as ``anyio.CancelScope`` takes it."""
    clock: Callable[[], float]
    """The loop's clock: ``anyio.current_time()``."""
    new_event: Callable[[], anyio.Event]
    """A new event, as ``anyio.Event()`` makes it (anyio's class for the running library)."""
    checkpoint: Callable[[], Awaitable[None]]
    """``anyio.lowlevel.checkpoint()``: let the other tasks run once."""


ANYIO_PRIMITIVES = LoopPrimitives(
    anyio.CancelScope, anyio.current_time, anyio.Event, anyio.lowlevel.checkpoint
)
"""anyio's own functions, which look the running library up on each call: right in any loop, only slower
(what a worker uses until it has looked up the loop it serves)."""


def loop_primitives() -> LoopPrimitives:
    """The primitives of the running event loop (call it inside the loop that uses them). On trio, trio's own
    cancel scope, clock and checkpoint (anyio's wrap them, adding a call to each use); on asyncio, anyio's
    scope and event classes, the loop's clock (anyio's asyncio deadlines are in its time) and
    ``asyncio.sleep(0)`` (anyio's asyncio checkpoint). Otherwise anyio's own functions."""
    new_event: Callable[[], anyio.Event] = type(anyio.Event())
    trio: Any = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # trio is imported, but this is not a trio run
            pass
        else:
            return LoopPrimitives(trio.CancelScope, trio.current_time, new_event, trio.lowlevel.checkpoint)
    scope_type: Callable[..., Scope] = type(anyio.CancelScope())
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - anyio runs on asyncio or trio
        return ANYIO_PRIMITIVES
    return LoopPrimitives(scope_type, loop.time, new_event, functools.partial(asyncio.sleep, 0))
