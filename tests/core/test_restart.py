"""Restart policies: what restarts, in which order, with which backoff, and the sliding-window intensity.

Time comes from a fake clock and sleep (``fake_timing``): the window's edges are hit exactly, no test waits.
"""

from __future__ import annotations

import pickle
import random
from datetime import timedelta

import anyio
import pytest

import lifecycle
from lifecycle import (
    Backoff,
    EventKind,
    Restart,
    Stage,
    TaskError,
    TaskManagerError,
    TaskType,
    UnexpectedStopError,
)
from tests.core.fake_timing import FakeTiming
from tests.core.lifecycle_testkit import Boom, FakeTask, Outcome, manager, run_capturing, task_errors

STEADY = Backoff(initial=0.5, cap=4.0, jitter=False)


def failing_at(
    timing: FakeTiming, times: list[float], then: anyio.Event | None = None
) -> lifecycle.ExecuteTask:
    """An execute task whose n-th run sets the clock to ``times[n]`` and raises; afterwards it waits."""

    class Flaky:
        runs = 0

        async def execute(self) -> None:
            run = Flaky.runs
            Flaky.runs += 1
            if run < len(times):
                timing.now = times[run]
                raise Boom(f"run {run}")
            if then is not None:
                then.set()
            await anyio.sleep_forever()

    return Flaky()


# ------------------------------------------------------------------ the policy object


def test_defaults_match_the_issue() -> None:
    policy = Restart()
    assert (policy.mode, policy.max_restarts, policy.within) == ("on-failure", 5, 60.0)
    assert policy.backoff == Backoff(initial=0.1, cap=30.0)
    assert policy.backoff.jitter


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "sometimes"}, ValueError, "'on-failure' or 'always'"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be at least 0"),
        ({"max_restarts": 2.5}, TypeError, r"max_restarts must be a whole number of at least 0 \(an int\)"),
        ({"max_restarts": True}, TypeError, "max_restarts must be a whole number"),
        ({"within": 0}, ValueError, "within must be a finite number of seconds greater than zero"),
        ({"within": float("inf")}, ValueError, "within must be a finite number of seconds greater than zero"),
        ({"within": "60"}, TypeError, "within must be a number of seconds greater than zero"),
        ({"backoff": 1.0}, TypeError, "backoff must be a lifecycle.Backoff"),
    ],
)
def test_bad_policies_are_refused_with_a_clear_message(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Restart(**kwargs)  # type: ignore[arg-type]


def test_within_takes_a_timedelta_and_keeps_seconds() -> None:
    assert Restart(within=timedelta(minutes=2)).within == 120.0
    assert Restart(within=timedelta(minutes=2)) == Restart(within=120)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"initial": -1.0}, ValueError, "Backoff initial must be a finite number of seconds zero or more"),
        ({"initial": float("nan")}, ValueError, "Backoff initial"),
        ({"cap": float("inf")}, ValueError, "Backoff cap must be a finite number"),
        ({"initial": "1"}, TypeError, "Backoff initial must be a number of seconds"),
        ({"initial": 5.0, "cap": 1.0}, ValueError, r"Backoff cap \(1.0\) must be >= initial \(5.0\)"),
        ({"multiplier": 0.5}, ValueError, "Backoff multiplier must be a finite number of at least 1"),
        ({"multiplier": float("inf")}, ValueError, "Backoff multiplier must be a finite number"),
        ({"multiplier": True}, TypeError, "Backoff multiplier must be a number"),
    ],
)
def test_bad_backoffs_are_refused_with_a_clear_message(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_add_refuses_something_that_is_not_a_restart() -> None:
    m = lifecycle.TaskManager()
    with pytest.raises(TypeError, match=r"restart must be a lifecycle\.Restart"):
        m.add_task("db", FakeTask("db", []), restart=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"restart must be a lifecycle\.Restart"):
        m.add_execute_task("w", anyio.sleep_forever, restart={"max_restarts": 1})  # type: ignore[arg-type]


# ------------------------------------------------------------------ the sliding window, at its edges


@pytest.mark.parametrize(
    ("failure_times", "restarts", "sleeps"),
    [
        # max_restarts=2 within 10 s: a third failure 9.999 s after the first is one too many ...
        ([0.0, 1.0, 9.999], 2, [0.5, 1.0]),
        # ... exactly 10 s after it, the first restart has left the window, so it restarts a third time
        # (the window holds 1.0 and 10.0: the backoff is at its second step), and the next failure at
        # 10.5 finds two restarts in the window again.
        ([0.0, 1.0, 10.0, 10.5], 3, [0.5, 1.0, 1.0]),
        # at 11.0 both 0.0 and 1.0 are out: restart number 1 of a fresh window (backoff back to 0.5)
        ([0.0, 1.0, 11.0, 11.0, 11.0], 4, [0.5, 1.0, 0.5, 1.0]),
    ],
)
async def test_intensity_is_a_sliding_window_tested_at_its_edges(
    failure_times: list[float], restarts: int, sleeps: list[float]
) -> None:
    timing = FakeTiming(advance=False)
    m, events = manager(**timing.seams())
    policy = Restart(max_restarts=2, within=10.0, backoff=STEADY)
    m.add_execute_task("flaky", failing_at(timing, failure_times), TaskType.ERROR, restart=policy)
    with pytest.raises(TaskManagerError) as caught:
        with anyio.fail_after(10):
            await m.run()
    [error] = task_errors(caught.value)
    assert error.task_name == "flaky"
    assert error.restarts == restarts
    assert isinstance(error.__cause__, Boom)
    assert str(error.__cause__) == f"run {len(failure_times) - 1}"
    assert f"gave up after {restarts} restarts: 2 within 10 s reached max_restarts=2" in str(error)
    assert timing.sleeps == sleeps
    assert len([e for e in events.events if e.kind is EventKind.TASK_RESTARTING]) == restarts
    [row] = m.status()
    assert (row.state, row.restarts, row.error) == ("failed", restarts, error)
    assert row.last_error is error


async def test_max_restarts_zero_never_restarts_and_says_so() -> None:
    timing = FakeTiming()
    m, _ = manager(**timing.seams())
    m.add_execute_task("once", failing_at(timing, [0.0]), restart=Restart(max_restarts=0))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    [error] = task_errors(caught.value)
    assert error.restarts == 0
    assert "gave up after 0 restarts" in str(error)


async def test_backoff_grows_with_the_restarts_in_the_window_and_uses_the_jitter_source() -> None:
    timing = FakeTiming(advance=False, rng=random.Random(7))
    m, _ = manager(**timing.seams())
    backoff = Backoff(initial=1.0, cap=5.0)
    m.add_execute_task(
        "flaky", failing_at(timing, [0.0] * 5), restart=Restart(max_restarts=4, backoff=backoff)
    )
    with pytest.raises(TaskManagerError):
        await m.run()
    same_draws = random.Random(7)
    assert timing.sleeps == [backoff.delay(n, same_draws) for n in (1, 2, 3, 4)]
    assert all(0.0 <= d <= c for d, c in zip(timing.sleeps, [1.0, 2.0, 4.0, 5.0], strict=True))


# ------------------------------------------------------------------ what a restart does


async def test_a_restarted_task_runs_cleanup_then_initialize_then_execute_again() -> None:
    log: list[str] = []
    failures = iter([Boom("first"), Boom("second")])
    steady = anyio.Event()

    async def execute() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        steady.set()
        await anyio.sleep_forever()

    m, _ = manager(**FakeTiming().seams())
    m.add_task("db", FakeTask("db", log, execute=execute), restart=Restart(backoff=STEADY))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await steady.wait()
        m.shutdown()
    assert await outcome.finished() is None
    assert log == [
        "db.initialize",
        "db.execute",
        "db.cleanup",
        "db.initialize",
        "db.execute",
        "db.cleanup",
        "db.initialize",
        "db.execute",
        "db.execute.cancelled",
        "db.cleanup",
    ]
    [row] = m.status()
    assert (row.restarts, row.error, row.stage, row.state) == (2, None, Stage.CLEANUP, "done")
    assert isinstance(row.last_error, TaskError)
    assert str(row.last_error.__cause__) == "second"


async def test_every_restart_is_an_event_and_visible_in_status_and_health() -> None:
    timing = FakeTiming(gated=True)
    m, events = manager(**timing.seams())
    again = anyio.Event()
    policy = Restart(max_restarts=3, within=60, backoff=STEADY)
    m.add_execute_task("worker", failing_at(timing, [timing.now], then=again), restart=policy)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        assert await timing.sleeping() == 0.5  # in the backoff now
        restarting = await events.wait(EventKind.TASK_RESTARTING, "worker")
        assert restarting.duration == 0.5
        assert isinstance(restarting.error, TaskError)
        assert isinstance(restarting.error.__cause__, Boom)
        assert restarting.detail is not None
        assert "restart 1 of 3 within 60 s" in restarting.detail
        [row] = m.status()
        assert (row.state, row.restarts, row.error) == ("restarting", 1, None)
        assert row.last_error is restarting.error
        health = m.health()
        assert not health.ready
        assert health.live
        assert health.tasks[0].restarting
        not_ready = await events.wait(EventKind.NOT_READY)
        assert not_ready.detail == "task 'worker' is restarting"
        timing.release()
        with anyio.fail_after(10):
            await again.wait()
        assert m.health().ready
        assert m.status()[0].state == "running"
        m.shutdown()
    assert await outcome.finished() is None
    kinds = [e.kind for e in events.events if e.kind in (EventKind.READY, EventKind.NOT_READY)]
    assert kinds == [EventKind.READY, EventKind.NOT_READY, EventKind.READY]


async def test_a_strict_early_return_is_a_failure_to_restart_and_past_the_intensity_an_unexpected_stop() -> (
    None
):
    calls = 0

    async def returns_early() -> None:
        nonlocal calls
        calls += 1

    m, _ = manager(**FakeTiming().seams())
    m.add_execute_task("strict", returns_early, restart=Restart(max_restarts=2, backoff=STEADY))
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    [error] = task_errors(caught.value)
    assert calls == 3
    assert isinstance(error.__cause__, UnexpectedStopError)
    assert error.restarts == 2
    assert "gave up after 2 restarts" in str(error)


async def test_on_failure_leaves_a_returning_error_task_alone_but_always_restarts_it() -> None:
    calls = {"on-failure": 0, "always": 0}

    def returner(mode: str) -> lifecycle.ExecuteTask:
        class Returns:
            async def execute(self) -> None:
                calls[mode] += 1

        return Returns()

    m, events = manager(**FakeTiming().seams())
    m.add_execute_task("calm", returner("on-failure"), TaskType.ERROR, restart=Restart(backoff=STEADY))
    m.add_execute_task(
        "eager", returner("always"), TaskType.ERROR, restart=Restart("always", max_restarts=3, backoff=STEADY)
    )
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_RETURNED, "eager")
        await events.wait(EventKind.TASK_RETURNED, "calm")
        assert m.state is lifecycle.ManagerState.RUNNING  # past the intensity an ERROR return is still fine
        m.shutdown()
    assert await outcome.finished() is None
    assert calls == {"on-failure": 1, "always": 4}
    rows = {row.name: row for row in m.status()}
    assert (rows["eager"].restarts, rows["eager"].state, rows["eager"].error) == (3, "done", None)
    assert rows["calm"].restarts == 0
    [restart_event, *_] = [e for e in events.events if e.kind is EventKind.TASK_RESTARTING]
    assert restart_event.error is None  # a return, not a failure
    # Running out of restarts after a return is said, with how many: the task does not end quietly.
    [eager_end] = [e for e in events.events if e.kind is EventKind.TASK_RETURNED and e.task_name == "eager"]
    assert eager_end.detail is not None
    assert "is not restarted again (gave up after 3 restarts" in eager_end.detail
    [calm_end] = [e for e in events.events if e.kind is EventKind.TASK_RETURNED and e.task_name == "calm"]
    assert calm_end.detail is None


async def test_a_failing_initialize_during_a_restart_counts_as_one_more_failure() -> None:
    log: list[str] = []
    initializations = 0

    async def initialize() -> None:
        nonlocal initializations
        initializations += 1
        if initializations == 2:
            raise Boom("cannot reconnect")

    executions = 0
    steady = anyio.Event()

    async def execute() -> None:
        nonlocal executions
        executions += 1
        if executions == 1:
            raise Boom("connection lost")
        steady.set()
        await anyio.sleep_forever()

    timing = FakeTiming()
    m, events = manager(**timing.seams())
    m.add_task(
        "db", FakeTask("db", log, initialize=initialize, execute=execute), restart=Restart(backoff=STEADY)
    )
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await steady.wait()
        m.shutdown()
    assert await outcome.finished() is None
    restarts = [e for e in events.events if e.kind is EventKind.TASK_RESTARTING]
    assert [e.error.stage for e in restarts if isinstance(e.error, TaskError)] == [
        Stage.EXECUTE,
        Stage.INITIALIZE,
    ]
    assert timing.sleeps == [0.5, 1.0]
    # the failed initialize released what it took: no cleanup for it, one cleanup per completed initialize
    assert log == [
        "db.initialize",
        "db.execute",
        "db.cleanup",
        "db.initialize",
        "db.initialize",
        "db.execute",
        "db.execute.cancelled",
        "db.cleanup",
    ]


async def test_a_failing_first_initialize_is_not_restarted() -> None:
    m, _ = manager(**FakeTiming().seams())
    log: list[str] = []
    m.add_task("db", FakeTask("db", log, initialize=_raise_boom), restart=Restart())
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert [e.stage for e in task_errors(caught.value)] == [Stage.INITIALIZE]
    assert log == ["db.initialize"]


async def _raise_boom() -> None:
    raise Boom("nope")


# ------------------------------------------------------------------ what stops restarting


async def test_shutdown_during_the_backoff_ends_the_task_without_error_or_second_cleanup() -> None:
    log: list[str] = []
    timing = FakeTiming(gated=True)
    m, _ = manager(**timing.seams())
    m.add_task("db", FakeTask("db", log, execute=_raise_boom), restart=Restart(backoff=STEADY))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await timing.sleeping()
        m.shutdown()
    assert await outcome.finished() is None
    assert log == ["db.initialize", "db.execute", "db.cleanup"]
    [row] = m.status()
    assert (row.restarts, row.error) == (1, None)
    assert m.health().tasks[0].restarting is False


async def test_cancelling_during_the_backoff_stops_restarting_and_is_not_an_error() -> None:
    timing = FakeTiming(gated=True)
    m, events = manager(**timing.seams())
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("job", _raise_boom, restart=Restart(backoff=STEADY))
        await timing.sleeping()
        assert not m.health().ready
        assert m.cancel("job") is True
        await handle.wait()
        assert m.health().ready  # nothing restarts any more
        assert m.cancel("job") is False  # ended (and forgotten: it ended without error)
        assert m.state is lifecycle.ManagerState.RUNNING
        m.shutdown()
    assert await outcome.finished() is None
    assert events.kinds("job")[-1] == "task_cancelled"


async def test_errors_after_shutdown_began_are_not_restarted() -> None:
    timing = FakeTiming()
    m, events = manager(**timing.seams())

    async def fails_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise Boom("while stopping")

    m.add_execute_task("w", fails_when_cancelled, restart=Restart())
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        m.shutdown()
    error = await outcome.finished()
    assert isinstance(error, TaskManagerError)
    assert task_errors(error)[0].restarts == 0
    assert timing.sleeps == []


async def test_an_execute_task_added_while_running_restarts_too() -> None:
    timing = FakeTiming()
    m, events = manager(**timing.seams())
    steady = anyio.Event()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.add_execute_task(
            "late", failing_at(timing, [0.0, 0.0], then=steady), restart=Restart(backoff=STEADY)
        )
        with anyio.fail_after(10):
            await steady.wait()
        assert {row.name: row.restarts for row in m.status()} == {"late": 2}
        assert [(t.name, t.added_while_running) for t in m.health().tasks] == [("late", True)]
        m.shutdown()
    assert await outcome.finished() is None


async def test_restart_totals_keep_the_restarts_of_forgotten_execute_tasks() -> None:
    timing = FakeTiming()
    m, events = manager(**timing.seams())
    m.add_task("db", FakeTask("db", []))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        assert m.restart_totals() == {}
        steady = anyio.Event()
        handle = m.add_execute_task(
            "request", failing_at(timing, [0.0], then=steady), TaskType.ERROR, restart=Restart(backoff=STEADY)
        )
        with anyio.fail_after(10):
            await steady.wait()  # failed once, restarted, running again
        handle.cancel()
        await handle.wait()
        assert [row.name for row in m.status()] == ["db"]  # the request was forgotten...
        totals = m.restart_totals()
        assert totals == {"request": 1}  # ...but not its restart
        totals["request"] = 99  # a copy
        assert m.restart_totals() == {"request": 1}
        m.shutdown()
    assert await outcome.finished() is None


# ------------------------------------------------------------------ cancel by name


async def test_manager_cancel_by_name() -> None:
    m, events = manager()
    m.add_task("db", FakeTask("db", []))
    queued = m.add_execute_task("queued", anyio.sleep_forever)
    assert m.cancel("queued") is True  # before run(): it never starts
    assert m.cancel("nobody") is False
    with pytest.raises(ValueError, match="'db' is a Task"):
        m.cancel("db")
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.add_execute_task("conn", anyio.sleep_forever)
        await events.wait(EventKind.TASK_EXECUTING, "conn")
        assert m.cancel("conn") is True
        await events.wait(EventKind.TASK_CANCELLED, "conn")
        assert m.state is lifecycle.ManagerState.RUNNING
        m.shutdown()
    assert await outcome.finished() is None
    assert queued.done
    assert "task_executing" not in events.kinds("queued")


def test_task_errors_keep_their_restart_count_through_pickling() -> None:
    error = TaskError("db", Stage.EXECUTE, TaskType.STRICT, Boom("x"), 3, "gave up after 3 restarts")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.restarts, copy.restart_note, str(copy)) == (3, "gave up after 3 restarts", str(error))
    assert "after 2 restarts" in str(TaskError("db", Stage.EXECUTE, TaskType.STRICT, Boom("x"), 2))


async def test_a_failing_cleanup_during_a_restart_counts_as_one_more_failure() -> None:
    log: list[str] = []
    cleanups = 0

    async def cleanup() -> None:
        nonlocal cleanups
        cleanups += 1
        if cleanups == 1:
            raise Boom("cannot close")

    executions = 0
    steady = anyio.Event()

    async def execute() -> None:
        nonlocal executions
        executions += 1
        if executions == 1:
            raise Boom("crashed")
        steady.set()
        await anyio.sleep_forever()

    timing = FakeTiming()
    m, events = manager(**timing.seams())
    task = FakeTask("db", log, execute=execute, cleanup=cleanup)
    m.add_task("db", task, restart=Restart(backoff=STEADY))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await steady.wait()
        m.shutdown()
    assert await outcome.finished() is None
    restarts = [e.error for e in events.events if e.kind is EventKind.TASK_RESTARTING]
    assert [(e.stage, str(e.__cause__)) for e in restarts if isinstance(e, TaskError)] == [
        (Stage.EXECUTE, "crashed"),
        (Stage.CLEANUP, "cannot close"),
    ]
    # the failed cleanup is not retried: the next round initializes again
    assert log == [
        "db.initialize",
        "db.execute",
        "db.cleanup",
        "db.initialize",
        "db.execute",
        "db.execute.cancelled",
        "db.cleanup",
    ]
    assert timing.sleeps == [1.0]  # the backoff of the second restart (the first one's cleanup failed)
    assert m.status()[0].restarts == 2
