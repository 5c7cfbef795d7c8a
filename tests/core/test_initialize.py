"""Semantics 3: initialize serially in add order; a failure cleans up in reverse and ends STOPPED."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lifecycle import EventKind, ManagerState, Stage, TaskError, TaskManager, TaskManagerError, TaskType
from tests.core.lifecycle_testkit import (
    Behaviour,
    Boom,
    FakeTask,
    Outcome,
    manager,
    raises,
    run_capturing,
    task_errors,
)

# Explicit, so the anyio plugin combines its backend parameter with each test's own parameters.
pytestmark = pytest.mark.anyio


class Overlap:
    """Detects two stages running at the same time."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0

    def stage(self) -> Behaviour:
        async def behaviour() -> None:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            self.active -= 1

        return behaviour


async def test_initialize_runs_serially_in_add_order_with_no_overlap() -> None:
    log: list[str] = []
    overlap = Overlap()
    m = TaskManager()
    for name in "abcd":
        task = FakeTask(name, log, initialize=overlap.stage(), execute=anyio.lowlevel.checkpoint)
        m.add_task(name, task, TaskType.STOP_GROUP)
    await m.run()
    assert [e for e in log if e.endswith("initialize")] == [f"{n}.initialize" for n in "abcd"]
    assert overlap.max_active == 1
    # Nothing executes before every task is initialized.
    assert log.index("d.initialize") < min(log.index(f"{n}.execute") for n in "abcd")


async def test_initialize_failure_cleans_up_in_reverse_one_after_another_and_raises() -> None:
    log: list[str] = []
    overlap = Overlap()
    m, events = manager(name="svc")
    m.add_task("a", FakeTask("a", log, cleanup=overlap.stage()))
    m.add_task("b", FakeTask("b", log, cleanup=overlap.stage()))
    m.add_task("c", FakeTask("c", log, initialize=raises("c cannot start")))
    m.add_task("d", FakeTask("d", log))
    handle = m.add_execute_task("queued", anyio.sleep_forever)

    with pytest.raises(TaskManagerError) as caught:
        await m.run()

    assert log == ["a.initialize", "b.initialize", "c.initialize", "b.cleanup", "a.cleanup"]
    assert overlap.max_active == 1
    [error] = task_errors(caught.value)
    assert (error.task_name, error.stage, error.task_type) == ("c", Stage.INITIALIZE, TaskType.STRICT)
    assert isinstance(error.__cause__, Boom)
    assert "svc" in str(caught.value)
    assert m.state is ManagerState.STOPPED
    assert handle.done
    rows = {row.name: row for row in m.status()}
    assert rows["c"].state == "failed"
    assert rows["d"].state == "skipped"
    assert rows["queued"].state == "skipped"
    assert rows["a"].stage is Stage.CLEANUP
    assert rows["a"].state == "done"
    assert EventKind.TASK_EXECUTING.value not in [e.kind.value for e in events.events]
    with pytest.raises(RuntimeError):
        m.add_task("e", FakeTask("e", log))
    with pytest.raises(RuntimeError):
        m.add_execute_task("f", anyio.sleep_forever)
    with pytest.raises(RuntimeError):
        await m.run()


async def test_initialize_error_comes_first_then_cleanup_errors_in_cleanup_order() -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("a", FakeTask("a", log, cleanup=raises("a cleanup")))
    m.add_task("b", FakeTask("b", log, cleanup=raises("b cleanup")))
    m.add_task("c", FakeTask("c", log, initialize=raises("c init")))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert [(e.task_name, e.stage) for e in task_errors(caught.value)] == [
        ("c", Stage.INITIALIZE),
        ("b", Stage.CLEANUP),
        ("a", Stage.CLEANUP),
    ]
    assert [str(e.__cause__) for e in task_errors(caught.value)] == ["c init", "b cleanup", "a cleanup"]


async def test_initialize_timeout_is_a_timeout_error_and_per_task_overrides_the_default() -> None:
    log: list[str] = []
    m = TaskManager(initialize_timeout=30)
    m.add_task("a", FakeTask("a", log))
    m.add_task("slow", FakeTask("slow", log, initialize=anyio.sleep_forever), initialize_timeout=0.01)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    [error] = task_errors(caught.value)
    assert error.task_name == "slow"
    assert error.stage is Stage.INITIALIZE
    assert isinstance(error.__cause__, TimeoutError)
    assert "0.01" in str(error.__cause__)
    assert log == ["a.initialize", "slow.initialize", "slow.initialize.cancelled", "a.cleanup"]


async def test_default_initialize_timeout_applies_when_not_overridden() -> None:
    m = TaskManager(initialize_timeout=0.01)
    m.add_task("slow", FakeTask("slow", [], initialize=anyio.sleep_forever))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert isinstance(task_errors(caught.value)[0].__cause__, TimeoutError)


async def test_none_removes_the_default_initialize_bound() -> None:
    log: list[str] = []
    m = TaskManager(initialize_timeout=0.01)

    async def slow_initialize() -> None:
        await anyio.sleep(0.05)  # the behaviour under test: longer than the default bound

    m.add_task(
        "patient",
        FakeTask("patient", log, initialize=slow_initialize, execute=anyio.lowlevel.checkpoint),
        TaskType.STOP_GROUP,
        initialize_timeout=None,
    )
    await m.run()
    assert log == ["patient.initialize", "patient.execute", "patient.cleanup"]


async def test_shutdown_during_initialize_stops_initializing_cleans_up_and_returns() -> None:
    log: list[str] = []
    m, _events = manager()
    in_b = anyio.Event()

    async def b_initialize() -> None:
        in_b.set()
        await anyio.sleep_forever()

    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, initialize=b_initialize))
    m.add_task("c", FakeTask("c", log))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(5):
            await in_b.wait()
        assert m.state is ManagerState.INITIALIZING
        m.shutdown()
        assert m.state is ManagerState.STOPPING  # type: ignore[comparison-overlap]  # shutdown() changed it
    assert await outcome.finished() is None
    # b's initialize was cancelled (it did not complete, so no cleanup), c never initialized.
    assert log == ["a.initialize", "b.initialize", "b.initialize.cancelled", "a.cleanup"]
    assert {r.name: r.state for r in m.status()} == {"a": "done", "b": "cancelled", "c": "skipped"}


async def test_shutdown_called_by_an_initialize_itself() -> None:
    log: list[str] = []
    m = TaskManager()

    async def initialize() -> None:
        m.shutdown()

    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, initialize=initialize))
    m.add_task("c", FakeTask("c", log))
    await m.run()
    # b's initialize completed (shutdown only cancels at the next checkpoint), so b is cleaned up too.
    assert log == ["a.initialize", "b.initialize", "b.cleanup", "a.cleanup"]


async def test_keyboard_interrupt_from_initialize_cleans_up_then_re_raises() -> None:
    log: list[str] = []
    m = TaskManager()

    async def interrupt() -> None:
        raise KeyboardInterrupt

    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, initialize=interrupt))
    with pytest.raises(KeyboardInterrupt):
        await m.run()
    assert log == ["a.initialize", "b.initialize", "a.cleanup"]
    assert m.state is ManagerState.STOPPED


def test_task_error_is_a_plain_exception_with_its_context() -> None:
    error = TaskError("db", Stage.INITIALIZE, TaskType.ERROR, Boom("no route"))
    assert "db" in str(error)
    assert "initialize" in str(error)
    assert "no route" in str(error)
