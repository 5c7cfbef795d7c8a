"""Claiming ahead: in a drain of short tasks the worker sends its next claim while the runners run the batch
it has, never runs more than ``concurrency`` task bodies at once, and gives back what it claimed ahead when
no runner takes it soon (long tasks) or at shutdown (asyncio and trio)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import pytest

from lifecycle import Backoff
from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    ClaimedTask,
    FlowLimits,
    MemoryBackend,
    Settlement,
    TaskContext,
    TaskState,
)
from lifecycle.asynctask._engine import _worker

WAIT = 10.0


class Counting(MemoryBackend):
    """A MemoryBackend that notes, at each claim, how many tasks it handed out that have not finished."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_out = 0
        self.finished = 0  # task bodies that returned, counted by the tasks
        self.unfinished_at_claim: list[int] = []
        self.claimed_ids: list[str] = []
        self._claimed = anyio.Event()
        self.extended_ids: set[str] = set()
        self._extended = anyio.Event()
        self.lose: set[str] = set()  # ids whose lease renewal reports the lease lost
        self.lost_reported = anyio.Event()
        self.settled_ids: list[str] = []

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        self.extended_ids.update(task_id for task_id, _ in leases)
        self._extended.set()
        lost = await super().extend_leases(leases, lease_until=lease_until)
        reported = {task_id for task_id, _ in leases if task_id in self.lose}
        if reported:
            self.lost_reported.set()
        return lost | reported

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        self.settled_ids += [settlement.task_id for settlement in settlements]
        return await super().settle(settlements)

    async def extended(self, task_id: str) -> None:
        """Return once the lease of ``task_id`` was renewed."""
        while task_id not in self.extended_ids:
            event = self._extended = anyio.Event()
            await event.wait()

    async def claimed(self, task_id: str) -> None:
        """Return once ``task_id`` was claimed."""
        while task_id not in self.claimed_ids:
            event = self._claimed = anyio.Event()
            await event.wait()

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        self.unfinished_at_claim.append(self.handed_out - self.finished)
        batch = await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)
        self.handed_out += len(batch)
        self.claimed_ids += [claimed.record.id for claimed in batch]
        self._claimed.set()
        return batch


@pytest.fixture
async def group() -> AsyncIterator[Any]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


def make(backend: MemoryBackend, **options: Any) -> AsyncTasks:
    defaults: dict[str, Any] = {
        "poll_interval": 0.05,
        "retry_backoff": Backoff(initial=0.0, cap=0.0, jitter=False),
        "recovery_interval": 3600.0,
    }
    return AsyncTasks(backend, **{**defaults, **options})


async def test_a_drain_of_short_tasks_claims_ahead_and_runs_at_most_concurrency_bodies_at_once(
    group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task claimed ahead is given back when no runner takes it within _AHEAD_WAIT (0.25 s) of real time: a
    # busy machine that stalls the process that long while tasks wait would give some back (the tests below
    # cover that). Here the runners take every one, however slowly the machine runs them.
    monkeypatch.setattr(_worker, "_AHEAD_WAIT", 3600.0)
    backend = Counting()
    concurrency = 4
    tasks = make(backend, concurrency=concurrency)
    count = 400
    done = anyio.Event()
    executing = 0
    most = 0

    @tasks.register(name="quick")
    async def quick(index: int) -> None:
        nonlocal executing, most
        executing += 1
        most = max(most, executing)
        if index % 2:
            await anyio.lowlevel.checkpoint()  # half of them let other runners in while they run
        executing -= 1
        backend.finished += 1
        if backend.finished == count:
            done.set()

    async with tasks:
        await tasks.enqueue_many([Call(quick, index) for index in range(count)])
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await done.wait()
            while (await backend.stats()).get("default", {}).get(TaskState.SUCCEEDED) != count:
                await anyio.sleep(0.01)
    assert most <= concurrency
    assert len(backend.claimed_ids) == len(set(backend.claimed_ids)) == count  # nothing given back
    # Without claiming ahead a claim only goes out for a free runner: fewer than `concurrency` unfinished.
    assert max(backend.unfinished_at_claim) >= concurrency, "no claim went out ahead"
    assert max(backend.unfinished_at_claim) <= 2 * concurrency


async def test_no_claim_goes_ahead_for_tasks_under_flow_limits(group: Any) -> None:
    backend = Counting()
    concurrency = 4
    tasks = make(backend, concurrency=concurrency)
    count = 200
    done = anyio.Event()

    @tasks.register(name="limited", max_running=100)  # a limit that never holds a task back here
    async def limited(index: int) -> None:
        backend.finished += 1
        if backend.finished == count:
            done.set()

    async with tasks:
        await tasks.enqueue_many([Call(limited, index) for index in range(count)])
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await done.wait()
    assert max(backend.unfinished_at_claim) < concurrency  # a task held here counts for every worker


class CountingCombined(Counting):
    """A Counting backend with ``settle_and_claim`` (as SQLite has): the verdicts go with the claim."""

    async def settle_and_claim(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> tuple[set[str], list[ClaimedTask]]:
        lost = await self.settle(settlements)
        return lost, await self.claim(queues, limit, now=now, lease_until=lease_until, limits=limits)


async def test_no_claim_goes_ahead_with_a_backend_that_saves_the_verdicts_with_the_claim(group: Any) -> None:
    backend = CountingCombined()
    concurrency = 4
    tasks = make(backend, concurrency=concurrency)
    count = 200
    done = anyio.Event()

    @tasks.register(name="quick")
    async def quick(index: int) -> None:
        backend.finished += 1
        if backend.finished == count:
            done.set()

    async with tasks:
        await tasks.enqueue_many([Call(quick, index) for index in range(count)])
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await done.wait()
    # A claim ahead would find no verdicts to take along: one call per batch would become two.
    assert max(backend.unfinished_at_claim) < concurrency


def short_then_long(tasks: AsyncTasks) -> tuple[anyio.Event, anyio.Event]:
    """Register a short task, a long one (runs until its event is set) and a last one (returns its attempt).
    Returns (long started, let long end)."""
    long_started = anyio.Event()
    long_may_end = anyio.Event()

    @tasks.register(name="short")
    async def short(index: int) -> None:
        pass

    @tasks.register(name="long")
    async def long() -> None:
        long_started.set()
        await long_may_end.wait()

    @tasks.register(name="last")
    async def last(ctx: TaskContext) -> int:
        return ctx.attempt

    return long_started, long_may_end


async def enqueue(tasks: AsyncTasks, shorts: int) -> tuple[str, str]:
    """Enqueue `shorts` short tasks, the long one, then the last one; returns the long and the last ids."""
    await tasks.enqueue_many([Call("short", index) for index in range(shorts)])
    return await tasks.enqueue("long"), await tasks.enqueue("last")


async def test_a_task_claimed_ahead_that_no_runner_takes_is_given_back_and_another_worker_runs_it(
    group: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_worker, "_AHEAD_WAIT", 0.05)
    caplog.set_level(logging.DEBUG, logger="lifecycle")
    backend = Counting()
    first = make(backend, concurrency=1)
    second = make(backend, concurrency=1)
    long_started, long_may_end = short_then_long(first)
    short_then_long(second)  # the same functions, registered in the second worker
    async with first, second:
        long_id, last_id = await enqueue(first, 64)
        group.start_soon(first.execute)
        with anyio.fail_after(WAIT):
            await long_started.wait()
            await backend.claimed(last_id)  # claimed ahead: the only runner is on the long task
            group.start_soon(second.execute)
            # The first worker's only runner is on the long task: the second worker runs the last one.
            info = await first.wait(last_id, timeout=WAIT)
        assert info.state is TaskState.SUCCEEDED
        assert info.result == 1  # the attempt claimed ahead was refunded when given back
        assert (await first.info(long_id)).state is TaskState.ACTIVE  # type: ignore[union-attr]
        long_may_end.set()
        with anyio.fail_after(WAIT):
            assert (await first.wait(long_id, timeout=WAIT)).state is TaskState.SUCCEEDED
    assert backend.claimed_ids.count(last_id) == 2
    assert "giving back 1 task(s) claimed ahead" in caplog.text


async def test_a_short_claim_ahead_is_given_back_in_time_not_after_the_idle_wait(
    group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim ahead that took the last task came back short (one task for two slots): the worker would
    # wait idle for poll_interval (an hour here) with that task held; it gives it back after _AHEAD_WAIT.
    monkeypatch.setattr(_worker, "_AHEAD_WAIT", 0.05)
    backend = Counting()
    tasks = make(backend, concurrency=2, poll_interval=3600.0)
    long_started, long_may_end = short_then_long(tasks)
    async with tasks:
        await tasks.enqueue_many([Call("short", index) for index in range(64)])
        long_ids = [await tasks.enqueue("long"), await tasks.enqueue("long")]
        last_id = await tasks.enqueue("last")
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT / 2):
            await backend.claimed(last_id)  # claimed ahead: both runners are on the long tasks
            while last_id not in backend.settled_ids:  # given back: a settlement to pending
                await anyio.sleep(0.01)
        last = await tasks.info(last_id)
        assert last is not None
        assert last.state is TaskState.PENDING
        assert last.attempts == 0
        for long_id in long_ids:
            assert (await tasks.info(long_id)).state is TaskState.ACTIVE  # type: ignore[union-attr]
        long_may_end.set()
        with anyio.fail_after(WAIT):
            assert (await tasks.wait(last_id, timeout=WAIT)).state is TaskState.SUCCEEDED
    assert long_started.is_set()


async def test_at_shutdown_a_task_claimed_ahead_that_did_not_start_is_given_back_not_run(
    group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "_AHEAD_WAIT", 3600.0)  # only the shutdown gives it back
    backend = Counting()
    tasks = make(backend, concurrency=1, shutdown_grace=WAIT, lease=0.5)
    long_started, long_may_end = short_then_long(tasks)
    stop = anyio.CancelScope()
    stopped = anyio.Event()

    async def execute() -> None:
        with stop:
            await tasks.execute()
        stopped.set()

    async with tasks:
        long_id, last_id = await enqueue(tasks, 64)
        enqueued = await tasks.info(last_id)
        assert enqueued is not None
        group.start_soon(execute)
        with anyio.fail_after(WAIT):
            await long_started.wait()
            await backend.claimed(last_id)  # claimed ahead: the only runner is on the long task
            await backend.extended(last_id)  # its lease is renewed while it waits for a runner
            assert (await tasks.info(last_id)).state is TaskState.ACTIVE  # type: ignore[union-attr]
            stop.cancel()  # the worker drains: the long task may finish in its shutdown grace
            while (await tasks.info(last_id)).state is not TaskState.PENDING:  # type: ignore[union-attr]
                await anyio.sleep(0.01)
            # Given back at once, while the long task still runs.
            assert (await tasks.info(long_id)).state is TaskState.ACTIVE  # type: ignore[union-attr]
            long_may_end.set()
            await stopped.wait()
        last = await tasks.info(last_id)
        long = await tasks.info(long_id)
    assert long is not None
    assert long.state is TaskState.SUCCEEDED
    assert last is not None
    assert last.state is TaskState.PENDING
    assert last.attempts == 0  # never started: the attempt is refunded
    assert last.run_at == enqueued.run_at  # due when it was due: its place before later tasks is kept


async def test_a_task_claimed_ahead_whose_lease_is_lost_is_neither_run_nor_given_back(
    group: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_worker, "_AHEAD_WAIT", 3600.0)
    backend = Counting()
    tasks = make(backend, concurrency=1, shutdown_grace=WAIT, lease=0.5)
    long_started, long_may_end = short_then_long(tasks)
    stop = anyio.CancelScope()
    stopped = anyio.Event()

    async def execute() -> None:
        with stop:
            await tasks.execute()
        stopped.set()

    async with tasks:
        long_id, last_id = await enqueue(tasks, 64)
        enqueued = await tasks.info(last_id)
        assert enqueued is not None
        group.start_soon(execute)
        with anyio.fail_after(WAIT):
            await long_started.wait()
            await backend.claimed(last_id)  # claimed ahead, waiting for the runner
            backend.lose.add(last_id)  # the store says another worker holds it now
            await backend.lost_reported.wait()
            long_may_end.set()  # the runner is free for it now: it must not run it
            assert (await tasks.wait(long_id, timeout=WAIT)).state is TaskState.SUCCEEDED
            stop.cancel()
            await stopped.wait()
        last = await tasks.info(last_id)
    assert last_id not in backend.settled_ids  # not ours: neither a verdict nor given back
    assert last is not None
    assert last.state is TaskState.ACTIVE  # the other worker's (in this test: nobody's until the lease ends)
    assert f"lost the lease of running task {last_id}" in caplog.text
