"""Semantics 8: every stage start/end with its duration goes to on_event and to the `lifecycle` logger."""

from __future__ import annotations

import dataclasses
import logging

import anyio
import pytest

from lifecycle import EventKind, LifecycleEvent, ManagerState, Stage, TaskManager, TaskManagerError, TaskType
from tests.core.lifecycle_testkit import Events, FakeTask, Outcome, manager, raises, returns, run_capturing

pytestmark = pytest.mark.anyio


async def test_every_stage_start_and_end_is_an_event_with_a_duration() -> None:
    m, events = manager(name="svc")
    m.add_task("db", FakeTask("db", []))
    m.add_execute_task("job", returns, TaskType.STOP_GROUP)
    await m.run()
    assert events.kinds("db") == [
        "task_initializing",
        "task_initialized",
        "task_executing",
        "task_cancelled",
        "task_cleaning_up",
        "task_cleaned_up",
    ]
    assert events.kinds("job") == ["task_executing", "task_returned"]
    for event in events.events:
        assert event.manager == "svc"
        assert event.time > 1e9  # wall-clock time, for display
        if event.task_name is not None:
            starts = event.kind.value in ("task_initializing", "task_executing", "task_cleaning_up")
            assert (event.duration is None) == starts
            assert event.duration is None or event.duration >= 0
            assert event.stage is not None
            assert event.task_type is not None
    states = [e.state for e in events.events if e.kind is EventKind.STATE_CHANGED]
    assert states == [
        ManagerState.INITIALIZING,
        ManagerState.RUNNING,
        ManagerState.STOPPING,
        ManagerState.STOPPED,
    ]
    stages = [e.stage for e in events.events if e.task_name == "db" and e.duration is not None]
    assert stages == [Stage.INITIALIZE, Stage.EXECUTE, Stage.CLEANUP]


async def test_failures_are_task_failed_events_carrying_the_task_error() -> None:
    m, events = manager()
    m.add_task("db", FakeTask("db", [], execute=raises("down")))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    [failed] = [e for e in events.events if e.kind is EventKind.TASK_FAILED]
    assert failed.error is caught.value.exceptions[0]
    assert failed.stage is Stage.EXECUTE
    assert failed.duration is not None


def test_lifecycle_event_is_frozen() -> None:
    event = LifecycleEvent(EventKind.TASK_INITIALIZED, "m", 0.0, task_name="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.task_name = "other"  # type: ignore[misc]
    name: str = "task_failed"
    assert name == EventKind.TASK_FAILED  # a str enum: handy in logs and metrics


async def test_steps_are_logged_at_info_and_failures_at_error_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle")
    m = TaskManager(name="svc")
    m.add_task("db", FakeTask("db", [], execute=raises("down")))
    with pytest.raises(TaskManagerError):
        await m.run()
    records = [r for r in caplog.records if r.name == "lifecycle"]
    messages = [r.getMessage() for r in records]
    assert "svc: task 'db' initializing" in messages
    assert any(m.startswith("svc: task 'db' initialized in ") and m.endswith(" s") for m in messages)
    assert any(m.startswith("svc: task 'db' cleaned up in ") for m in messages)
    [error] = [r for r in records if r.levelno == logging.ERROR]
    assert "svc: task 'db' failed in execute after" in error.getMessage()
    assert "Boom('down')" in error.getMessage()
    assert error.exc_info is not None
    assert str(error.exc_info[1]) == "down"
    assert all(r.levelno == logging.INFO for r in records if r is not error)


async def test_work_added_while_running_logs_its_steps_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lifecycle")
    events = Events()
    m = TaskManager(name="svc", on_event=events)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("conn-1", returns, TaskType.ERROR)
        await handle.wait()
        m.shutdown()
    assert await outcome.finished() is None
    levels = {r.getMessage(): r.levelno for r in caplog.records if "conn-1" in r.getMessage()}
    assert levels
    assert set(levels.values()) == {logging.DEBUG}
    assert events.kinds("conn-1") == ["task_executing", "task_returned"]  # on_event still sees them


async def test_an_on_event_callback_that_raises_is_logged_and_the_manager_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[LifecycleEvent] = []

    def on_event(event: LifecycleEvent) -> None:
        seen.append(event)
        raise RuntimeError("observer bug")

    log: list[str] = []
    m = TaskManager(name="svc", on_event=on_event)
    m.add_task("db", FakeTask("db", log, execute=returns), TaskType.STOP_GROUP)
    await m.run()
    assert log == ["db.initialize", "db.execute", "db.cleanup"]
    assert len(seen) > 5
    complaints = [r for r in caplog.records if "on_event callback" in r.getMessage()]
    assert len(complaints) == len(seen)
    assert complaints[0].exc_info is not None


async def test_shutdown_requests_carry_their_reason() -> None:
    m, events = manager()
    m.add_execute_task("bad", raises("x"))
    with pytest.raises(TaskManagerError):
        await m.run()
    [stop] = [e for e in events.events if e.kind is EventKind.SHUTDOWN_REQUESTED]
    assert stop.detail == "shutting down: task 'bad' failed in execute"


def test_on_event_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_event"):
        TaskManager(on_event="print")  # type: ignore[arg-type]


async def test_a_listener_added_later_gets_every_event_after_on_event() -> None:
    order: list[str] = []
    m = TaskManager(name="svc", on_event=lambda event: order.append(f"on_event:{event.kind.value}"))
    m.add_listener(lambda event: order.append(f"listener:{event.kind.value}"))
    m.add_execute_task("job", returns, TaskType.STOP_GROUP)
    await m.run()
    assert order[:2] == ["on_event:state_changed", "listener:state_changed"]
    assert [item.partition(":")[2] for item in order[::2]] == [item.partition(":")[2] for item in order[1::2]]
    assert "listener:task_returned" in order


def test_a_listener_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"add_listener\(listener\) must be a callable"):
        TaskManager().add_listener("print")  # type: ignore[arg-type]
