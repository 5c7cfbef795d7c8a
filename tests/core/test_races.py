"""goasync's race cases: add_execute_task racing run() and shutdown(), from tasks and from other threads.

The invariant: every add_execute_task call either returns a handle (and then its execute runs and has ended
by the time run() returns: nothing is lost or left behind) or raises RuntimeError because shutdown began.
"""

from __future__ import annotations

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

from lifecycle import ExecuteHandle, ManagerState, TaskManager, TaskType
from tests.core.lifecycle_testkit import Outcome, run_capturing

# Explicit, so the anyio plugin combines its backend parameter with each test's own parameters.
pytestmark = pytest.mark.anyio


class Ledger:
    """Which execute tasks were accepted, refused, started and ended."""

    def __init__(self) -> None:
        self.accepted: list[ExecuteHandle] = []
        self.refused: list[str] = []
        self.started: set[str] = set()
        self.ended: set[str] = set()

    def work(self, name: str, forever: bool) -> object:
        async def execute() -> None:
            self.started.add(name)
            try:
                if forever:
                    await anyio.sleep_forever()
                await anyio.lowlevel.checkpoint()
            finally:
                self.ended.add(name)

        return execute

    def add(self, manager: TaskManager, name: str, forever: bool) -> None:
        try:
            handle = manager.add_execute_task(name, self.work(name, forever), TaskType.ERROR)  # type: ignore[arg-type]
        except RuntimeError:
            self.refused.append(name)
        else:
            self.accepted.append(handle)

    def check(self, attempts: int) -> None:
        accepted = {h.name for h in self.accepted}
        assert len(accepted) + len(self.refused) == attempts
        assert self.started == accepted, "an accepted execute task never started"
        assert self.ended == accepted, "an accepted execute task had not ended when run() returned"
        assert all(h.done for h in self.accepted)


async def test_adders_racing_run_and_shutdown_from_several_tasks() -> None:
    m = TaskManager()
    ledger = Ledger()
    per_adder, adders = 60, 4
    outcome = Outcome()

    async def adder(index: int) -> None:
        for n in range(per_adder):
            ledger.add(m, f"w{index}-{n}", forever=n % 2 == 0)
            await anyio.lowlevel.checkpoint()

    async def stopper() -> None:
        # Shut down from inside the race, after a few rounds of adding.
        for _ in range(per_adder // 3):
            await anyio.lowlevel.checkpoint()
        m.shutdown()

    async with anyio.create_task_group() as tg:
        for index in range(adders):
            tg.start_soon(adder, index)  # some adds land before run(), some during, some after shutdown
        tg.start_soon(run_capturing, m, outcome)
        tg.start_soon(stopper)
    assert await outcome.finished() is None
    assert m.state is ManagerState.STOPPED
    ledger.check(per_adder * adders)
    assert ledger.refused, "the race should have seen the shutdown"
    assert ledger.accepted, "the race should have accepted work"


async def test_adders_racing_a_failure_that_stops_the_manager() -> None:
    m = TaskManager()
    ledger = Ledger()
    outcome = Outcome()

    async def failing() -> None:
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        raise ValueError("stop everything")

    m.add_execute_task("failing", failing)

    async def adder(index: int) -> None:
        for n in range(50):
            ledger.add(m, f"w{index}-{n}", forever=True)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        for index in range(3):
            tg.start_soon(adder, index)
    error = await outcome.finished()
    assert error is not None
    ledger.check(150)


async def test_adders_in_worker_threads_through_from_thread() -> None:
    m = TaskManager()
    ledger = Ledger()
    outcome = Outcome()
    running = anyio.Event()
    per_thread = 40

    def adder_thread(index: int) -> None:
        anyio.from_thread.run(running.wait)
        for n in range(per_thread):
            anyio.from_thread.run_sync(ledger.add, m, f"t{index}-{n}", n % 3 == 0)
            if index == 0 and n == per_thread // 2:
                anyio.from_thread.run_sync(m.shutdown)

    m.add_execute_task("marker", _set_and_wait(running), TaskType.ERROR)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        for index in range(3):
            tg.start_soon(anyio.to_thread.run_sync, adder_thread, index)
    assert await outcome.finished() is None
    ledger.check(3 * per_thread)
    assert ledger.refused
    assert ledger.accepted


def _set_and_wait(event: anyio.Event) -> object:
    async def marker() -> None:
        event.set()
        await anyio.sleep_forever()

    return marker


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_portal_drives_a_manager_from_synchronous_code(backend: str) -> None:
    ledger = Ledger()
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        m = portal.call(TaskManager)
        future = portal.start_task_soon(m.run)
        for n in range(20):
            portal.call(ledger.add, m, f"p{n}", n % 2 == 0)
        assert portal.call(lambda: m.state) is not ManagerState.STOPPED
        portal.call(m.shutdown)
        for n in range(20, 25):
            portal.call(ledger.add, m, f"p{n}", True)
        assert future.result(timeout=10) is None
    ledger.check(25)
    assert len(ledger.refused) == 5
