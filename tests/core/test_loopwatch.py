"""LoopWatch: a watchdog thread reports a blocked event loop once per block, with the loop thread's stack,
and is stopped and joined with its task (asyncio and trio)."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

import anyio
import pytest

from lifecycle._core._loopwatch import LoopBlock, LoopWatch, sharing_watches

WAIT = 10.0


def watchdog_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "test-loopwatch"]


async def test_a_blocked_loop_is_reported_once_with_the_stack_that_blocks_it() -> None:
    reported = threading.Event()
    blocks: list[tuple[LoopBlock, list[str]]] = []

    def on_block(block: LoopBlock) -> None:
        names = [frame.f_code.co_name for frame, _ in traceback.walk_stack(block.frame)]
        blocks.append((block, names))
        reported.set()

    def blocking_call() -> bool:
        return reported.wait(WAIT)  # holds the loop until the watchdog has seen it

    watch = LoopWatch(0.1, on_block, name="test-loopwatch")
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        await anyio.wait_all_tasks_blocked()  # run() has started its thread and pinged
        assert blocking_call(), "the watchdog must report the blocked loop"
        await anyio.sleep(0.3)  # the loop runs again: no second report for the same block
        group.cancel_scope.cancel()
    # Only the block of blocking_call counts: on a loaded machine the process itself may stall past 0.1 s
    # later (a report with another stack); the same block reported twice would show blocking_call again.
    [(block, names)] = [(block, names) for block, names in blocks if "blocking_call" in names]
    assert block.seconds > block.threshold == 0.1
    assert "blocking_call" in names
    assert watchdog_threads() == [], "cancelling run() stops and joins the thread"


async def test_a_failing_callback_is_logged_and_watching_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = threading.Semaphore(0)

    def on_block(block: LoopBlock) -> None:
        calls.release()
        raise RuntimeError("callback bug")

    watch = LoopWatch(0.1, on_block, name="test-loopwatch")
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        await anyio.wait_all_tasks_blocked()
        assert calls.acquire(timeout=WAIT)  # first block
        await anyio.sleep(0.1)  # the loop runs and pings again: what follows is another block
        assert calls.acquire(timeout=WAIT)  # a second, separate block is reported again
        group.cancel_scope.cancel()
    assert caplog.text.count("the loop watchdog's callback raised") == 2
    assert watchdog_threads() == []


async def test_watches_sharing_a_loop_share_one_thread_and_learn_who_was_told_first() -> None:
    told: list[tuple[str, LoopBlock]] = []
    both_told = threading.Event()

    def on_block(name: str) -> Callable[[LoopBlock], None]:
        def record(block: LoopBlock) -> None:
            told.append((name, block))
            if len(told) == 2:
                both_told.set()

        return record

    def blocking_call() -> bool:
        return both_told.wait(WAIT)

    outer = LoopWatch(0.2, on_block("outer"), name="test-loopwatch", describe=lambda frame: "outer's name")
    inner = LoopWatch(0.1, on_block("inner"), name="test-loopwatch-inner", describe=lambda frame: None)
    threads: list[str] = []
    with sharing_watches("test-loopwatch"):
        async with anyio.create_task_group() as group:
            group.start_soon(outer.run)
            group.start_soon(inner.run)
            await anyio.wait_all_tasks_blocked()
            threads = [t.name for t in threading.enumerate() if t.name.startswith("test-loopwatch")]
            assert blocking_call(), "both watches are told of the block"
            group.cancel_scope.cancel()
    assert threads == ["test-loopwatch"], "one thread, named by sharing_watches()"
    [(first, first_block), (second, second_block)] = told
    assert (first, first_block.reported, first_block.threshold) == ("inner", False, 0.1)
    assert (second, second_block.reported, second_block.threshold) == ("outer", True, 0.2)
    assert first_block.blockers == second_block.blockers == ("outer's name",)
    assert watchdog_threads() == []


async def test_without_sharing_each_watch_has_its_own_thread() -> None:
    first = LoopWatch(10, lambda block: None, name="test-loopwatch")
    second = LoopWatch(10, lambda block: None, name="test-loopwatch")
    async with anyio.create_task_group() as group:
        group.start_soon(first.run)
        group.start_soon(second.run)
        await anyio.wait_all_tasks_blocked()
        assert len(watchdog_threads()) == 2
        group.cancel_scope.cancel()
    assert watchdog_threads() == []


@pytest.mark.parametrize(
    ("threshold", "error"), [(0, ValueError), (float("inf"), ValueError), (1e9, ValueError), ("1", TypeError)]
)
def test_the_threshold_must_be_a_finite_number_greater_than_zero(
    threshold: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="LoopWatch threshold must be"):
        LoopWatch(threshold, lambda block: None)  # type: ignore[arg-type]
