"""Timer: returns after its seconds, bounds a service as STOP_GROUP, is cancelled by shutdown."""

from __future__ import annotations

import math

import anyio
import pytest

import lifecycle
from lifecycle.tasks import Timer


async def test_returns_after_its_seconds_and_not_before() -> None:
    timer = Timer(0.02)
    with anyio.fail_after(5):
        started = anyio.current_time()
        await timer.execute()
        elapsed = anyio.current_time() - started
    assert elapsed >= 0.02 - 0.002  # a lower bound only: sleeping never ends early (clock resolution aside)


async def test_zero_seconds_returns_at_once_and_each_execute_waits_again() -> None:
    timer = Timer(0)
    with anyio.fail_after(5):
        await timer.execute()
        await timer.execute()


class Forever:
    """A full Task that runs until cancelled and records its stages."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def initialize(self) -> None:
        self.log.append("initialize")

    async def execute(self) -> None:
        self.log.append("execute")
        await anyio.sleep_forever()

    async def cleanup(self) -> None:
        self.log.append("cleanup")


async def test_as_stop_group_it_stops_the_manager_cleanly() -> None:
    log: list[str] = []
    manager = lifecycle.TaskManager(name="timer-test")
    manager.add_task("service", Forever(log))
    manager.add_execute_task("deadline", Timer(0.01), lifecycle.TaskType.STOP_GROUP)
    with anyio.fail_after(10):
        await manager.run()
    assert log == ["initialize", "execute", "cleanup"]
    assert manager.state is lifecycle.ManagerState.STOPPED


async def test_a_long_timer_is_cancelled_by_shutdown() -> None:
    manager = lifecycle.TaskManager(name="timer-test")
    manager.add_execute_task("hour", Timer(3600), lifecycle.TaskType.STOP_GROUP)

    async def stop_soon() -> None:
        manager.shutdown()

    manager.add_execute_task("stopper", stop_soon, lifecycle.TaskType.ERROR)
    with anyio.fail_after(10):
        await manager.run()
    hour = next(row for row in manager.status() if row.name == "hour")
    assert (hour.state, hour.error) == ("cancelled", None)


async def test_as_strict_it_is_a_deadline_that_fails_the_service() -> None:
    manager = lifecycle.TaskManager(name="timer-test")
    manager.add_execute_task("deadline", Timer(0))
    with anyio.fail_after(10), pytest.raises(lifecycle.TaskManagerError) as caught:
        await manager.run()
    (error,) = caught.value.errors
    assert error.task_name == "deadline"
    assert isinstance(error.__cause__, lifecycle.UnexpectedStopError)


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (-0.1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("5", TypeError),
        (None, TypeError),
        (False, TypeError),
    ],
)
def test_seconds_must_be_a_finite_number_zero_or_more(seconds: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"Timer seconds must be a .*number of seconds zero or more"):
        Timer(seconds)  # type: ignore[arg-type]


def test_is_an_execute_task() -> None:
    timer = Timer(1.5)
    assert isinstance(timer, lifecycle.ExecuteTask)
    assert timer.seconds == 1.5
    assert repr(timer) == "Timer(1.5)"
