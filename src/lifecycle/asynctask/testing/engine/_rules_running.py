"""Engine conformance rules for control of running work through the public API: ``tasks.cancel()`` of a
running task (in this process or another, async or plain ``def``, or held by a worker that died), and
``ctx.progress()`` stored coalesced and shown by ``tasks.info()``.

Stored times come from the harness's manual clock; progress reports are coalesced by it too, so the rules move
it to let the next write happen. Only the worker's own polling (cancel requests, notices) uses real time.
"""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest

from ..._model import Call, TaskContext
from ..._records import TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["RunningWorkRules"]


class RunningWorkRules(EngineSuiteBase):
    """``tasks.cancel()`` stops a running task wherever it runs, and it ends ``cancelled`` with no retry;
    ``ctx.progress()`` is stored at most once a second per task and always last before the verdict."""

    async def test_cancel_stops_a_running_async_task_and_it_ends_cancelled_without_a_retry(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started = anyio.Event()
        cleaned_up: list[int] = []

        @tasks.register(name="suite.endless", max_retries=3)
        async def endless(ctx: TaskContext) -> None:
            try:
                started.set()
                await anyio.sleep_forever()
            finally:
                cleaned_up.append(ctx.attempt)

        @tasks.register(name="suite.marker")
        async def marker() -> None: ...

        await engine.start(tasks)
        task_id = await tasks.enqueue(endless)
        with anyio.fail_after(WAIT):
            await started.wait()
        assert await tasks.cancel(task_id) is True, "a running task can be cancelled"
        info = await engine.finished(tasks, task_id, TaskState.CANCELLED)
        assert cleaned_up == [1], "the task's scope was cancelled: its finally block ran"
        assert info.attempts == 1
        assert info.last_error is not None
        assert "cancel" in info.last_error
        await engine.finished(tasks, await tasks.enqueue(marker), TaskState.SUCCEEDED)
        again = await tasks.info(task_id)
        assert again is not None
        assert (again.state, again.attempts) == (TaskState.CANCELLED, 1), "a cancelled task is never retried"
        assert await tasks.cancel(task_id) is False, "a finished task cannot be cancelled"

    async def test_cancel_from_another_process_reaches_the_worker_that_runs_the_task(
        self, engine: EngineHarness
    ) -> None:
        worker = await engine.tasks()
        producer = await engine.tasks(execution=False)
        started = anyio.Event()

        @worker.register(name="suite.endless")
        async def endless() -> None:
            started.set()
            await anyio.sleep_forever()

        await engine.start(worker)
        task_id = await producer.enqueue("suite.endless")
        with anyio.fail_after(WAIT):
            await started.wait()
        assert await producer.cancel(task_id) is True
        info = await producer.info(task_id)
        assert info is not None
        assert info.state in (TaskState.ACTIVE, TaskState.CANCELLED), "asked to stop; its worker stops it"
        done = await producer.wait(task_id, timeout=WAIT)
        assert (done.state, done.attempts) == (TaskState.CANCELLED, 1)

    async def test_a_def_task_sees_cancel_requested_and_its_return_ends_cancelled(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started = threading.Event()
        seen: list[bool] = []

        @tasks.register(name="suite.blocking", max_retries=3)
        def blocking(ctx: TaskContext) -> str:
            seen.append(ctx.cancel_requested)
            started.set()
            pause = threading.Event()
            for _ in range(int(WAIT / 0.005)):
                if ctx.cancel_requested:
                    break
                pause.wait(0.005)  # a thread polls: it cannot be interrupted
            seen.append(ctx.cancel_requested)
            return "stopped early"

        await engine.start(tasks)
        task_id = await tasks.enqueue(blocking)
        assert await anyio.to_thread.run_sync(started.wait, WAIT), "the def task did not start"
        assert await tasks.cancel(task_id) is True
        info = await engine.finished(tasks, task_id, TaskState.CANCELLED)
        assert seen == [False, True], "ctx.cancel_requested turned true while the thread ran"
        assert info.result is None, "a def task that returns after the request ends cancelled, not succeeded"
        assert info.attempts == 1

    async def test_cancel_requested_is_read_only_and_false_outside_a_worker(self) -> None:
        ctx = TaskContext(task_id="t", name="n", queue="q", attempt=1, max_retries=0, enqueued_at=0.0)
        assert ctx.cancel_requested is False
        with pytest.raises(AttributeError):
            ctx.cancel_requested = True  # type: ignore[misc]
        await ctx.progress(1, 2, "stored nowhere")  # no worker: checked, then dropped

    async def test_a_cancelled_task_whose_worker_died_ends_cancelled_when_recovered(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(lease=5.0)
        ran: list[int] = []

        @tasks.register(name="suite.held", max_retries=5)
        async def held(ctx: TaskContext) -> None:
            ran.append(ctx.attempt)

        task_id = await tasks.enqueue(held)
        now = engine.clock()
        # A worker that claims the task and dies: no heartbeat, no verdict.
        assert len(await tasks.backend.claim(["default"], 1, now=now, lease_until=now + 5.0)) == 1
        assert await tasks.cancel(task_id) is True, "an active task's cancellation is stored"
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.ACTIVE
        engine.clock.advance(6)
        assert await tasks.recover_expired() == 1
        info = await engine.finished(tasks, task_id, TaskState.CANCELLED)
        assert info.attempts == 1
        await engine.start(tasks)
        await engine.finished(tasks, await tasks.enqueue(held), TaskState.SUCCEEDED)
        assert ran == [1], "the cancelled task never ran again"

    async def test_cancelling_a_running_group_member_cancels_the_group(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        started = anyio.Event()
        thens: list[object] = []

        @tasks.register(name="suite.member")
        async def member(block: bool) -> None:
            if block:
                started.set()
                await anyio.sleep_forever()

        @tasks.register(name="suite.then")
        async def then(ctx: TaskContext) -> None:
            thens.append(ctx.previous_result)

        await engine.start(tasks)
        group_id = await tasks.enqueue_group([Call(member, False), Call(member, True)], then=Call(then))
        with anyio.fail_after(WAIT):
            await started.wait()
        group = await tasks.group_info(group_id)
        assert group is not None
        assert await tasks.cancel(group.task_ids[1]) is True
        final = await tasks.wait_group(group_id, timeout=WAIT)
        assert final.state is TaskState.CANCELLED
        assert final.counts[TaskState.CANCELLED] == 1
        assert final.then_id is None
        await engine.finished(tasks, group.task_ids[0], TaskState.SUCCEEDED)
        assert thens == [], "a cancelled group's then never runs"

    # -- progress --------------------------------------------------------------------------------------------

    async def test_progress_is_stored_at_most_once_a_second_and_the_last_report_before_the_verdict(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        first_sent, more_sent = anyio.Event(), anyio.Event()
        go_on, finish = anyio.Event(), anyio.Event()

        @tasks.register(name="suite.reporting")
        async def reporting(ctx: TaskContext) -> str:
            await ctx.progress(1, 10, "one")
            first_sent.set()
            await go_on.wait()
            await ctx.progress(2, 10)
            await ctx.progress(3, 10, "three")
            more_sent.set()
            await finish.wait()
            await ctx.progress(9.5, 10, "nearly")
            return "done"

        @tasks.register(name="suite.quiet")
        async def quiet() -> None: ...

        await engine.start(tasks)
        task_id = await tasks.enqueue(reporting)
        with anyio.fail_after(WAIT):
            await first_sent.wait()

        async def stored(done: float, message: str | None) -> bool:
            info = await tasks.info(task_id)
            assert info is not None
            return info.progress == (done, 10.0) and info.progress_message == message

        await engine.eventually(lambda: stored(1.0, "one"), "the first report stored at once")
        go_on.set()
        with anyio.fail_after(WAIT):
            await more_sent.wait()
        info = await tasks.info(task_id)
        assert info is not None
        assert (info.progress, info.progress_message) == ((1.0, 10.0), "one"), (
            "reports within a second of the last write wait (the clock has not moved)"
        )
        engine.clock.advance(1)
        await engine.eventually(lambda: stored(3.0, "three"), "the latest report written a second later")
        finish.set()
        done = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert (done.progress, done.progress_message) == ((9.5, 10.0), "nearly"), (
            "the last report is stored before the verdict, even within the second"
        )
        silent = await engine.finished(tasks, await tasks.enqueue(quiet), TaskState.SUCCEEDED)
        assert (silent.progress, silent.progress_message) == (None, None)

    async def test_progress_refuses_bad_values(self) -> None:
        ctx = TaskContext(task_id="t", name="n", queue="q", attempt=1, max_retries=0, enqueued_at=0.0)
        with pytest.raises(TypeError, match="done"):
            await ctx.progress("half")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="total"):
            await ctx.progress(1, float("nan"))
        with pytest.raises(TypeError, match="message"):
            await ctx.progress(message=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="done"):
            await ctx.progress(True)
