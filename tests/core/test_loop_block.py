"""TaskManager(loop_block_warning=...): a blocked event loop is logged once with the stack that holds it,
named (the manager's task, the AsyncTasks task) and counted in the metrics, on asyncio and trio; with an
AsyncTasks worker in the manager, one watchdog thread watches the loop and each block is logged once.

No test sleeps hoping the watchdog looked: the blocking code waits on a ``threading.Event`` set by a log
handler when the warning is written (or until the manager has counted the block). On a loaded machine the
whole process may stall past a threshold now and then: the assertions look at the reports whose stack shows
the blocking code (the same block reported twice would show it twice).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import lifecycle
from lifecycle.asynctask import AsyncTasks, ManualClock, MemoryBackend

WAIT = 10.0
WATCHDOG_THREADS = ("lifecycle-loopwatch", "lifecycle-asynctask-loopwatch")


class Reports(logging.Handler):
    """Keeps every "event loop was blocked" record (of the manager and of the worker) whose stack shows
    ``blocking_call``, and sets ``first``.

    It keeps the records itself: the watchdog thread may reach caplog's handler only after the blocked code
    has let the test go on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "the event loop was blocked" in message and "in blocking_call" in message:
            self.records.append(record)
            self.first.set()


@pytest.fixture
def reports() -> Iterator[Reports]:
    handler = Reports()
    logger = logging.getLogger("lifecycle")  # lifecycle.asynctask propagates to it
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def watchdog_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name in WATCHDOG_THREADS]


def blocking_call(until: Callable[[], bool]) -> bool:
    """Hold the event loop (no await) until ``until()`` is true; bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while not until():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def run_until_blocked(
    manager: lifecycle.TaskManager, until: Callable[[], bool], *, name: str = "blocker"
) -> dict[str, Any]:
    """Run ``manager`` with an execute task that blocks the loop until ``until()``; what the task saw."""
    seen: dict[str, Any] = {}

    async def blocker() -> None:
        await anyio.wait_all_tasks_blocked()  # every watch has started and is waiting
        seen["threads"] = watchdog_threads()
        seen["ended"] = blocking_call(until)
        seen["threads during the block"] = watchdog_threads()
        manager.shutdown()

    manager.add_execute_task(name, blocker, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT * 2):
        await manager.run()
    return seen


async def test_a_blocking_call_is_logged_with_its_stack_and_counted(reports: Reports) -> None:
    manager = lifecycle.TaskManager(name="svc", loop_block_warning=0.2)
    seen = await run_until_blocked(manager, reports.first.is_set)
    assert seen["ended"], "the watchdog must report the blocked loop"
    [record] = reports.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert record.name == "lifecycle"
    assert "svc: the event loop was blocked for" in message
    assert "(more than loop_block_warning=0.2 s) by task 'blocker' (execute) of task manager 'svc'" in message
    assert "in blocking_call" in message, "the stack of the code that holds the loop"
    assert "time.sleep(0.005)" in message
    assert manager.loop_blocks >= 1
    assert seen["threads during the block"] == ["lifecycle-loopwatch"]
    assert watchdog_threads() == [], "the watchdog thread ends with the run"


async def test_the_block_count_is_in_the_metrics(reports: Reports) -> None:
    manager = lifecycle.TaskManager(name="svc", loop_block_warning=0.2)
    metrics = lifecycle.Metrics(manager)
    assert 'lifecycle_loop_blocks_total{manager="svc"} 0.0' in (await metrics.exposition())[0].decode()
    await run_until_blocked(manager, reports.first.is_set)
    assert manager.loop_blocks >= 1
    exposition = (await metrics.exposition())[0].decode()
    assert f'lifecycle_loop_blocks_total{{manager="svc"}} {float(manager.loop_blocks)}' in exposition


async def test_without_loop_block_warning_nothing_watches() -> None:
    manager = lifecycle.TaskManager(name="svc")
    seen = await run_until_blocked(manager, lambda: True)
    assert seen["threads"] == []
    assert manager.loop_blocks == 0


def async_tasks(lease: float) -> AsyncTasks:
    return AsyncTasks(MemoryBackend(), clock=ManualClock(1_700_000_000.0), lease=lease, poll_interval=0.05)


async def test_an_asynctask_that_blocks_the_loop_is_named_and_logged_once(reports: Reports) -> None:
    # The manager's threshold (0.2 s) comes before the worker's (lease / 3 = 0.4 s): the manager logs,
    # naming the durable task through the worker's hook; the worker, told later of the same block, is quiet.
    tasks = async_tasks(lease=1.2)
    manager = lifecycle.TaskManager(name="svc", loop_block_warning=0.2)
    manager.add_task("tasks", tasks)
    seen: dict[str, Any] = {}

    @tasks.register(name="blocker")
    async def blocker() -> None:
        seen["ended"] = blocking_call(reports.first.is_set)
        seen["threads"] = watchdog_threads()
        started = time.monotonic()
        blocking_call(lambda: time.monotonic() - started > 1.2)  # well past the worker's 0.4 s too

    async def enqueue_and_stop() -> None:
        info = await tasks.wait(await tasks.enqueue(blocker), timeout=WAIT)
        seen["state"] = info.state.value
        manager.shutdown()

    manager.add_execute_task("producer", enqueue_and_stop, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT * 2):
        await manager.run()
    assert seen["ended"]
    assert seen["state"] == "succeeded"
    assert seen["threads"] == ["lifecycle-loopwatch"], "one watchdog thread for the manager and the worker"
    [record] = reports.records
    message = record.getMessage()
    assert record.name == "lifecycle"
    assert "by AsyncTasks task " in message
    assert "(blocker)" in message
    assert "in blocker" in message
    assert manager.loop_blocks >= 1


async def test_a_worker_with_the_lower_threshold_logs_and_the_manager_only_counts(reports: Reports) -> None:
    # The worker's threshold (lease / 3 = 0.2 s) comes first: its lease warning names the task; the manager
    # (0.4 s) is told of the same block after it and counts it without a second warning.
    tasks = async_tasks(lease=0.6)
    manager = lifecycle.TaskManager(name="svc", loop_block_warning=0.4)
    manager.add_task("tasks", tasks)

    @tasks.register(name="blocker")
    async def blocker() -> None:
        before = manager.loop_blocks
        blocking_call(lambda: manager.loop_blocks > before)

    async def enqueue_and_stop() -> None:
        await tasks.wait(await tasks.enqueue(blocker), timeout=WAIT)
        manager.shutdown()

    manager.add_execute_task("producer", enqueue_and_stop, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT * 2):
        await manager.run()
    assert manager.loop_blocks >= 1
    [record] = reports.records
    assert record.name == "lifecycle.asynctask"
    assert "more than lease / 3 = 0.2 s) by task" in record.getMessage()


async def test_a_nested_manager_watches_during_its_execute(reports: Reports) -> None:
    inner = lifecycle.TaskManager(name="inner", loop_block_warning=0.2)
    outer = lifecycle.TaskManager(name="outer")
    outer.add_task("inner", inner)

    async def blocker() -> None:
        await anyio.wait_all_tasks_blocked()
        blocking_call(reports.first.is_set)
        outer.shutdown()

    inner.add_execute_task("blocker", blocker, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT * 2):
        await outer.run()
    [record] = reports.records
    assert "inner: the event loop was blocked" in record.getMessage()
    assert "by task 'blocker' (execute) of task manager 'inner'" in record.getMessage()
    assert inner.loop_blocks >= 1
    assert watchdog_threads() == []


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "greater than zero"),
        (-1, ValueError, "greater than zero"),
        (math.inf, ValueError, "finite"),
        (1e9, ValueError, "less than 1e9 seconds"),
        ("0.25", TypeError, "number of seconds"),
        (True, TypeError, "number of seconds"),
    ],
)
def test_loop_block_warning_is_validated(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"loop_block_warning.*{match}"):
        lifecycle.TaskManager(loop_block_warning=value)  # type: ignore[arg-type]
