"""The stuck-shutdown report: each task still running and where it waits, as ``file:line`` lines.

The await stack is read from the coroutine the manager awaits for a stage (``cr_await`` / ``gi_yieldfrom``
/ ``ag_await`` chain), which works the same on asyncio and trio and costs nothing until a report is made.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from ._task import Stage, TaskType

__all__ = ["StuckTask", "await_stack", "format_stuck_report", "innermost_user_line"]

# Frames inside these packages say how the event loop waits, not where the application waits.
_LIBRARY_PACKAGES = ("anyio", "asyncio", "trio", "sniffio", "outcome")

_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class StuckTask:
    """A task stage still running when a report was asked for."""

    name: str
    task_type: TaskType
    stage: Stage
    running_for: float
    stack: tuple[str, ...]


def _frame_of(awaitable: object) -> FrameType | None:
    for attribute in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(awaitable, attribute, None)
        if isinstance(frame, FrameType):
            return frame
    return None


def _awaiting(awaitable: object) -> object | None:
    for attribute in ("cr_await", "gi_yieldfrom", "ag_await"):
        target: object | None = getattr(awaitable, attribute, None)
        if target is not None:
            return target
    return None


def await_stack(awaitable: object) -> tuple[str, ...]:
    """Where ``awaitable`` (a coroutine, usually) is suspended, outermost first, as ``file:line in function``.

    The innermost entry is the object awaited last when it is not itself a coroutine (an asyncio
    ``Future``, for example). A coroutine that finished or never started yields an empty or one-line stack.
    """
    lines: list[str] = []
    current: object | None = awaitable
    for _ in range(_MAX_DEPTH):
        if current is None:
            break
        frame = _frame_of(current)
        if frame is not None:
            code = frame.f_code
            lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        nxt = _awaiting(current)
        if nxt is None:
            if frame is None:
                lines.append(_short_repr(current))
            break
        current = nxt
    return tuple(lines)


def innermost_user_line(stack: Sequence[str]) -> str | None:
    """The innermost line of ``stack`` outside the async libraries (anyio, asyncio, trio): the application's
    own await, which is what a person debugging a stuck shutdown wants to see first."""
    prefixes = []
    for package in _LIBRARY_PACKAGES:
        module = sys.modules.get(package)
        location = getattr(module, "__file__", None)
        if location:
            prefixes.append(os.path.dirname(location) + os.sep)
    for line in reversed(stack):
        if not line.startswith(tuple(prefixes)) and ":" in line and not line.startswith("<"):
            return line
    return stack[-1] if stack else None


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def format_stuck_report(manager: str, headline: str, stuck: Sequence[StuckTask]) -> str:
    """A multi-line report: one headline, then each stuck task and its await stack."""
    lines = [f"{manager}: {headline}"]
    if not stuck:
        lines.append("  (no task stage is running)")
    for task in stuck:
        lines.append(
            f"  task {task.name!r} ({task.task_type.name}) still in {task.stage.value} "
            f"after {task.running_for:.1f} s, waiting at:"
        )
        if task.stack:
            lines.extend(f"    {line}" for line in task.stack)
        else:
            lines.append("    (no await stack: the stage has not started or has just ended)")
    return "\n".join(lines)
