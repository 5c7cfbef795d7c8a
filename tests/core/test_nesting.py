"""A TaskManager is a Task: a task of one manager can be a sub-manager serving hot-added work."""

from __future__ import annotations

import anyio
import pytest

from lifecycle import EventKind, ManagerState, Stage, Task, TaskManager, TaskManagerError
from tests.core.lifecycle_testkit import (
    Boom,
    Events,
    FakeTask,
    Outcome,
    manager,
    raises,
    run_capturing,
    task_errors,
)

pytestmark = pytest.mark.anyio


def test_a_task_manager_is_a_task() -> None:
    assert isinstance(TaskManager(), Task)


async def test_nested_manager_initializes_executes_and_cleans_up_in_order() -> None:
    log: list[str] = []
    outer, events = manager(name="outer")
    inner_events = Events()
    inner = TaskManager(name="inner", on_event=inner_events)
    inner.add_task("i1", FakeTask("i1", log))
    inner.add_task("i2", FakeTask("i2", log))
    outer.add_task("o1", FakeTask("o1", log))
    outer.add_task("inner", inner)
    outer.add_task("o2", FakeTask("o2", log))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, outer, outcome)
        await events.running()
        await inner_events.running()
        # The sub-manager serves work added while both run.
        served = anyio.Event()

        async def hot() -> None:
            served.set()
            await anyio.sleep_forever()

        inner.add_execute_task("hot", hot)
        await served.wait()
        outer.shutdown()
    assert await outcome.finished() is None
    init = [e for e in log if e.endswith("initialize")]
    cleanup = [e for e in log if e.endswith("cleanup")]
    assert init == ["o1.initialize", "i1.initialize", "i2.initialize", "o2.initialize"]
    assert cleanup == ["o2.cleanup", "i2.cleanup", "i1.cleanup", "o1.cleanup"]
    assert inner.state is ManagerState.STOPPED
    assert events.kinds("inner")[-1] == "task_cleaned_up"


async def test_a_failure_inside_the_sub_manager_fails_its_execute_in_the_outer_one() -> None:
    outer = TaskManager(name="outer")
    inner = TaskManager(name="inner")
    inner.add_task("broken", FakeTask("broken", [], execute=raises("inner failure")))
    outer.add_task("inner", inner)
    with pytest.raises(TaskManagerError) as caught:
        await outer.run()
    [error] = task_errors(caught.value)
    assert (error.task_name, error.stage) == ("inner", Stage.EXECUTE)
    nested = error.__cause__
    assert isinstance(nested, TaskManagerError)
    assert isinstance(task_errors(nested)[0].__cause__, Boom)


async def test_a_sub_manager_initialize_failure_cleans_up_its_own_tasks() -> None:
    log: list[str] = []
    outer = TaskManager(name="outer")
    inner = TaskManager(name="inner")
    inner.add_task("i1", FakeTask("i1", log))
    inner.add_task("i2", FakeTask("i2", log, initialize=raises("no")))
    outer.add_task("o1", FakeTask("o1", log))
    outer.add_task("inner", inner)
    with pytest.raises(TaskManagerError) as caught:
        await outer.run()
    assert log == ["o1.initialize", "i1.initialize", "i2.initialize", "i1.cleanup", "o1.cleanup"]
    assert task_errors(caught.value)[0].stage is Stage.INITIALIZE
    assert isinstance(task_errors(caught.value)[0].__cause__, TaskManagerError)


async def test_errors_of_a_sub_manager_while_it_is_cancelled_still_reach_the_outer_one() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise Boom("while stopping")

    outer, events = manager(name="outer")
    inner = TaskManager(name="inner")
    inner.add_execute_task("fragile", fails_when_cancelled)
    outer.add_task("inner", inner)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, outer, outcome)
        await events.running()
        outer.shutdown()
    error = await outcome.finished()
    assert isinstance(error, TaskManagerError)
    assert isinstance(task_errors(error)[0].__cause__, TaskManagerError)


async def test_a_sub_manager_stopping_on_its_own_is_a_return_of_its_execute() -> None:
    outer, events = manager(name="outer")
    inner = TaskManager(name="inner")
    outer.add_task("inner", inner)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, outer, outcome)
        await events.running()
        inner.shutdown()
    error = await outcome.finished()
    assert isinstance(error, TaskManagerError), "a STRICT sub-manager that stops is an unexpected stop"
    assert task_errors(error)[0].task_name == "inner"


async def test_cancel_cleanups_reaches_into_a_nested_manager() -> None:
    log: list[str] = []
    outer, events = manager(name="outer")
    inner_events = Events()
    inner = TaskManager(name="inner", on_event=inner_events)
    inner.add_task("stuck", FakeTask("stuck", log, cleanup=anyio.sleep_forever))
    inner.add_task("after", FakeTask("after", log))
    outer.add_task("inner", inner)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, outer, outcome)
        await events.running()
        outer.shutdown()
        await inner_events.wait(EventKind.TASK_CLEANING_UP, "stuck")
        assert outer.cancel_cleanups() == 2
    error = await outcome.finished()
    assert isinstance(error, TaskManagerError)
    assert [e for e in log if "cleanup" in e] == ["after.cleanup", "stuck.cleanup", "stuck.cleanup.cancelled"]
    [task_error] = task_errors(error)
    assert (task_error.task_name, task_error.stage) == ("inner", Stage.CLEANUP)
    nested = task_error.__cause__
    assert isinstance(nested, TaskManagerError)
    assert task_errors(nested)[0].task_name == "stuck"
    assert "forced shutdown" in str(task_errors(nested)[0].__cause__)


async def test_execute_on_a_manager_not_initialized_as_a_task_is_refused() -> None:
    with pytest.raises(RuntimeError, match="initialize"):
        await TaskManager().execute()
