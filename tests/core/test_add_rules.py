"""Semantics 1 and 2 (the rules): what add_task / add_execute_task accept, and when."""

from __future__ import annotations

import math
from datetime import timedelta

import anyio
import pytest

import lifecycle
from lifecycle import ManagerState, TaskManager, TaskType
from tests.core.lifecycle_testkit import FakeTask, Outcome, manager, run_capturing

# Explicit, so the anyio plugin combines its backend parameter with each test's own parameters.
pytestmark = pytest.mark.anyio


class NoCleanup:
    async def initialize(self) -> None: ...

    async def execute(self) -> None: ...


class SyncExecute:
    async def initialize(self) -> None: ...

    def execute(self) -> None: ...

    async def cleanup(self) -> None: ...


def test_add_task_rejects_an_object_missing_a_stage_and_names_it() -> None:
    with pytest.raises(TypeError, match=r"cleanup\(\) is missing"):
        TaskManager().add_task("t", NoCleanup())  # type: ignore[arg-type]


def test_add_task_rejects_a_stage_that_is_not_a_coroutine_function() -> None:
    with pytest.raises(TypeError, match=r"execute\(\) is not an async def"):
        TaskManager().add_task("t", SyncExecute())  # type: ignore[arg-type]


def test_add_task_points_execute_only_work_to_add_execute_task() -> None:
    async def work() -> None: ...

    with pytest.raises(TypeError, match="add_execute_task"):
        TaskManager().add_task("t", work)  # type: ignore[arg-type]


def test_a_name_can_only_be_used_once_across_tasks_and_execute_tasks() -> None:
    m = TaskManager(name="svc")
    m.add_task("db", FakeTask("db", []))

    async def work() -> None: ...

    with pytest.raises(ValueError, match="'db' is already in task manager 'svc'"):
        m.add_task("db", FakeTask("db", []))
    with pytest.raises(ValueError, match="already"):
        m.add_execute_task("db", work)
    m.add_execute_task("worker", work)
    with pytest.raises(ValueError, match="already"):
        m.add_task("worker", FakeTask("worker", []))


@pytest.mark.parametrize(
    ("name", "error"), [("", ValueError), ("a\x00b", ValueError), (3, TypeError), (None, TypeError)]
)
def test_a_name_must_be_a_non_empty_string(name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="a task name must"):
        TaskManager().add_task(name, FakeTask("x", []))  # type: ignore[arg-type]
    with pytest.raises(error, match="a task name must"):
        TaskManager().add_execute_task(name, anyio.sleep_forever)  # type: ignore[arg-type]


def test_task_type_must_be_a_task_type() -> None:
    async def work() -> None: ...

    with pytest.raises(TypeError, match="TaskType"):
        TaskManager().add_task("t", FakeTask("t", []), "strict")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TaskType"):
        TaskManager().add_execute_task("t", work, "strict")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),  # no limit is None, never infinity
        (True, TypeError),
        ("5", TypeError),
    ],
)
def test_timeouts_must_be_finite_numbers_greater_than_zero_or_none(
    value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"initialize_timeout must be a .*number of seconds greater than zero"):
        TaskManager(initialize_timeout=value)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"add_task\('t'\): cleanup_timeout .*\(or None for no limit\)"):
        TaskManager().add_task("t", FakeTask("t", []), cleanup_timeout=value)  # type: ignore[arg-type]
    with pytest.raises(error, match="shutdown_timeout"):
        TaskManager(shutdown_timeout=value)  # type: ignore[arg-type]


def test_timeouts_accept_numbers_timedeltas_and_none() -> None:
    manager = TaskManager(initialize_timeout=timedelta(seconds=2), cleanup_timeout=1, shutdown_timeout=None)
    manager.add_task("t", FakeTask("t", []), initialize_timeout=None, cleanup_timeout=0.5)
    [row] = manager.status()
    assert row.name == "t"


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (3, TypeError), (None, TypeError)])
def test_manager_name_must_be_a_non_empty_string(name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="TaskManager name must be a non-empty string"):
        TaskManager(name=name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clock": 5}, "clock must be a callable"),
        ({"sleep": "later"}, "sleep must be an async callable"),
        ({"rng": 7}, r"rng must be a random\.Random"),
    ],
)
def test_the_time_seam_is_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        TaskManager(**kwargs)  # type: ignore[arg-type]


def test_add_execute_task_rejects_what_is_not_execute_work() -> None:
    class SyncWork:
        def execute(self) -> None: ...

    m = TaskManager()
    with pytest.raises(TypeError, match="ExecuteTask"):
        m.add_execute_task("a", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"execute must be an async def"):
        m.add_execute_task("b", SyncWork())  # type: ignore[arg-type]


def test_a_new_manager_is_new_and_has_no_rows() -> None:
    m = TaskManager(name="svc")
    assert m.state is ManagerState.NEW
    assert m.status() == []
    assert m.name == "svc"
    assert "svc" in repr(m)


async def test_add_task_after_run_started_raises_runtime_error() -> None:
    log: list[str] = []
    m, events = manager()
    m.add_task("a", FakeTask("a", log))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        with pytest.raises(RuntimeError, match="before run"):
            m.add_task("b", FakeTask("b", log))
        m.shutdown()
    assert await outcome.finished() is None
    with pytest.raises(RuntimeError, match="before run"):
        m.add_task("c", FakeTask("c", log))


async def test_add_task_during_initialize_raises_runtime_error() -> None:
    m = TaskManager()
    seen: list[BaseException] = []

    async def initialize() -> None:
        try:
            m.add_task("late", FakeTask("late", []))
        except RuntimeError as exc:
            seen.append(exc)

    m.add_task(
        "a", FakeTask("a", [], initialize=initialize, execute=lambda: anyio.sleep(0)), TaskType.STOP_GROUP
    )
    await m.run()
    assert len(seen) == 1
    assert "initializing" in str(seen[0])


async def test_a_manager_runs_once() -> None:
    m = TaskManager()
    m.shutdown()
    await m.run()
    assert m.state is ManagerState.STOPPED
    with pytest.raises(RuntimeError, match="runs once"):
        await m.run()
    with pytest.raises(RuntimeError, match="runs once"):
        await m.initialize()


def test_every_public_name_has_a_docstring() -> None:
    for name in lifecycle.__all__:
        if name.startswith("__"):
            continue
        assert getattr(lifecycle, name).__doc__, name
