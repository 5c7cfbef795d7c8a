"""Engine conformance rules about when and where tasks run: delays, queues, ids, concurrency, shutdown."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import anyio
import pytest

from ..._errors import DuplicateTaskError
from ..._model import Call, TaskContext
from ..._records import TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["FlowRules"]


class FlowRules(EngineSuiteBase):
    """Deferred tasks, strict and weighted queues, idempotent ids, the concurrency limit, graceful drain."""

    async def test_a_delayed_task_waits_for_its_time(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=1)
        ran: list[str] = []

        @tasks.register(name="suite.record")
        async def record(key: str) -> None:
            ran.append(key)

        start = engine.clock()
        delayed = await tasks.enqueue(record, "delayed", delay=60)
        at = await tasks.enqueue(record, "at", at=datetime.fromtimestamp(start + 90, timezone.utc))
        await engine.start(tasks)
        await engine.finished(tasks, await tasks.enqueue(record, "marker"), TaskState.SUCCEEDED)
        assert ran == ["marker"], "tasks not due yet must not run"
        info = await tasks.info(delayed)
        assert info is not None
        assert (info.state, info.run_at) == (TaskState.PENDING, start + 60)
        at_info = await tasks.info(at)
        assert at_info is not None
        assert at_info.run_at == pytest.approx(start + 90, abs=1e-6)
        engine.clock.advance(60)
        await engine.finished(tasks, delayed, TaskState.SUCCEEDED)
        assert ran == ["marker", "delayed"]
        engine.clock.advance(31)  # a datetime holds microseconds: its instant may round up a little
        await engine.finished(tasks, at, TaskState.SUCCEEDED)

    async def test_strict_queues_run_earlier_queues_first(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=1, queues=["high", "low"])
        order: list[str] = []

        @tasks.register(name="suite.ordered")
        async def ordered(key: str) -> None:
            order.append(key)

        ids = await tasks.enqueue_many(
            [Call(ordered, f"low{n}", queue="low") for n in range(3)]
            + [Call(ordered, f"high{n}", queue="high") for n in range(3)]
        )
        await engine.start(tasks)
        for task_id in ids:
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]

    async def test_weighted_queues_serve_every_queue(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=1, queues={"a": 1, "b": 1}, rng=random.Random(7))
        order: list[str] = []

        @tasks.register(name="suite.weighted")
        async def weighted(queue: str) -> None:
            order.append(queue)

        calls = [Call(weighted, queue, queue=queue) for queue in ("a", "b") for _ in range(10)]
        ids = await tasks.enqueue_many(calls)
        await engine.start(tasks)
        for task_id in ids:
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert sorted(order) == ["a"] * 10 + ["b"] * 10
        assert set(order[:10]) == {"a", "b"}, f"a weighted worker must not drain one queue first: {order}"

    async def test_a_worker_ignores_queues_it_does_not_serve(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(queues=["mine"])

        @tasks.register(name="suite.where", queue="mine")
        async def where(ctx: TaskContext) -> str:
            return ctx.queue

        other = await tasks.enqueue(where, queue="other")
        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(where), TaskState.SUCCEEDED)
        assert info.result == "mine"
        other_info = await tasks.info(other)
        assert other_info is not None
        assert other_info.state is TaskState.PENDING

    async def test_a_task_id_makes_enqueue_idempotent_until_the_task_finished(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.once")
        async def once(value: int) -> int:
            return value

        assert await tasks.enqueue(once, 1, task_id="order-17") == "order-17"
        with pytest.raises(DuplicateTaskError) as raised:
            await tasks.enqueue(once, 2, task_id="order-17")
        assert raised.value.task_id == "order-17"
        await engine.start(tasks)
        info = await engine.finished(tasks, "order-17", TaskState.SUCCEEDED)
        assert info.result == 1, "the duplicate enqueue must not have replaced the task"
        assert await tasks.enqueue(once, 3, task_id="order-17") == "order-17", "a finished id may be reused"
        info = await engine.finished(tasks, "order-17", TaskState.SUCCEEDED)
        assert info.result == 3

    async def test_a_duplicate_in_enqueue_many_stores_nothing(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.batch")
        async def batch(value: int) -> None: ...

        await tasks.enqueue(batch, 0, task_id="taken", delay=3600)
        with pytest.raises(DuplicateTaskError):
            await tasks.enqueue_many([Call(batch, 1, task_id="fresh"), Call(batch, 2, task_id="taken")])
        assert await tasks.info("fresh") is None

    async def test_the_concurrency_limit_is_respected(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=3)
        release = anyio.Event()
        running = 0
        most = 0
        three_started = anyio.Event()

        @tasks.register(name="suite.blocking")
        async def blocking() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            if running == 3:
                three_started.set()
            try:
                await release.wait()
            finally:
                running -= 1

        ids = await tasks.enqueue_many([Call(blocking) for _ in range(8)])
        await engine.start(tasks)
        with anyio.fail_after(WAIT):
            await three_started.wait()
        stats = await tasks.stats()
        assert stats["default"].active == 3, "a worker must claim no more tasks than it has free slots"
        assert stats["default"].pending == 5
        release.set()
        for task_id in ids:
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert most == 3

    async def test_same_process_enqueue_starts_at_once(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(poll_interval=3600)
        done = anyio.Event()

        @tasks.register(name="suite.quick")
        async def quick() -> None:
            done.set()

        await engine.start(tasks)
        await tasks.enqueue(quick)
        with anyio.fail_after(WAIT):
            await done.wait()

    async def test_graceful_shutdown_lets_running_tasks_finish_within_the_grace(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(shutdown_grace=WAIT)
        started = anyio.Event()
        release = anyio.Event()

        @tasks.register(name="suite.finishing")
        async def finishing() -> str:
            started.set()
            await release.wait()
            return "finished during the drain"

        worker = await engine.start(tasks)
        task_id = await tasks.enqueue(finishing)
        with anyio.fail_after(WAIT):
            await started.wait()
        worker.request_stop()
        await worker.stopping()
        assert not worker.finished, "execute must wait for the running task"
        release.set()
        await worker.stop()
        info = await tasks.info(task_id)
        assert info is not None
        assert (info.state, info.result, info.attempts) == (
            TaskState.SUCCEEDED,
            "finished during the drain",
            1,
        )

    async def test_graceful_shutdown_returns_unfinished_tasks_to_pending_without_an_attempt(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(shutdown_grace=0.1)
        started = anyio.Event()
        cancelled = anyio.Event()

        @tasks.register(name="suite.endless")
        async def endless() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        worker = await engine.start(tasks)
        task_id = await tasks.enqueue(endless)
        delayed = await tasks.enqueue(endless, delay=3600)
        with anyio.fail_after(WAIT):
            await started.wait()
        await worker.stop()
        assert cancelled.is_set()
        info = await tasks.info(task_id)
        assert info is not None
        assert (info.state, info.attempts, info.last_error) == (TaskState.PENDING, 0, None)
        assert info.run_at <= engine.clock()
        delayed_info = await tasks.info(delayed)
        assert delayed_info is not None
        assert delayed_info.state is TaskState.PENDING
        stats = await tasks.stats()
        assert stats["default"].active == 0, "nothing may stay active after a graceful shutdown"

    async def test_a_second_worker_takes_over_what_the_first_returned(self, engine: EngineHarness) -> None:
        first = await engine.tasks(shutdown_grace=0)
        second = await engine.tasks()
        runs: list[int] = []
        started = anyio.Event()

        @first.register(name="suite.handover")
        async def interrupted(ctx: TaskContext) -> int:
            runs.append(ctx.attempt)
            started.set()
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        @second.register(name="suite.handover")
        async def handover(ctx: TaskContext) -> int:
            runs.append(ctx.attempt)
            return ctx.attempt

        worker = await engine.start(first)
        task_id = await first.enqueue("suite.handover")
        with anyio.fail_after(WAIT):
            await started.wait()
        await worker.stop()
        await engine.start(second)
        info = await engine.finished(second, task_id, TaskState.SUCCEEDED)
        assert info.result == 1, "the interrupted attempt was refunded"
        assert runs == [1, 1]
