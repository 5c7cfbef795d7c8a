"""Control of running work beyond the conformance suites: a backend written before it (no cancel requests,
progress or groups) keeps running tasks and refuses what it cannot do, clearly; waiters in one process are
woken by another AsyncTasks' verdicts through the in-process notices of MemoryBackend, long before their
poll interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    Group,
    MemoryBackend,
    NotifyingBackend,
    TaskContext,
    TaskState,
)
from lifecycle.asynctask._backend import is_backend, supports_control

WAIT = 20.0


class PreControlBackend:
    """A backend written before control of running work: no cancel_requests, save_progress, enqueue_group,
    get_group or wait_for_notices, and a cancel that leaves active tasks alone."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    def __getattr__(self, name: str) -> Any:
        if name in ("cancel_requests", "save_progress", "enqueue_group", "get_group", "wait_for_notices"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        pending = []
        for task_id in task_ids:
            record = await self._inner.get(task_id)
            if record is not None and record.state is TaskState.PENDING:
                pending.append(task_id)
        return await self._inner.cancel(pending, now=now)


for _method in (
    "open",
    "close",
    "enqueue_many",
    "claim",
    "extend_leases",
    "settle",
    "reclaim_expired",
    "wait_for_work",
    "get",
    "list_records",
    "stats",
    "requeue",
    "purge",
    "pause",
    "resume",
    "paused",
    "flow_state",
):
    setattr(
        PreControlBackend,
        _method,
        (lambda name: lambda self, *a, **k: getattr(self._inner, name)(*a, **k))(_method),
    )


async def test_a_backend_without_control_runs_tasks_and_refuses_cancelling_running_ones_and_groups() -> None:
    old = PreControlBackend()
    assert is_backend(old)
    assert not supports_control(old)
    assert not isinstance(old, NotifyingBackend)
    assert supports_control(MemoryBackend())
    tasks = AsyncTasks(old, concurrency=2, poll_interval=0.05)
    started = anyio.Event()
    release = anyio.Event()

    @tasks.register(name="control.reporting")
    async def reporting(ctx: TaskContext) -> int:
        await ctx.progress(1, 2, "half")  # no progress in this store: dropped
        started.set()
        await release.wait()
        return 7

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        running = await tasks.enqueue(reporting)
        waiting = await tasks.enqueue(reporting, delay=600)
        with anyio.fail_after(WAIT):
            await started.wait()
        with pytest.raises(RuntimeError, match="cannot cancel a running task"):
            await tasks.cancel(running)
        assert await tasks.cancel(waiting) is True, "a pending task is cancelled as before"
        release.set()
        info = await tasks.wait(running, timeout=WAIT)
        assert (info.state, info.result, info.progress) == (TaskState.SUCCEEDED, 7, None)
        with pytest.raises(RuntimeError, match="enqueue_group"):
            await tasks.enqueue_group([Call(reporting)])
        with pytest.raises(RuntimeError, match="starts with a Group"):
            await tasks.enqueue_chain([Group([Call(reporting)]), Call(reporting)])
        assert await tasks.group_info("group-x") is None
        group.cancel_scope.cancel()


@pytest.mark.parametrize("what", ["wait", "wait_group"])
async def test_a_waiter_is_woken_by_another_async_tasks_verdict_long_before_its_poll_interval(
    what: str,
) -> None:
    backend = MemoryBackend()
    worker = AsyncTasks(backend, poll_interval=0.05)
    waiter = AsyncTasks(backend, execution=False, poll_interval=3600.0)  # it would never poll in time
    release = anyio.Event()

    @worker.register(name="control.gated")
    async def gated() -> str:
        await release.wait()
        return "done"

    async with worker, waiter, anyio.create_task_group() as group:
        group.start_soon(worker.execute)
        if what == "wait":
            task_id = await waiter.enqueue("control.gated")
        else:
            task_id = await waiter.enqueue_group([Call("control.gated"), Call("control.gated")])
        results: list[object] = []

        async def wait() -> None:
            if what == "wait":
                results.append((await waiter.wait(task_id, timeout=WAIT)).state)
            else:
                results.append((await waiter.wait_group(task_id, timeout=WAIT)).state)

        async with anyio.create_task_group() as waiting:
            waiting.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            release.set()  # the worker's verdict is the only thing that can wake the waiter within WAIT
        assert results == [TaskState.SUCCEEDED]
        group.cancel_scope.cancel()


async def test_two_waits_at_once_are_both_woken_when_the_first_one_returns_at_once() -> None:
    """The first waiter listens for notices and returns (its task had finished); the second, which found the
    listening taken, must take it over rather than wait out its poll interval unheard."""
    backend = MemoryBackend()
    worker = AsyncTasks(backend, poll_interval=0.05)
    waiter = AsyncTasks(backend, execution=False, poll_interval=3600.0)  # it would never poll in time
    release = anyio.Event()

    @worker.register(name="control.quick")
    async def quick() -> str:
        return "quick"

    @worker.register(name="control.gated")
    async def gated() -> str:
        await release.wait()
        return "done"

    async with worker, waiter, anyio.create_task_group() as group:
        group.start_soon(worker.execute)
        done_already = await waiter.enqueue("control.quick")
        await worker.wait(done_already, timeout=WAIT)
        later = await waiter.enqueue("control.gated")
        results: dict[str, TaskState] = {}

        async def wait(task_id: str) -> None:
            results[task_id] = (await waiter.wait(task_id, timeout=WAIT)).state

        async with anyio.create_task_group() as waiting:
            waiting.start_soon(wait, done_already)
            waiting.start_soon(wait, later)
            await anyio.wait_all_tasks_blocked()
            assert results == {done_already: TaskState.SUCCEEDED}
            release.set()  # only a notice read by the second waiter can wake it within WAIT
        assert results == {done_already: TaskState.SUCCEEDED, later: TaskState.SUCCEEDED}
        group.cancel_scope.cancel()
