"""The await-stack reader behind the stuck-shutdown report, on asyncio and trio."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lifecycle import Stage, TaskType
from lifecycle._core._stuck import StuckTask, await_stack, format_stuck_report, innermost_user_line

pytestmark = pytest.mark.anyio


async def inner(event: anyio.Event) -> None:
    await event.wait()


async def outer(event: anyio.Event) -> None:
    await inner(event)


async def test_await_stack_follows_the_coroutine_chain_outermost_first() -> None:
    event = anyio.Event()
    coro = outer(event)
    async with anyio.create_task_group() as tg:

        async def drive() -> None:
            await coro

        tg.start_soon(drive)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        stack = await_stack(coro)
        event.set()
    names = [line.rsplit(" in ", 1)[-1] for line in stack]
    assert names[:2] == ["outer", "inner"]
    assert stack[0].startswith(f"{__file__}:")
    assert innermost_user_line(stack) == stack[1], "library frames (anyio, trio, asyncio) are skipped"


def test_await_stack_of_a_finished_or_unstarted_coroutine() -> None:
    coro = outer(None)  # type: ignore[arg-type]
    assert await_stack(coro)[0].endswith(" in outer")  # not started: its own frame only
    coro.close()
    assert await_stack(coro) == (repr(coro),)  # finished: no frame left, say what it was
    assert await_stack(object())[0].startswith("<object object")
    assert innermost_user_line(()) is None


def test_format_stuck_report_lists_each_task_and_its_stack() -> None:
    report = format_stuck_report(
        "svc",
        "shutdown stuck",
        [
            StuckTask(
                "db", TaskType.STRICT, Stage.EXECUTE, 2.5, ("app.py:10 in execute", "app.py:20 in wait")
            ),
            StuckTask("cache", TaskType.ERROR, Stage.CLEANUP, 0.5, ()),
        ],
    )
    assert report.splitlines() == [
        "svc: shutdown stuck",
        "  task 'db' (STRICT) still in execute after 2.5 s, waiting at:",
        "    app.py:10 in execute",
        "    app.py:20 in wait",
        "  task 'cache' (ERROR) still in cleanup after 0.5 s, waiting at:",
        "    (no await stack: the stage has not started or has just ended)",
    ]
