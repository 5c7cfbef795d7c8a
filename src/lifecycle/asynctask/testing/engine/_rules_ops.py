"""Engine conformance rules about operations and upkeep: inspect, cancel, requeue, purge, recovery and
retention."""

from __future__ import annotations

import functools

import anyio

from ..._model import Call, TaskContext
from ..._records import TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["OperationRules"]


class OperationRules(EngineSuiteBase):
    """What operators and the engine's upkeep loops do to stored tasks."""

    async def test_info_list_and_stats_describe_the_stored_tasks(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(queues=["q1", "q2"])

        @tasks.register(name="suite.ok")
        async def ok(value: int) -> int:
            return value * 2

        @tasks.register(name="suite.bad", max_retries=0)
        async def bad() -> None:
            raise ValueError("bad")

        done = await tasks.enqueue(ok, 21, queue="q1")
        engine.clock.advance(1)
        dead = await tasks.enqueue(bad, queue="q2")
        engine.clock.advance(1)
        waiting = await tasks.enqueue(ok, 1, queue="q2", delay=3600)
        await engine.start(tasks)
        await engine.finished(tasks, done, TaskState.SUCCEEDED)
        await engine.finished(tasks, dead, TaskState.DEAD)
        assert await tasks.info("no-such-task") is None
        listed = await tasks.list()
        assert [info.id for info in listed] == [waiting, dead, done], "newest first"
        assert [info.id for info in await tasks.list(state=TaskState.DEAD)] == [dead]
        assert [info.id for info in await tasks.list(state="succeeded")] == [done]
        assert [info.id for info in await tasks.list(queue="q2")] == [waiting, dead]
        assert [info.id for info in await tasks.list(state=["pending", "dead"], queue="q2", limit=1)] == [
            waiting
        ]
        assert listed[2].result == 42
        stats = await tasks.stats()
        assert (stats["q1"].succeeded, stats["q1"].total) == (1, 1)
        assert (stats["q2"].dead, stats["q2"].pending, stats["q2"].total) == (1, 1, 2)
        assert stats["q2"][TaskState.DEAD] == 1

    async def test_cancel_stops_a_pending_task_from_running(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=1)
        ran: list[str] = []

        @tasks.register(name="suite.cancellable")
        async def cancellable(key: str) -> None:
            ran.append(key)

        task_id = await tasks.enqueue(cancellable, "cancelled", delay=10)
        assert await tasks.cancel(task_id) is True
        assert await tasks.cancel(task_id) is False, "only a pending task can be cancelled"
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.CANCELLED
        engine.clock.advance(20)
        await engine.start(tasks)
        marker = await tasks.enqueue(cancellable, "marker")
        await engine.finished(tasks, marker, TaskState.SUCCEEDED)
        assert ran == ["marker"]
        assert await tasks.cancel(marker) is False, "a finished task cannot be cancelled"
        assert await tasks.cancel("no-such-task") is False

    async def test_requeue_runs_a_dead_task_again_with_attempts_reset(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        healthy = False

        @tasks.register(name="suite.flaky", max_retries=0)
        async def flaky(ctx: TaskContext) -> int:
            if not healthy:
                raise ConnectionError("service down")
            return ctx.attempt

        await engine.start(tasks)
        task_id = await tasks.enqueue(flaky)
        await engine.finished(tasks, task_id, TaskState.DEAD)
        healthy = True
        assert await tasks.requeue(task_id) is True
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert (info.result, info.attempts) == (1, 1), "requeue resets attempts"
        assert await tasks.requeue(task_id) is False, "only dead or cancelled tasks are requeued"

    async def test_requeue_dead_moves_every_dead_task_of_a_queue(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(queues=["a", "b"])
        healthy = False

        @tasks.register(name="suite.fragile", max_retries=0)
        async def fragile() -> str:
            if not healthy:
                raise ConnectionError("down")
            return "ok"

        await engine.start(tasks)
        ids = await tasks.enqueue_many([Call(fragile, queue=q) for q in ("a", "a", "b")])
        for task_id in ids:
            await engine.finished(tasks, task_id, TaskState.DEAD)
        healthy = True
        assert await tasks.requeue_dead(queue="a") == 2
        for task_id in ids[:2]:
            await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        info = await tasks.info(ids[2])
        assert info is not None
        assert info.state is TaskState.DEAD
        assert await tasks.requeue_dead() == 1
        await engine.finished(tasks, ids[2], TaskState.SUCCEEDED)

    async def test_purge_deletes_by_state_queue_and_age(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(queues=["a", "b"])

        @tasks.register(name="suite.purged")
        async def purged() -> None: ...

        await engine.start(tasks)
        old_a = await tasks.enqueue(purged, queue="a")
        await engine.finished(tasks, old_a, TaskState.SUCCEEDED)
        engine.clock.advance(100)
        new_a, new_b = await tasks.enqueue_many([Call(purged, queue="a"), Call(purged, queue="b")])
        await engine.finished(tasks, new_a, TaskState.SUCCEEDED)
        await engine.finished(tasks, new_b, TaskState.SUCCEEDED)
        assert await tasks.purge(TaskState.SUCCEEDED, older_than=50) == 1
        assert await tasks.info(old_a) is None
        assert await tasks.purge("succeeded", queue="b") == 1
        assert await tasks.info(new_b) is None
        assert await tasks.info(new_a) is not None

    async def test_tasks_of_a_dead_worker_are_recovered_and_their_attempt_counts(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(lease=5.0)
        runs: list[int] = []

        @tasks.register(name="suite.survivor")
        async def survivor(ctx: TaskContext) -> int:
            runs.append(ctx.attempt)
            return ctx.attempt

        @tasks.register(name="suite.crasher", max_retries=0)
        async def crasher() -> None: ...

        retried = await tasks.enqueue(survivor)
        engine.clock.advance(1)
        exhausted = await tasks.enqueue(crasher)
        now = engine.clock()
        # A worker that claims both and dies: nothing settles them and no heartbeat renews the leases.
        claimed = await tasks.backend.claim(["default"], 2, now=now, lease_until=now + 5.0)
        assert sorted(c.record.id for c in claimed) == sorted([retried, exhausted])
        assert await tasks.recover_expired() == 0, "leases that have not expired are left alone"
        engine.clock.advance(6)
        assert await tasks.recover_expired() == 2
        info = await tasks.info(retried)
        assert info is not None
        assert (info.state, info.attempts) == (TaskState.PENDING, 1)
        assert info.last_error is not None
        assert "worker lost" in info.last_error
        dead = await tasks.info(exhausted)
        assert dead is not None
        assert dead.state is TaskState.DEAD, "a crash counts as an attempt"
        await engine.start(tasks)
        info = await engine.finished(tasks, retried, TaskState.SUCCEEDED)
        assert (info.result, runs) == (2, [2])

    async def test_recovery_runs_on_a_timer_in_an_idle_worker(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(lease=5.0, recovery_interval=0.05)

        @tasks.register(name="suite.recovered")
        async def recovered(ctx: TaskContext) -> int:
            return ctx.attempt

        task_id = await tasks.enqueue(recovered)
        now = engine.clock()
        assert len(await tasks.backend.claim(["default"], 1, now=now, lease_until=now + 5.0)) == 1
        await engine.start(tasks)
        engine.clock.advance(6)
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert info.result == 2

    async def test_heartbeats_keep_a_long_task_from_being_run_twice(self, engine: EngineHarness) -> None:
        # Heartbeats come every lease / 3 seconds of real time and extend the lease by the engine's clock,
        # which the test moves: the task runs 2.5 leases long by that clock, each step short of the lease,
        # and the recovery loop (every 0.05 s) would take the task over at the first lease not renewed.
        lease = 0.6
        tasks = await engine.tasks(lease=lease, recovery_interval=0.05)
        runs: list[int] = []
        started, release = anyio.Event(), anyio.Event()

        @tasks.register(name="suite.long")
        async def long(ctx: TaskContext) -> int:
            runs.append(ctx.attempt)
            started.set()
            await release.wait()
            return ctx.attempt

        async def lease_reaches_past(moment: float) -> bool:
            record = await tasks.backend.get(task_id)
            assert record is not None, f"task {task_id} vanished while it ran"
            return record.lease_until is not None and record.lease_until > moment

        await engine.start(tasks)
        task_id = await tasks.enqueue(long)
        with anyio.fail_after(WAIT):
            await started.wait()
        for step in range(3):
            engine.clock.advance(lease * 5 / 6)
            moment = engine.clock() + lease / 2  # only a renewal after this advance reaches past it
            await engine.eventually(
                functools.partial(lease_reaches_past, moment),
                f"a heartbeat renewing the running task's lease (step {step})",
            )
        assert await tasks.recover_expired() == 0, "no lease expired by the engine's clock"
        release.set()
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert (info.result, info.attempts, runs) == (1, 1, [1])

    async def test_retention_removes_finished_tasks_after_their_time(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(retention={"succeeded": 60, "cancelled": None})

        @tasks.register(name="suite.kept")
        async def kept(fail: bool) -> None:
            if fail:
                raise ValueError("dead on purpose")

        await engine.start(tasks)
        succeeded = await tasks.enqueue(kept, False)
        dead = await tasks.enqueue(kept, True, max_retries=0)
        cancelled = await tasks.enqueue(kept, False, delay=10)
        assert await tasks.cancel(cancelled)
        await engine.finished(tasks, succeeded, TaskState.SUCCEEDED)
        await engine.finished(tasks, dead, TaskState.DEAD)
        assert await tasks.purge_expired() == 0
        engine.clock.advance(61)
        assert await tasks.purge_expired() == 1
        assert await tasks.info(succeeded) is None
        engine.clock.advance(7 * 86_400)
        assert await tasks.purge_expired() == 1, "dead tasks are kept 7 days by default"
        assert await tasks.info(dead) is None
        assert await tasks.info(cancelled) is not None, "retention None keeps a state forever"
