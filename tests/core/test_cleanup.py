"""Semantics 6: cleanup in reverse, every one even after failures, shielded, bounded, cancellable."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lifecycle import EventKind, Stage, TaskManager, TaskManagerError
from tests.core.lifecycle_testkit import (
    Boom,
    FakeTask,
    Outcome,
    manager,
    raises,
    run_capturing,
    run_until_running_then_shut_down,
    task_errors,
)

pytestmark = pytest.mark.anyio


async def test_cleanup_runs_in_reverse_add_order_for_every_initialized_task() -> None:
    log: list[str] = []
    m, events = manager()
    for name in "abc":
        m.add_task(name, FakeTask(name, log))
    assert await run_until_running_then_shut_down(m, events) is None
    assert [e for e in log if e.endswith("cleanup")] == ["c.cleanup", "b.cleanup", "a.cleanup"]


async def test_every_cleanup_runs_even_when_earlier_ones_fail() -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("a", FakeTask("a", log, cleanup=raises("a")))
    m.add_task("b", FakeTask("b", log, cleanup=raises("b")))
    m.add_task("c", FakeTask("c", log, execute=raises("c execute")))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert [e for e in log if e.endswith("cleanup")] == ["c.cleanup", "b.cleanup", "a.cleanup"]
    assert [(e.task_name, e.stage) for e in task_errors(caught.value)] == [
        ("c", Stage.EXECUTE),
        ("b", Stage.CLEANUP),
        ("a", Stage.CLEANUP),
    ]


async def test_cleanup_is_shielded_from_the_cancellation_that_stopped_execute() -> None:
    log: list[str] = []
    m, events = manager()

    async def cleanup_that_awaits() -> None:
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        await anyio.sleep(0)
        log.append("cleanup finished its awaits")

    m.add_task("a", FakeTask("a", log, cleanup=cleanup_that_awaits))
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            await events.running()
            outer.cancel()  # cancellation from outside, not shutdown()
    assert outer.cancelled_caught
    assert log[-1] == "cleanup finished its awaits"


async def test_cleanup_timeout_is_a_cleanup_task_error_with_timeout_cause_and_the_next_cleanup_runs() -> None:
    log: list[str] = []
    m, events = manager(cleanup_timeout=30)
    m.add_task("a", FakeTask("a", log))
    m.add_task("hangs", FakeTask("hangs", log, cleanup=anyio.sleep_forever), cleanup_timeout=0.01)
    error = await run_until_running_then_shut_down(m, events)
    assert isinstance(error, TaskManagerError)
    [task_error] = task_errors(error)
    assert (task_error.task_name, task_error.stage) == ("hangs", Stage.CLEANUP)
    assert isinstance(task_error.__cause__, TimeoutError)
    assert log[-3:] == ["hangs.cleanup", "hangs.cleanup.cancelled", "a.cleanup"]


async def test_manager_cleanup_timeout_is_the_default() -> None:
    m, events = manager(cleanup_timeout=0.01)
    m.add_task("hangs", FakeTask("hangs", [], cleanup=anyio.sleep_forever))
    error = await run_until_running_then_shut_down(m, events)
    assert isinstance(error, TaskManagerError)
    assert isinstance(task_errors(error)[0].__cause__, TimeoutError)


async def test_cancel_cleanups_cancels_the_running_cleanup_inside_its_shield_and_goes_on() -> None:
    log: list[str] = []
    m, events = manager()
    m.add_task("a", FakeTask("a", log))
    m.add_task("stuck", FakeTask("stuck", log, cleanup=anyio.sleep_forever))
    m.add_task("c", FakeTask("c", log))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        assert m.cancel_cleanups() == 0  # nothing to cancel yet
        m.shutdown()
        await events.wait(EventKind.TASK_CLEANING_UP, "stuck")
        assert m.cancel_cleanups() == 1
    error = await outcome.finished()
    assert isinstance(error, TaskManagerError)
    [task_error] = task_errors(error)
    assert (task_error.task_name, task_error.stage) == ("stuck", Stage.CLEANUP)
    assert "forced shutdown" in str(task_error.__cause__)
    assert [e for e in log if "cleanup" in e] == [
        "c.cleanup",
        "stuck.cleanup",
        "stuck.cleanup.cancelled",
        "a.cleanup",
    ]


async def test_a_cleanup_that_swallows_the_forced_cancel_and_finishes_is_not_an_error() -> None:
    m, events = manager()
    finished: list[str] = []

    async def stubborn() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            finished.append("released anyway")

    m.add_task("a", FakeTask("a", [], cleanup=stubborn))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.shutdown()
        await events.wait(EventKind.TASK_CLEANING_UP, "a")
        m.cancel_cleanups()
    assert await outcome.finished() is None
    assert finished == ["released anyway"]


async def test_execute_tasks_have_no_cleanup_and_tasks_that_never_initialized_are_not_cleaned() -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("a", FakeTask("a", log, initialize=raises("no")))
    m.add_task("b", FakeTask("b", log))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert log == ["a.initialize"]
    assert isinstance(task_errors(caught.value)[0].__cause__, Boom)
