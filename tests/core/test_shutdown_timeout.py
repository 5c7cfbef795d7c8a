"""Semantics 5: a shutdown_timeout passed with executes still running yields a stuck-shutdown report."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest

from lifecycle import EventKind, LifecycleEvent, Stage, TaskManager, TaskManagerError
from tests.core.fake_timing import FakeTiming
from tests.core.lifecycle_testkit import (
    Events,
    FakeTask,
    Outcome,
    run_capturing,
    run_until_running_then_shut_down,
    task_errors,
)

pytestmark = pytest.mark.anyio


async def deep_wait(release: anyio.Event) -> None:
    with anyio.CancelScope(shield=True):
        await release.wait()  # STUCK-HERE


async def stubborn_execute(release: anyio.Event) -> None:
    await deep_wait(release)


def _stuck_line() -> str:
    with open(__file__) as source:
        number = next(i for i, line in enumerate(source, 1) if line.rstrip().endswith("# STUCK-HERE"))
    return f"{__file__}:{number} in deep_wait"


async def test_stuck_execute_is_reported_with_its_await_stack_and_the_manager_keeps_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    release = anyio.Event()
    events = Events()

    def on_event(event: LifecycleEvent) -> None:
        events(event)
        if event.kind is EventKind.SHUTDOWN_STUCK:
            log.append("stuck reported")
            release.set()  # let the stuck task go once the report is out

    m = TaskManager(name="svc", shutdown_timeout=0.05, on_event=on_event)
    m.add_task("db", FakeTask("db", log))
    m.add_execute_task("stubborn", lambda: stubborn_execute(release))
    m.add_execute_task("polite", anyio.sleep_forever)
    outcome = Outcome()
    caplog.set_level(logging.ERROR, logger="lifecycle")
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.shutdown()
    error = await outcome.finished()

    stuck = next(e for e in events.events if e.kind is EventKind.SHUTDOWN_STUCK)
    report = stuck.detail or ""
    assert "svc: shutdown stuck: 1 task(s) still running 0.05 s" in report
    assert "task 'stubborn' (STRICT) still in execute" in report
    assert _stuck_line() in report
    assert "polite" not in report
    # The manager kept waiting: the cleanup ran only after the stuck task was released.
    assert log[-2:] == ["stuck reported", "db.cleanup"]
    assert isinstance(error, TaskManagerError)
    [task_error] = task_errors(error)
    assert (task_error.task_name, task_error.stage) == ("stubborn", Stage.EXECUTE)
    assert isinstance(task_error.__cause__, TimeoutError)
    assert "deep_wait" in str(task_error.__cause__)
    assert "s after shutdown was requested (shutdown_timeout=0.05 s), waiting at" in str(task_error.__cause__)
    assert any(r.levelno == logging.ERROR and "shutdown stuck" in r.getMessage() for r in caplog.records)
    assert next(r for r in m.status() if r.name == "stubborn").state == "failed"


async def test_the_timeout_error_counts_from_the_shutdown_request_not_from_the_execute_start() -> None:
    release = anyio.Event()
    events = Events()

    def on_event(event: LifecycleEvent) -> None:
        events(event)
        if event.kind is EventKind.SHUTDOWN_STUCK:
            release.set()

    timing = FakeTiming(now=1000.0, gated=True)
    m = TaskManager(name="svc", shutdown_timeout=0.05, drain_delay=30, on_event=on_event, **timing.seams())
    m.add_execute_task("stubborn", lambda: stubborn_execute(release))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        timing.now += 3600  # the service runs for an hour, then is asked to stop
        m.shutdown()
        assert await timing.sleeping() == 30
        timing.release()  # the drain delay passes (the fake clock moves 30 s); then 0.05 s more, real
    error = await outcome.finished()

    assert isinstance(error, TaskManagerError)
    [task_error] = task_errors(error)
    assert isinstance(task_error.__cause__, TimeoutError)
    message = str(task_error.__cause__)
    assert message.startswith(
        "execute still running 30.0 s after shutdown was requested "
        "(drain_delay=30 s, then shutdown_timeout=0.05 s), waiting at "
    ), message
    assert _stuck_line() in message


async def test_no_report_when_everything_stops_in_time() -> None:
    events = Events()
    m = TaskManager(shutdown_timeout=30, on_event=events)
    m.add_execute_task("polite", anyio.sleep_forever)
    assert await run_until_running_then_shut_down(m, events) is None
    assert not [e for e in events.events if e.kind is EventKind.SHUTDOWN_STUCK]


async def test_stuck_report_on_demand_names_every_running_stage() -> None:
    events = Events()
    release = anyio.Event()
    m = TaskManager(name="svc", on_event=events)
    m.add_execute_task("stubborn", lambda: stubborn_execute(release))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_EXECUTING, "stubborn")
        await anyio.lowlevel.checkpoint()
        report = m.stuck_report("third signal")
        assert report.startswith("svc: third signal")
        assert _stuck_line() in report
        release.set()
        m.shutdown()
    # shutdown() was requested before the released task could resume: its return is not an error.
    assert await outcome.finished() is None


async def test_stuck_report_when_nothing_runs() -> None:
    assert "no task stage is running" in TaskManager(name="idle").stuck_report()
