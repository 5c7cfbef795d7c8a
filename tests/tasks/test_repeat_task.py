"""Repeat: start-to-start schedule, dropped ticks, failures logged and survived, cancellation."""

from __future__ import annotations

import logging
import math
from datetime import timedelta

import anyio
import pytest

import lifecycle
from lifecycle.tasks import Repeat
from tests.core.lifecycle_testkit import task_errors


class FakeTime:
    """A clock and a sleep that advance instantly, so schedules are checked without real waiting."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


async def run_calls(
    time: FakeTime, durations: list[float], *, interval: float = 1.0, run_immediately: bool = True
) -> tuple[list[float], Repeat]:
    """Run a Repeat until it has made ``len(durations)`` calls; call ``i`` takes ``durations[i]`` seconds."""
    starts: list[float] = []
    with anyio.fail_after(5), anyio.CancelScope() as scope:

        async def fn() -> None:
            starts.append(time.now)
            time.now += durations[len(starts) - 1]
            if len(starts) == len(durations):
                scope.cancel()

        repeat = Repeat(
            fn, interval=interval, run_immediately=run_immediately, clock=time.clock, sleep=time.sleep
        )
        await repeat.execute()
    return starts, repeat


async def test_calls_are_spaced_start_to_start() -> None:
    time = FakeTime()
    starts, repeat = await run_calls(time, [0.2, 0.0, 0.7, 0.3])
    assert starts == pytest.approx([100.0, 101.0, 102.0, 103.0])
    # The sleeps make up for how long each call took (start to start, not end to start).
    assert time.sleeps[:3] == pytest.approx([0.8, 1.0, 0.3])
    assert (repeat.calls, repeat.failures, repeat.skipped) == (4, 0, 0)


async def test_run_immediately_false_waits_one_interval_first() -> None:
    time = FakeTime()
    starts, _ = await run_calls(time, [0.0, 0.0], interval=5.0, run_immediately=False)
    assert starts == pytest.approx([105.0, 110.0])


async def test_overrunning_call_drops_missed_ticks_instead_of_queueing_them() -> None:
    time = FakeTime()
    starts, repeat = await run_calls(time, [2.5, 0.1, 0.1])
    # Ticks at 101 and 102 fell during the first call: dropped, and the schedule stays on the grid.
    assert starts == pytest.approx([100.0, 103.0, 104.0])
    assert repeat.skipped == 2


async def test_call_ending_exactly_on_a_tick_runs_again_at_once() -> None:
    time = FakeTime()
    starts, repeat = await run_calls(time, [1.0, 2.0, 0.0])
    assert starts == pytest.approx([100.0, 101.0, 103.0])
    assert repeat.skipped == 1  # only the tick at 102, which passed during the second call


async def test_failure_is_logged_with_traceback_and_repetition_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = FakeTime()
    starts: list[float] = []
    caplog.set_level(logging.INFO, logger="lifecycle")
    with anyio.fail_after(5), anyio.CancelScope() as scope:

        async def flaky() -> None:
            starts.append(time.now)
            if len(starts) in (1, 2):
                raise ValueError(f"boom {len(starts)}")
            scope.cancel()

        repeat = Repeat(flaky, interval=1.0, clock=time.clock, sleep=time.sleep, name="flaky-check")
        await repeat.execute()
    assert starts == pytest.approx([100.0, 101.0, 102.0])
    assert (repeat.calls, repeat.failures) == (3, 2)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.name for r in failures] == ["lifecycle.tasks", "lifecycle.tasks"]
    assert "flaky-check" in failures[0].getMessage()
    assert "1 in a row" in failures[0].getMessage()
    assert "2 in a row" in failures[1].getMessage()
    exc_info = failures[1].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], ValueError)
    assert str(exc_info[1]) == "boom 2"


async def test_synchronous_exception_from_fn_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    time = FakeTime()
    calls = 0
    with anyio.fail_after(5), anyio.CancelScope() as scope:

        def broken() -> object:
            nonlocal calls
            calls += 1
            if calls == 2:
                scope.cancel()
            raise KeyError("sync")

        await Repeat(broken, interval=1.0, clock=time.clock, sleep=time.sleep).execute()  # type: ignore[arg-type]
    assert calls == 2
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError, KeyError]


async def test_fn_returning_a_non_awaitable_is_a_type_error() -> None:
    time = FakeTime()
    repeat = Repeat(lambda: None, interval=1.0, clock=time.clock, sleep=time.sleep)  # type: ignore[arg-type,return-value]
    with anyio.fail_after(5), pytest.raises(TypeError, match="not an awaitable"):
        await repeat.execute()


async def test_cancellation_stops_a_call_in_progress_without_logging_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered = anyio.Event()
    cancelled = False

    async def slow() -> None:
        nonlocal cancelled
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(Repeat(slow, interval=0.01).execute)
            await entered.wait()
            task_group.cancel_scope.cancel()
    assert cancelled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_real_clock_calls_in_order_and_never_overlap() -> None:
    running = 0
    overlaps = 0
    starts: list[float] = []
    three_done = anyio.Event()

    async def tick() -> None:
        nonlocal running, overlaps
        running += 1
        overlaps += running > 1
        starts.append(anyio.current_time())
        await anyio.sleep(0)
        running -= 1
        if len(starts) == 3:
            three_done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(Repeat(tick, interval=0.005).execute)
            await three_done.wait()
            task_group.cancel_scope.cancel()
    assert overlaps == 0
    assert starts == sorted(starts)


async def test_keeps_a_manager_running_and_stops_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    manager = lifecycle.TaskManager(name="repeat-test")

    async def report() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first report fails")
        if calls == 3:
            manager.shutdown()  # the manager cancels its executes soon after, not within this call

    manager.add_execute_task("reporter", Repeat(report, interval=0.001))
    with anyio.fail_after(10):
        await manager.run()  # a failing call does not stop the manager: no TaskManagerError
    assert calls >= 3
    assert any(r.name == "lifecycle.tasks" and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_interval_must_be_a_finite_number_greater_than_zero(interval: object, error: type[Exception]) -> None:
    async def fn() -> None: ...

    with pytest.raises(error, match=r"Repeat interval must be a .*number of seconds greater than zero"):
        Repeat(fn, interval=interval)  # type: ignore[arg-type]


def test_interval_may_be_a_timedelta_and_name_must_be_a_non_empty_string() -> None:
    async def fn() -> None: ...

    assert Repeat(fn, interval=timedelta(minutes=1)).interval == 60.0
    with pytest.raises(ValueError, match="Repeat name must be a non-empty string"):
        Repeat(fn, interval=1, name="")
    with pytest.raises(TypeError, match="Repeat name must be a non-empty string"):
        Repeat(fn, interval=1, name=5)  # type: ignore[arg-type]


def test_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="zero-argument async function"):
        Repeat("not callable", interval=1.0)  # type: ignore[arg-type]


def test_is_an_execute_task_with_a_readable_repr() -> None:
    async def heartbeat() -> None: ...

    repeat = Repeat(heartbeat, interval=2.5)
    assert isinstance(repeat, lifecycle.ExecuteTask)
    assert repeat.interval == 2.5
    assert "heartbeat" in repr(repeat)
    assert "2.5s" in repr(repeat)


class Syncer:
    """A whole Task: connects in initialize, syncs in execute (one pass), disconnects in cleanup."""

    def __init__(self, log: list[str], *, fail_on: tuple[int, ...] = ()) -> None:
        self.log = log
        self.fail_on = fail_on
        self.passes = 0

    async def initialize(self) -> None:
        self.log.append("initialize")

    async def execute(self) -> None:
        self.passes += 1
        self.log.append(f"execute {self.passes}")
        if self.passes in self.fail_on:
            raise ConnectionError(f"pass {self.passes} failed")

    async def cleanup(self) -> None:
        self.log.append("cleanup")


async def run_passes(repeat: Repeat, syncer: Syncer, passes: int) -> lifecycle.TaskManager:
    """Run ``repeat`` as a Task of a manager until ``syncer`` has made ``passes`` passes, then shut down."""
    manager = lifecycle.TaskManager(name="repeat-task")
    manager.add_task("sync", repeat)

    async def stop_after_passes() -> None:
        while syncer.passes < passes:
            await anyio.lowlevel.checkpoint()
        manager.shutdown()

    manager.add_execute_task("stopper", stop_after_passes, lifecycle.TaskType.ERROR)
    with anyio.fail_after(10):
        await manager.run()
    return manager


async def test_a_whole_task_is_initialized_and_cleaned_up_once_and_only_its_execute_repeats() -> None:
    time = FakeTime()
    log: list[str] = []
    syncer = Syncer(log)
    repeat = Repeat(syncer, interval=60, clock=time.clock, sleep=time.sleep)
    assert isinstance(repeat, lifecycle.Task)
    await run_passes(repeat, syncer, 3)
    assert log[:4] == ["initialize", "execute 1", "execute 2", "execute 3"]
    assert log[-1] == "cleanup"
    assert log.count("initialize") == log.count("cleanup") == 1
    assert time.sleeps[:2] == [60.0, 60.0], "the wrapped execute keeps Repeat's schedule"
    assert repr(repeat).startswith("<Repeat Syncer every 60s")


async def test_a_failing_execute_of_a_wrapped_task_is_logged_and_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = FakeTime()
    log: list[str] = []
    syncer = Syncer(log, fail_on=(1, 2))
    repeat = Repeat(syncer, interval=1, clock=time.clock, sleep=time.sleep, name="inventory-sync")
    await run_passes(repeat, syncer, 3)  # no TaskManagerError: the failures stay with their pass
    assert repeat.failures == 2
    assert log.count("initialize") == log.count("cleanup") == 1
    failures = [r for r in caplog.records if r.name == "lifecycle.tasks" and r.levelno == logging.ERROR]
    assert ["inventory-sync" in r.getMessage() for r in failures] == [True, True]


async def test_a_wrapped_task_added_as_an_execute_task_says_to_use_add_task() -> None:
    manager = lifecycle.TaskManager(name="repeat-task")
    manager.add_execute_task("sync", Repeat(Syncer([]), interval=1))
    with anyio.fail_after(10), pytest.raises(lifecycle.TaskManagerError) as caught:
        await manager.run()
    [error] = task_errors(caught.value)
    assert isinstance(error.__cause__, RuntimeError)
    assert "add it with manager.add_task()" in str(error.__cause__)


async def test_the_cleanup_of_a_wrapped_task_runs_only_after_its_initialize_completed() -> None:
    log: list[str] = []

    class Unreachable(Syncer):
        async def initialize(self) -> None:
            log.append("initialize")
            raise ConnectionError("database down")

    repeat = Repeat(Unreachable(log), interval=1)
    with pytest.raises(ConnectionError):
        await repeat.initialize()
    await repeat.cleanup()
    assert log == ["initialize"]


async def test_an_execute_task_has_its_execute_repeated() -> None:
    time = FakeTime()
    with anyio.fail_after(10), anyio.CancelScope() as scope:

        class Beat:
            beats = 0

            async def execute(self) -> None:
                self.beats += 1
                if self.beats == 3:
                    scope.cancel()

        beat = Beat()
        repeat = Repeat(beat, interval=5, clock=time.clock, sleep=time.sleep)
        await repeat.initialize()  # nothing to initialize around an ExecuteTask
        await repeat.execute()
    await repeat.cleanup()
    assert (beat.beats, repeat.calls) == (3, 3)
    assert time.sleeps[:2] == [5.0, 5.0]
