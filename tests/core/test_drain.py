"""Phased drain: readiness false first, then drain_delay with the executes still running, then cancel,
then cleanup. The drain's sleep is gated by the test (``fake_timing``), so the order is seen, not timed."""

from __future__ import annotations

import math

import anyio
import pytest

import lifecycle
from lifecycle import EventKind, ManagerState, TaskType
from tests.core.fake_timing import FakeTiming
from tests.core.lifecycle_testkit import FakeTask, Outcome, manager, run_capturing


async def test_readiness_turns_false_then_the_drain_delay_then_cancel_then_cleanup() -> None:
    log: list[str] = []
    timing = FakeTiming(gated=True)
    m, events = manager(drain_delay=5, **timing.seams())
    m.add_task("db", FakeTask("db", log))
    m.add_execute_task("worker", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        assert m.health().ready
        m.shutdown()
        health = m.health()
        assert (health.ready, health.draining, health.live) == (False, True, True)  # at once
        assert await timing.sleeping() == 5.0
        # during the drain: the executes still run, nothing is cancelled, work can still be added
        assert events.kinds("worker") == ["task_executing"]
        assert "db.execute.cancelled" not in log
        late = m.add_execute_task("late-request", anyio.sleep_forever)
        await events.wait(EventKind.TASK_EXECUTING, "late-request")
        timing.release()
    assert await outcome.finished() is None
    assert late.done
    order = [
        e.kind.value if e.task_name is None else f"{e.task_name}:{e.kind.value}"
        for e in events.events
        if e.kind
        in (
            EventKind.SHUTDOWN_REQUESTED,
            EventKind.DRAINING,
            EventKind.DRAINED,
            EventKind.TASK_CANCELLED,
            EventKind.TASK_CLEANING_UP,
            EventKind.TASK_CLEANED_UP,
        )
    ]
    assert order[:3] == ["shutdown_requested", "draining", "drained"]
    assert sorted(order[3:6]) == ["db:task_cancelled", "late-request:task_cancelled", "worker:task_cancelled"]
    assert order[6:] == ["db:task_cleaning_up", "db:task_cleaned_up"]
    assert log == ["db.initialize", "db.execute", "db.execute.cancelled", "db.cleanup"]
    drained = next(e for e in events.events if e.kind is EventKind.DRAINING)
    assert drained.detail is not None
    assert "drain_delay=5" in drained.detail


async def test_without_drain_delay_the_executes_are_cancelled_at_once() -> None:
    timing = FakeTiming(gated=True)
    m, events = manager(**timing.seams())
    m.add_execute_task("worker", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        m.shutdown()
    assert await outcome.finished() is None
    assert timing.sleeps == []
    assert not [e for e in events.events if e.kind in (EventKind.DRAINING, EventKind.DRAINED)]
    with pytest.raises(RuntimeError, match="shutting down"):
        m.add_execute_task("too-late", anyio.sleep_forever)


async def test_a_shutdown_during_initialize_does_not_drain() -> None:
    started = anyio.Event()

    async def slow_initialize() -> None:
        started.set()
        await anyio.sleep_forever()

    timing = FakeTiming(gated=True)
    m, events = manager(drain_delay=30, **timing.seams())
    m.add_task("db", FakeTask("db", [], initialize=slow_initialize))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await started.wait()
        assert not m.health().ready
        m.shutdown()
    assert await outcome.finished() is None
    assert timing.sleeps == []
    assert EventKind.READY not in [e.kind for e in events.events]


async def test_a_forced_shutdown_cuts_the_drain_short() -> None:
    timing = FakeTiming(gated=True)
    m, events = manager(drain_delay=60, **timing.seams())
    m.add_execute_task("worker", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        m.shutdown()
        await timing.sleeping()
        assert m.cancel_cleanups() == 0  # the second signal of lifecycle.run: no cleanup runs yet
        drained = await events.wait(EventKind.DRAINED)
    assert await outcome.finished() is None
    assert drained.detail is not None
    assert "cut short" in drained.detail


async def test_cancelling_run_from_outside_does_not_wait_for_the_drain() -> None:
    timing = FakeTiming(gated=True)
    m, events = manager(drain_delay=60, **timing.seams())
    log: list[str] = []
    m.add_task("db", FakeTask("db", log))
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            await events.wait(EventKind.READY)
            scope.cancel()
    assert timing.sleeps == []
    assert log[-1] == "db.cleanup"
    assert m.state is ManagerState.STOPPED


async def test_a_stop_group_ending_drains_too() -> None:
    finish = anyio.Event()
    timing = FakeTiming(gated=True)
    m, events = manager(drain_delay=2, **timing.seams())
    m.add_execute_task("job", finish.wait, TaskType.STOP_GROUP)
    m.add_execute_task("server", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        finish.set()
        assert await timing.sleeping() == 2
        assert events.kinds("server") == ["task_executing"]
        timing.release()
    assert await outcome.finished() is None


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (math.inf, ValueError), (math.nan, ValueError), ("5", TypeError), (True, TypeError)],
)
def test_drain_delay_must_be_a_finite_number_of_seconds_zero_or_more(
    bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"drain_delay must be a .*number of seconds zero or more"):
        lifecycle.TaskManager(drain_delay=bad)  # type: ignore[arg-type]
