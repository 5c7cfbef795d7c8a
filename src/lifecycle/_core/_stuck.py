"""The stuck-shutdown report and the stack report: each task running and where it waits, as ``file:line``.

The await stack is read from the coroutine the manager awaits for a stage (``cr_await`` / ``gi_yieldfrom``
/ ``ag_await`` chain), which works the same on asyncio and trio and costs nothing until a report is made.
The stack report (``TaskManager.stack_report()``: SIGUSR1 under ``lifecycle.run``, ``/debug/stacks`` of the
HealthServer) adds every other task of the event loop, read the same way from ``anyio.get_running_tasks()``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import anyio

from ._task import Stage, TaskType

__all__ = [
    "StuckTask",
    "await_stack",
    "format_stack_report",
    "format_stuck_report",
    "frame_of",
    "innermost_user_line",
    "loop_task_stacks",
]

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


def frame_of(awaitable: object) -> FrameType | None:
    """The frame of a coroutine, generator or async generator (``None`` for anything else)."""
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
        frame = frame_of(current)
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


def loop_task_stacks() -> list[tuple[str, tuple[str, ...]]]:
    """Every task of the running event loop but the calling one: its name and its await stack, in the order
    the loop lists them. Call it from a task of the loop."""
    current = anyio.get_current_task().id
    return [
        (info.name or f"task {info.id}", await_stack(info.coro))
        for info in anyio.get_running_tasks()
        if info.id != current
    ]


def format_stack_report(
    manager: str,
    headline: str,
    stages: Sequence[StuckTask],
    loop_tasks: Sequence[tuple[str, tuple[str, ...]]],
) -> str:
    """The stuck-report of ``stages``, then each task of the event loop and its await stack."""
    lines = [
        format_stuck_report(manager, headline, stages),
        f"  every task of the event loop ({len(loop_tasks)}):",
    ]
    for name, stack in loop_tasks:
        lines.append(f"  {name}:")
        lines.extend(f"    {line}" for line in stack)
        if not stack:
            lines.append("    (no await stack)")
    return "\n".join(lines)
