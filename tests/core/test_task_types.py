"""Semantics 4: what the end of an execute means per TaskType, with the exact error list each time."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lifecycle import (
    EventKind,
    ManagerState,
    Stage,
    TaskManager,
    TaskManagerError,
    TaskType,
    UnexpectedStopError,
)
from tests.core.lifecycle_testkit import (
    Boom,
    FakeTask,
    Outcome,
    manager,
    raises,
    returns,
    run_capturing,
    run_until_running_then_shut_down,
    task_errors,
    waits_for,
)

# Explicit, so the anyio plugin combines its backend parameter with each test's own parameters.
pytestmark = pytest.mark.anyio


def errors_of(error: BaseException | None) -> list[tuple[str, Stage, TaskType, type[BaseException | None]]]:
    assert isinstance(error, TaskManagerError)
    return [(e.task_name, e.stage, e.task_type, type(e.__cause__)) for e in task_errors(error)]


@pytest.mark.parametrize("kind", ["task", "execute"])
async def test_strict_returning_before_shutdown_is_an_unexpected_stop_that_stops_everything(
    kind: str,
) -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("other", FakeTask("other", log))
    if kind == "task":
        m.add_task("strict", FakeTask("strict", log, execute=returns))
    else:
        m.add_execute_task("strict", returns)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert errors_of(caught.value) == [("strict", Stage.EXECUTE, TaskType.STRICT, UnexpectedStopError)]
    assert "returned before shutdown" in str(task_errors(caught.value)[0].__cause__)
    assert "other.execute.cancelled" in log
    assert log[-1] == "other.cleanup"


@pytest.mark.parametrize("task_type", list(TaskType))
async def test_raising_stops_everything_for_every_type(task_type: TaskType) -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("other", FakeTask("other", log))
    m.add_task("bad", FakeTask("bad", log, execute=raises("broken")), task_type)
    m.add_execute_task("bystander", anyio.sleep_forever, TaskType.STOP_GROUP)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert errors_of(caught.value) == [("bad", Stage.EXECUTE, task_type, Boom)]
    assert log[-2:] == ["bad.cleanup", "other.cleanup"]
    assert "other.execute.cancelled" in log


async def test_error_type_returning_early_just_ends_that_task() -> None:
    log: list[str] = []
    m, events = manager()
    m.add_task("other", FakeTask("other", log))
    m.add_task("early", FakeTask("early", log, execute=returns), TaskType.ERROR)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_RETURNED, "early")
        assert m.state is ManagerState.RUNNING
        assert "other.execute.cancelled" not in log
        m.shutdown()
    assert await outcome.finished() is None
    assert log[-2:] == ["early.cleanup", "other.cleanup"]


async def test_stop_group_waits_for_every_member_then_shuts_down_gracefully() -> None:
    log: list[str] = []
    m, events = manager()
    first, second = anyio.Event(), anyio.Event()
    m.add_task("server", FakeTask("server", log))
    m.add_task("job1", FakeTask("job1", log, execute=waits_for(first)), TaskType.STOP_GROUP)
    m.add_execute_task("job2", waits_for(second), TaskType.STOP_GROUP)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        first.set()
        await events.wait(EventKind.TASK_RETURNED, "job1")
        await anyio.lowlevel.checkpoint()
        assert m.state is ManagerState.RUNNING, "one STOP_GROUP member left: keep running"
        second.set()
    assert await outcome.finished() is None
    assert "server.execute.cancelled" in log
    assert [r.state for r in m.status()] == ["done", "done", "done"]


async def test_stop_group_members_added_at_runtime_count_too() -> None:
    m, events = manager()
    hold_release, late_release = anyio.Event(), anyio.Event()
    m.add_execute_task("job1", returns, TaskType.STOP_GROUP)
    m.add_execute_task("hold", waits_for(hold_release), TaskType.STOP_GROUP)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_RETURNED, "job1")
        late = m.add_execute_task("late", waits_for(late_release), TaskType.STOP_GROUP)
        hold_release.set()
        await events.wait(EventKind.TASK_RETURNED, "hold")
        await anyio.lowlevel.checkpoint()
        assert m.state is ManagerState.RUNNING, "the runtime member 'late' is still running"
        late_release.set()
        await late.wait()
    assert await outcome.finished() is None
    stop = next(e for e in events.events if e.kind is EventKind.SHUTDOWN_REQUESTED)
    assert "STOP_GROUP" in (stop.detail or "")


async def test_errors_raised_after_shutdown_began_are_recorded() -> None:
    log: list[str] = []

    async def fails_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise Boom("while stopping")

    m, events = manager()
    m.add_task("a", FakeTask("a", log, execute=fails_when_cancelled))
    m.add_execute_task("b", fails_when_cancelled, TaskType.ERROR)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.shutdown()
    assert sorted(errors_of(await outcome.finished())) == [
        ("a", Stage.EXECUTE, TaskType.STRICT, Boom),
        ("b", Stage.EXECUTE, TaskType.ERROR, Boom),
    ]
    assert log[-1] == "a.cleanup"


async def test_several_failures_are_reported_in_the_order_they_happened() -> None:
    m = TaskManager()
    gate = anyio.Event()

    async def first() -> None:
        gate.set()
        raise Boom("first")

    async def second() -> None:
        try:
            await gate.wait()
            await anyio.sleep_forever()
        finally:
            raise Boom("second")

    m.add_execute_task("second", second)
    m.add_execute_task("first", first)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert [str(e.__cause__) for e in task_errors(caught.value)] == ["first", "second"]


async def test_cancellation_is_not_an_error() -> None:
    log: list[str] = []
    m, events = manager()
    for name in "abc":
        m.add_task(name, FakeTask(name, log))
    assert await run_until_running_then_shut_down(m, events) is None
    assert sorted(e for e in log if e.endswith("cancelled")) == [f"{n}.execute.cancelled" for n in "abc"]
    assert not [e for e in events.events if e.kind is EventKind.TASK_FAILED]


async def test_an_empty_manager_serves_hot_added_work_until_shutdown() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("one", returns, TaskType.ERROR)
        await handle.wait()
        await anyio.lowlevel.checkpoint()
        assert m.state is ManagerState.RUNNING, "every task ended without a stop: keep serving"
        m.shutdown()
    assert await outcome.finished() is None


async def test_a_manager_whose_tasks_all_ended_keeps_running() -> None:
    m, events = manager()
    m.add_task("a", FakeTask("a", [], execute=returns), TaskType.ERROR)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_RETURNED, "a")
        await anyio.lowlevel.checkpoint()
        assert m.state is ManagerState.RUNNING
        m.shutdown()
    assert await outcome.finished() is None


async def test_strict_returning_after_shutdown_is_fine() -> None:
    m, events = manager()

    async def returns_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return  # swallowing the cancellation: the task simply returns after shutdown began

    m.add_execute_task("strict", returns_on_cancel)
    assert await run_until_running_then_shut_down(m, events) is None
    assert events.kinds("strict")[-1] == "task_returned"
