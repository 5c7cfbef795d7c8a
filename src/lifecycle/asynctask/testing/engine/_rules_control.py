"""Engine conformance rules for flow control through the public API: priorities, debounce, expiry, paused
queues, rate and concurrency limits, uniqueness windows, and what ``info``/``flow`` report about them.

Time is the harness's manual clock: a rate bucket refills, a debounce comes due and a task expires only when
a test advances it.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from ..._errors import DuplicateTaskError
from ..._model import Call, TaskInfo
from ..._records import TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["ControlRules"]


def _waiting(reason: str) -> Callable[[TaskInfo], bool]:
    """A predicate for :meth:`EngineHarness.until`: the task is pending and held back by ``reason``."""
    return lambda info: info.state is TaskState.PENDING and info.waiting_on == reason


class ControlRules(EngineSuiteBase):
    """Flow control end to end: what a worker starts, when, and what inspection says about the rest."""

    async def test_higher_priorities_run_first_and_equal_ones_in_enqueue_order(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(concurrency=1)
        order: list[str] = []

        @tasks.register(name="suite.ranked")
        async def ranked(key: str) -> None:
            order.append(key)

        @tasks.register(name="suite.urgent", priority=5)
        async def urgent(key: str) -> None:
            order.append(key)

        ids = await tasks.enqueue_many(
            [
                Call(ranked, "low", priority=-1),
                Call(ranked, "plain-1"),
                Call(urgent, "registered-5"),
                Call(ranked, "plain-2"),
                Call(ranked, "top", priority=9),
                Call(urgent, "overridden-0", priority=0),
            ]
        )
        info = await tasks.info(ids[4])
        assert info is not None
        assert info.priority == 9
        await engine.start(tasks)
        for task_id in ids:
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert order == ["top", "registered-5", "plain-1", "plain-2", "overridden-0", "low"]

    async def test_debounce_runs_once_after_the_last_enqueue_with_the_last_arguments(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        ran: list[str] = []

        @tasks.register(name="suite.debounced")
        async def debounced(value: str) -> None:
            ran.append(value)

        @tasks.register(name="suite.marker")
        async def marker() -> None: ...

        with pytest.raises(ValueError, match="task_id"):
            await tasks.enqueue(debounced, "x", debounce=5)
        start = engine.clock()
        assert await tasks.enqueue(debounced, "first", task_id="save", debounce=10) == "save"
        engine.clock.advance(6)
        assert await tasks.enqueue(debounced, "second", task_id="save", debounce=10) == "save"
        info = await tasks.info("save")
        assert info is not None
        assert info.state is TaskState.PENDING
        assert info.run_at == pytest.approx(start + 16), "the start is pushed back to 10 s after the last"
        await engine.start(tasks)
        engine.clock.advance(9)  # 15 s after the first enqueue: the first start time has passed
        await engine.finished(tasks, await tasks.enqueue(marker), TaskState.SUCCEEDED)
        assert ran == [], "each enqueue pushes the start back"
        engine.clock.advance(1)
        info = await engine.finished(tasks, "save", TaskState.SUCCEEDED)
        assert ran == ["second"], "one run, with the arguments of the last enqueue"
        assert info.attempts == 1

    async def test_a_debounce_while_the_task_runs_schedules_one_more_run(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        ran: list[str] = []
        started = anyio.Event()
        release = anyio.Event()

        @tasks.register(name="suite.rerun")
        async def rerun(value: str) -> None:
            ran.append(value)
            if value == "first":
                started.set()
                await release.wait()

        await engine.start(tasks)
        await tasks.enqueue(rerun, "first", task_id="sync", debounce=0)
        with anyio.fail_after(WAIT):
            await started.wait()
        await tasks.enqueue(rerun, "second", task_id="sync", debounce=0)
        await tasks.enqueue(rerun, "third", task_id="sync", debounce=0)
        info = await tasks.info("sync")
        assert info is not None
        assert info.state is TaskState.ACTIVE, "the running attempt goes on"
        release.set()
        await engine.until(tasks, "sync", lambda info: info.state is TaskState.SUCCEEDED and len(ran) == 2)
        assert ran == ["first", "third"], "one more run after the running one, with the latest arguments"
        info = await tasks.info("sync")
        assert info is not None
        assert info.attempts == 1, "the follow-up run counts its attempts afresh"

    async def test_a_task_not_started_before_it_expires_is_cancelled_without_running(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        ran: list[str] = []

        @tasks.register(name="suite.perishable")
        async def perishable(value: str) -> None:
            ran.append(value)

        with pytest.raises(ValueError, match="expires"):
            await tasks.enqueue(perishable, "never", delay=60, expires=30)
        stale = await tasks.enqueue(perishable, "stale", expires=30)
        fresh = await tasks.enqueue(perishable, "fresh", expires=300)
        info = await tasks.info(stale)
        assert info is not None
        assert info.expires_at == pytest.approx(engine.clock() + 30)
        engine.clock.advance(31)
        await engine.start(tasks)
        await engine.finished(tasks, fresh, TaskState.SUCCEEDED)
        info = await engine.finished(tasks, stale, TaskState.CANCELLED)
        assert (info.attempts, info.last_error) == (0, "expired before it started")
        assert ran == ["fresh"]

    async def test_a_paused_queue_runs_nothing_until_resumed_from_another_process(
        self, engine: EngineHarness
    ) -> None:
        worker_tasks = await engine.tasks(queues=["held", "free"])
        operator = await engine.tasks(execution=False)

        @worker_tasks.register(name="suite.pausable")
        async def pausable() -> str:
            return "ran"

        operator.register(pausable, name="suite.pausable")
        await operator.pause("held")
        assert await worker_tasks.paused() == {"held"}
        await engine.start(worker_tasks)
        held = await operator.enqueue(pausable, queue="held")
        await engine.finished(
            worker_tasks, await operator.enqueue(pausable, queue="free"), TaskState.SUCCEEDED
        )
        info = await engine.until(operator, held, _waiting("paused"))
        assert info.attempts == 0
        assert (await operator.flow()).paused == {"held"}
        await operator.resume("held")
        await engine.finished(worker_tasks, held, TaskState.SUCCEEDED)
        assert await operator.paused() == set()

    async def test_max_running_caps_the_tasks_of_a_name_running_at_once(self, engine: EngineHarness) -> None:
        first = await engine.tasks(concurrency=5)
        second = await engine.tasks(concurrency=5)
        release = anyio.Event()
        running = 0
        most = 0

        for tasks in (first, second):

            @tasks.register(name="suite.capped", max_running=2)
            async def capped() -> None:
                nonlocal running, most
                running += 1
                most = max(most, running)
                try:
                    await release.wait()
                finally:
                    running -= 1

        ids = await first.enqueue_many([Call("suite.capped") for _ in range(6)])
        await engine.start(first)
        await engine.start(second)
        await engine.eventually(lambda: _equals(running, 2), "2 tasks running")
        info = await engine.until(first, ids[-1], _waiting("max_running"))
        assert info.attempts == 0
        flow = (await first.flow()).tasks["suite.capped"]
        assert (flow.max_running, flow.running, flow.waiting) == (2, 2, {"max_running": 4})
        assert most == 2, "two workers with 5 free slots each still run 2 at once"
        release.set()
        for task_id in ids:
            await engine.finished(first, task_id, TaskState.SUCCEEDED)
        assert most == 2

    async def test_max_running_per_key_runs_one_task_per_key_and_different_keys_together(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(concurrency=10)
        release = anyio.Event()
        running: list[str] = []
        both = anyio.Event()

        @tasks.register(name="suite.per_key", max_running_per_key=1)
        async def per_key(account: str) -> None:
            running.append(account)
            if sorted(running) == ["a", "b"]:
                both.set()
            try:
                await release.wait()
            finally:
                running.remove(account)

        a1 = await tasks.enqueue(per_key, "a", concurrency_key="a")
        a2 = await tasks.enqueue(per_key, "a", concurrency_key="a")
        b1 = await tasks.enqueue(per_key, "b", concurrency_key="b")
        await engine.start(tasks)
        with anyio.fail_after(WAIT):
            await both.wait()
        info = await engine.until(tasks, a2, _waiting("max_running_per_key"))
        assert info.concurrency_key == "a"
        assert sorted(running) == ["a", "b"], "one task of key a at a time, b beside it"
        release.set()
        for task_id in (a1, a2, b1):
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)

    async def test_a_rate_limit_starts_a_burst_then_one_task_per_refilled_token(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started: list[int] = []

        @tasks.register(name="suite.rated", rate_limit="2/m")
        async def rated(n: int) -> None:
            started.append(n)

        ids = await tasks.enqueue_many([Call(rated, n) for n in range(4)])
        await engine.start(tasks)
        await engine.finished(tasks, ids[0], TaskState.SUCCEEDED)
        await engine.finished(tasks, ids[1], TaskState.SUCCEEDED)
        info = await engine.until(tasks, ids[2], _waiting("rate_limit"))
        assert info.attempts == 0
        flow = (await tasks.flow()).tasks["suite.rated"]
        assert flow.rate_limit == "2/m"
        assert flow.tokens == pytest.approx(0.0, abs=0.01)
        assert flow.waiting == {"rate_limit": 2}
        assert flow.refused is not None
        assert flow.refused >= 1
        engine.clock.advance(30)  # one token
        await engine.finished(tasks, ids[2], TaskState.SUCCEEDED)
        still = await tasks.info(ids[3])
        assert still is not None
        assert still.state is TaskState.PENDING
        engine.clock.advance(30)
        await engine.finished(tasks, ids[3], TaskState.SUCCEEDED)
        assert sorted(started) == [0, 1, 2, 3]

    async def test_unique_for_refuses_an_equal_task_within_the_window_even_after_it_finished(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.unique")
        async def unique(value: int) -> int:
            return value

        await engine.start(tasks)
        first = await tasks.enqueue(unique, 1, unique_for=60)
        await engine.finished(tasks, first, TaskState.SUCCEEDED)
        with pytest.raises(DuplicateTaskError, match="unique_for"):
            await tasks.enqueue(unique, 1, unique_for=60)
        other = await tasks.enqueue(unique, 2, unique_for=60)  # other arguments: another task
        await engine.finished(tasks, other, TaskState.SUCCEEDED)
        by_id = await tasks.enqueue(unique, 3, task_id="report", unique_for=60)
        await engine.finished(tasks, by_id, TaskState.SUCCEEDED)
        with pytest.raises(DuplicateTaskError):
            await tasks.enqueue(unique, 4, task_id="report", unique_for=60)
        engine.clock.advance(61)
        again = await tasks.enqueue(unique, 1, unique_for=60)
        await engine.finished(tasks, again, TaskState.SUCCEEDED)
        assert await tasks.enqueue(unique, 5, task_id="report") == "report"


async def _equals(value: int, expected: int) -> bool:
    return value == expected
