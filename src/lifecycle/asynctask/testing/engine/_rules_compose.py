"""Engine conformance rules about tasks that make tasks: chains (each step enqueued with the previous step's
success) and schedules (each fire time enqueued once, however many schedulers share the storage)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ..._async_tasks import AsyncTasks
from ..._model import Abort, Call, TaskContext
from ..._records import TaskState
from ..._schedule import fire_task_id
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["ComposeRules"]

INTERVAL = 10.0
"""The interval of the suite's schedules (seconds of the manual clock)."""


async def _scheduling(*all_tasks: AsyncTasks) -> None:
    """Wait until every schedule of every ``AsyncTasks`` waits for its next fire time (so moving the clock
    then reaches it)."""
    with anyio.fail_after(WAIT):
        for tasks in all_tasks:
            for info in tasks.schedules():
                await tasks._scheduler.wait_for(info.name, lambda schedule: schedule.next_fire is not None)


async def _handled(all_tasks: list[AsyncTasks], name: str, fire: float) -> None:
    """Wait until the scheduler of every ``AsyncTasks`` has handled the fire time ``fire`` of ``name``."""
    with anyio.fail_after(WAIT):
        for tasks in all_tasks:
            await tasks._scheduler.wait_handled(name, fire)


class ComposeRules(EngineSuiteBase):
    """Chains pass results on and stop at a dead step; schedules fire once per fire time, whatever fails."""

    async def test_a_chain_passes_each_result_to_the_next_step(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        seen: list[tuple[str, object]] = []

        @tasks.register(name="suite.chain.fetch")
        async def fetch(ctx: TaskContext, url: str) -> dict[str, object]:
            seen.append(("fetch", ctx.previous_result))
            return {"url": url, "size": 3}

        @tasks.register(name="suite.chain.parse")
        async def parse(ctx: TaskContext) -> list[int]:
            seen.append(("parse", ctx.previous_result))
            return [1, 2, ctx.previous_result["size"]]

        @tasks.register(name="suite.chain.store")
        async def store(ctx: TaskContext, table: str) -> str:
            seen.append(("store", (ctx.previous_result, ctx.chain_id)))
            return f"{table}:{sum(ctx.previous_result)}"

        chain_id = await tasks.enqueue_chain(
            [Call(fetch, "https://example.org"), Call(parse), Call(store, "t")]
        )
        waiting = await tasks.info(chain_id)
        assert waiting is not None
        assert waiting.chain is not None
        assert (waiting.id, waiting.state, waiting.chain.current) == (f"{chain_id}.0", TaskState.PENDING, 0)
        assert [step.state for step in waiting.chain.steps] == [TaskState.PENDING, None, None]
        await engine.start(tasks)
        info = await engine.finished(tasks, chain_id, TaskState.SUCCEEDED)
        assert seen == [
            ("fetch", None),
            ("parse", {"url": "https://example.org", "size": 3}),
            ("store", ([1, 2, 3], chain_id)),
        ]
        assert (info.id, info.result, info.chain_id, info.chain_step) == (f"{chain_id}.2", "t:6", chain_id, 2)
        chain = info.chain
        assert chain is not None
        assert (chain.id, chain.state, chain.current, chain.result, chain.stopped_at) == (
            chain_id,
            TaskState.SUCCEEDED,
            2,
            "t:6",
            None,
        )
        assert [(step.name, step.task_id, step.state) for step in chain.steps] == [
            ("suite.chain.fetch", f"{chain_id}.0", TaskState.SUCCEEDED),
            ("suite.chain.parse", f"{chain_id}.1", TaskState.SUCCEEDED),
            ("suite.chain.store", f"{chain_id}.2", TaskState.SUCCEEDED),
        ]

    async def test_a_dead_step_stops_the_chain_and_says_where(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        ran: list[str] = []

        @tasks.register(name="suite.chain.first")
        async def first() -> int:
            ran.append("first")
            return 1

        @tasks.register(name="suite.chain.broken", max_retries=0)
        async def broken(ctx: TaskContext) -> int:
            ran.append("broken")
            raise Abort(f"cannot use {ctx.previous_result}")

        @tasks.register(name="suite.chain.never")
        async def never(ctx: TaskContext) -> None:
            ran.append("never")

        chain_id = await tasks.enqueue_chain([Call(first), Call(broken), Call(never)])
        await engine.start(tasks)
        info = await engine.finished(tasks, chain_id, TaskState.DEAD)
        assert info.id == f"{chain_id}.1"
        chain = info.chain
        assert chain is not None
        assert (chain.state, chain.current, chain.stopped_at, chain.result) == (TaskState.DEAD, 1, 1, None)
        assert [step.state for step in chain.steps] == [TaskState.SUCCEEDED, TaskState.DEAD, None]
        assert "cannot use 1" in (chain.steps[1].last_error or "")
        assert await tasks.info(f"{chain_id}.2") is None, "a step after a dead one must never be stored"
        assert ran == ["first", "broken"]

    async def test_two_schedulers_on_one_storage_enqueue_each_fire_time_once(
        self, engine: EngineHarness
    ) -> None:
        both = [await engine.tasks(), await engine.tasks()]
        runs: list[tuple[int, str]] = []

        def ticker(index: int) -> Callable[[TaskContext, str], Awaitable[str]]:
            async def tick(ctx: TaskContext, region: str) -> str:
                runs.append((index, ctx.task_id))
                return region

            return tick

        for index, tasks in enumerate(both):
            tasks.register(ticker(index), name="suite.schedule.tick")
            declared = tasks.every("suite.schedule.tick", INTERVAL, "eu", name="suite-tick")
            assert declared.kind == "every"
        for tasks in both:
            await engine.start(tasks)
        await _scheduling(*both)
        first_fire = both[0].schedules()[0].next_fire
        assert both[1].schedules()[0].next_fire == first_fire, "every process computes the same fire times"
        fires = [first_fire, first_fire + INTERVAL]
        for fire in fires:
            engine.clock.set(fire)
            await _handled(both, "suite-tick", fire)
        ids = [fire_task_id("suite-tick", fire) for fire in fires]
        for task_id in ids:
            info = await engine.finished(both[0], task_id, TaskState.SUCCEEDED)
            assert (info.name, info.schedule, info.result, info.attempts) == (
                "suite.schedule.tick",
                "suite-tick",
                "eu",
                1,
            )
        stored = await both[1].list(limit=100)
        assert sorted(info.id for info in stored) == sorted(ids), (
            "one task per fire time, not one per scheduler"
        )
        assert sorted(task_id for _, task_id in runs) == sorted(ids), "each fire time runs once"
        assert [tasks.schedules()[0].last_fire for tasks in both] == [fires[-1]] * 2
        assert [tasks.schedules()[0].next_fire for tasks in both] == [fires[-1] + INTERVAL] * 2

    async def test_a_failed_scheduled_run_does_not_end_the_schedule(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        runs: list[str] = []

        @tasks.register(name="suite.schedule.flaky", max_retries=0)
        async def flaky(ctx: TaskContext) -> str:
            runs.append(ctx.task_id)
            if len(runs) == 1:
                raise Abort("the report service is down")
            return "recovered"

        tasks.every(flaky, INTERVAL, name="suite-flaky")
        await engine.start(tasks)
        await _scheduling(tasks)
        fire = tasks.schedules()[0].next_fire
        engine.clock.set(fire)
        await _handled([tasks], "suite-flaky", fire)
        failed = await engine.finished(tasks, fire_task_id("suite-flaky", fire), TaskState.DEAD)
        assert "the report service is down" in (failed.last_error or "")
        assert tasks.schedules()[0].next_fire == fire + INTERVAL, "the schedule goes on after a dead run"
        engine.clock.set(fire + INTERVAL)
        await _handled([tasks], "suite-flaky", fire + INTERVAL)
        later = await engine.finished(
            tasks, fire_task_id("suite-flaky", fire + INTERVAL), TaskState.SUCCEEDED
        )
        assert later.result == "recovered"
        assert runs == [fire_task_id("suite-flaky", fire), fire_task_id("suite-flaky", fire + INTERVAL)]
