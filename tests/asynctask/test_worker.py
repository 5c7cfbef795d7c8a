"""The worker engine's own rules, on MemoryBackend with a manual clock: leases, heartbeats, backend failures,
local wake-ups, threads, hooks (asyncio and trio)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle import Backoff
from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    ClaimedTask,
    FlowLimits,
    ManualClock,
    MemoryBackend,
    NewTask,
    ProgressUpdate,
    Retry,
    Settlement,
    TaskContext,
    TaskInfo,
    TaskState,
)
from lifecycle.asynctask._clock import Clock
from lifecycle.asynctask._engine._settler import Settler
from lifecycle.asynctask._engine._worker import Worker

T0 = 1_700_000_000.0
WAIT = 10.0


class Instrumented(MemoryBackend):
    """A MemoryBackend that can fail calls on purpose and reports heartbeats."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_claims = 0
        self.fail_settles = 0
        self.settle_calls: list[list[str]] = []
        self.extended: list[list[str]] = []
        self.extend_event: anyio.Event | None = None
        self.heartbeats_held: anyio.Event | None = None  # while set here, lease renewals wait until it is set

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        if self.fail_claims:
            self.fail_claims -= 1
            raise ConnectionError("claim failed on purpose")
        return await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        if self.fail_settles:
            self.fail_settles -= 1
            raise ConnectionError("settle failed on purpose")
        self.settle_calls.append([s.task_id for s in settlements])
        return await super().settle(settlements)

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        if self.heartbeats_held is not None:
            await self.heartbeats_held.wait()
        lost = await super().extend_leases(leases, lease_until=lease_until)
        self.extended.append([task_id for task_id, _ in leases])
        if self.extend_event is not None:
            self.extend_event.set()
        return lost


class DeafBackend(MemoryBackend):
    """wait_for_work that never notices anything: only the timeout ends it."""

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        await anyio.sleep(timeout)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def group() -> AsyncIterator[Any]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


def make(backend: MemoryBackend, clock: Clock, **options: Any) -> AsyncTasks:
    defaults: dict[str, Any] = {
        "clock": clock,
        "poll_interval": 0.05,
        "retry_backoff": Backoff(initial=0.0, cap=0.0, jitter=False),
        "recovery_interval": 3600.0,
    }
    return AsyncTasks(backend, **{**defaults, **options})


async def test_a_lost_lease_cancels_the_run_locally_and_the_task_runs_again(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Instrumented()
    tasks = make(backend, clock, lease=0.3)
    started = anyio.Event()
    cancelled = anyio.Event()
    attempts: list[int] = []

    @tasks.register(name="long")
    async def long(ctx: TaskContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()
        return ctx.attempt

    async with tasks:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue(long)
        with anyio.fail_after(WAIT):
            await started.wait()
            # Another worker takes it over after the lease expired (this worker looked stalled): no heartbeat
            # of this worker may land between the clock's move and the takeover (a renewal then, with the
            # moved clock, would keep the lease, as it should for a worker that is alive).
            backend.heartbeats_held = held = anyio.Event()
            clock.advance(1.0)
            assert await tasks.recover_expired() == 1
            held.set()
            await cancelled.wait()  # the next heartbeat finds the lease lost and cancels the local run
        info = await tasks.wait(task_id, timeout=WAIT)
        assert (info.state, info.result, attempts) == (TaskState.SUCCEEDED, 2, [1, 2])
        assert "lost the lease of running task" in caplog.text


async def test_heartbeats_renew_the_leases_of_running_tasks(clock: ManualClock, group: Any) -> None:
    backend = Instrumented()
    tasks = make(backend, clock, lease=0.3)
    release = anyio.Event()

    @tasks.register(name="held")
    async def held() -> None:
        await release.wait()

    async with tasks:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue(held)
        with anyio.fail_after(WAIT):
            while True:
                backend.extend_event = anyio.Event()
                clock.advance(100)
                await backend.extend_event.wait()
                record = await backend.get(task_id)
                assert record is not None
                # A renewal already on its way when the clock moved (its time read before, 100 s ago) ended
                # at most 0.3 s after that time: only one made with the moved clock reaches past now.
                if record.lease_until is not None and record.lease_until >= clock():
                    break
        assert record.lease_until == clock() + 0.3, "a heartbeat sets lease_until = now + lease"
        release.set()
        assert (await tasks.wait(task_id, timeout=WAIT)).state is TaskState.SUCCEEDED


async def test_backend_failures_are_retried_and_nothing_is_lost(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Instrumented()
    backend.fail_claims = 2
    backend.fail_settles = 2
    tasks = make(backend, clock)

    @tasks.register(name="double")
    async def double(value: int) -> int:
        return value * 2

    async with tasks:
        ids = [await tasks.enqueue(double, n) for n in range(5)]
        group.start_soon(tasks.execute)
        results = [(await tasks.wait(task_id, timeout=WAIT)).result for task_id in ids]
    assert results == [0, 2, 4, 6, 8]
    assert "could not claim tasks (ConnectionError: claim failed on purpose)" in caplog.text
    assert "could not save" in caplog.text


async def test_results_are_saved_in_batches(clock: ManualClock, group: Any) -> None:
    backend = Instrumented()
    tasks = make(backend, clock, concurrency=50)
    release = anyio.Event()

    @tasks.register(name="gated")
    async def gated() -> None:
        await release.wait()

    async with tasks:
        ids = [await tasks.enqueue(gated) for _ in range(50)]
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            while (await tasks.stats())["default"].active < 50:
                await tasks.wait(ids[-1], timeout=WAIT, states={TaskState.ACTIVE})
        release.set()
        for task_id in ids:
            await tasks.wait(task_id, timeout=WAIT)
    assert sum(len(batch) for batch in backend.settle_calls) == 50
    assert len(backend.settle_calls) < 50, "results finishing together share settle calls"


async def test_same_process_enqueue_does_not_wait_for_the_poll(clock: ManualClock, group: Any) -> None:
    tasks = make(DeafBackend(), clock, poll_interval=3600)
    ran = anyio.Event()

    @tasks.register(name="quick")
    async def quick() -> None:
        ran.set()

    async with tasks:
        group.start_soon(tasks.execute)
        await tasks.enqueue(quick)
        with anyio.fail_after(WAIT):
            await ran.wait()


class TaskNoting(DeafBackend):
    """A DeafBackend noting which task calls ``claim`` and ``wait_for_work``; sets ``waiting`` in a wait."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[tuple[str, int]] = []
        self.waiting = anyio.Event()

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        self.callers.append(("claim", anyio.get_current_task().id))
        return await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        self.callers.append(("wait", anyio.get_current_task().id))
        self.waiting.set()
        await super().wait_for_work(queues, timeout=timeout)


async def test_an_idle_worker_waits_in_its_claim_loop_and_a_local_wake_up_ends_the_wait(
    clock: ManualClock, group: Any
) -> None:
    """No task is spawned per idle period (the claim after a wake-up follows in the same task, at once), and a
    same-process enqueue still ends a wait that only its timeout would end."""
    backend = TaskNoting()
    tasks = make(backend, clock, poll_interval=3600)
    ran = anyio.Event()

    @tasks.register(name="quick")
    async def quick() -> None:
        ran.set()

    async with tasks:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await backend.waiting.wait()
            backend.waiting = anyio.Event()
            await tasks.enqueue(quick)
            await ran.wait()
            await backend.waiting.wait()  # idle again after the task
    kinds = [kind for kind, _ in backend.callers]
    assert kinds[:4] == ["claim", "wait", "claim", "wait"], kinds
    assert len({caller for _, caller in backend.callers}) == 1, "the claims and the waits ran in one task"


async def test_a_sync_function_over_its_timeout_is_abandoned_and_fails(
    clock: ManualClock, group: Any
) -> None:
    tasks = make(MemoryBackend(), clock)
    unblock = threading.Event()

    @tasks.register(name="blocking", timeout=0.1, max_retries=0)
    def blocking() -> None:
        unblock.wait(WAIT)

    try:
        async with tasks:
            group.start_soon(tasks.execute)
            info = await tasks.wait(await tasks.enqueue(blocking), timeout=WAIT)
            assert info.state is TaskState.DEAD
            assert info.last_error is not None
            assert "timed out after 0.1 s" in info.last_error
    finally:
        unblock.set()


async def test_on_error_may_be_sync_or_async_and_sees_the_verdict(clock: ManualClock, group: Any) -> None:
    seen: list[tuple[str, TaskState, int, str]] = []

    async def async_hook(info: TaskInfo, exc: BaseException) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(("async", info.state, info.attempts, type(exc).__name__))

    tasks = make(MemoryBackend(), clock, on_error=async_hook)
    sync_seen: list[TaskInfo] = []
    sync_tasks = make(MemoryBackend(), clock, on_error=lambda info, exc: sync_seen.append(info))

    async def fails() -> None:
        raise KeyError("missing")

    tasks.register(fails, name="fails", max_retries=1)
    sync_tasks.register(fails, name="fails", max_retries=0)
    async with tasks, sync_tasks:
        group.start_soon(tasks.execute)
        group.start_soon(sync_tasks.execute)
        await tasks.wait(await tasks.enqueue(fails), timeout=WAIT)
        dead = await sync_tasks.wait(await sync_tasks.enqueue(fails), timeout=WAIT)
    assert seen == [("async", TaskState.PENDING, 1, "KeyError"), ("async", TaskState.DEAD, 2, "KeyError")]
    assert [(info.id, info.state) for info in sync_seen] == [(dead.id, TaskState.DEAD)]
    assert sync_seen[0].last_error is not None
    assert "KeyError: 'missing'" in sync_seen[0].last_error


async def test_retry_raised_inside_a_task_group_is_still_a_retry(clock: ManualClock, group: Any) -> None:
    tasks = make(MemoryBackend(), clock)

    @tasks.register(name="grouped")
    async def grouped(ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            async with anyio.create_task_group():
                raise Retry(after=30, reason="from a child scope")
        return ctx.attempt

    async with tasks:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue(grouped)
        info = await tasks._wait_for(
            task_id, lambda i: i.attempts == 1 and i.state is TaskState.PENDING, WAIT
        )
        assert info.run_at == T0 + 30
        clock.advance(30)
        assert (await tasks.wait(task_id, timeout=WAIT)).result == 2


async def test_backoff_with_jitter_uses_the_seeded_rng(clock: ManualClock, group: Any) -> None:
    import random

    backoff = Backoff(initial=8.0, cap=100.0)
    tasks = make(MemoryBackend(), clock, retry_backoff=backoff, rng=random.Random(42))

    @tasks.register(name="fails")
    async def fails() -> None:
        raise RuntimeError("no")

    async with tasks:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue(fails)
        info = await tasks._wait_for(
            task_id, lambda i: i.attempts == 1 and i.state is TaskState.PENDING, WAIT
        )
    delay = info.run_at - T0
    assert 0.0 <= delay <= 8.0
    assert delay != 8.0, "full jitter draws from [0, ceiling]"


async def test_the_task_logger_names_the_task(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = make(MemoryBackend(), clock)

    @tasks.register(name="talks")
    async def talks(ctx: TaskContext) -> None:
        ctx.logger.warning("hello from attempt %d", ctx.attempt)

    async with tasks:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue(talks)
        await tasks.wait(task_id, timeout=WAIT)
    record = next(r for r in caplog.records if r.name == "lifecycle.asynctask.task")
    assert record.getMessage() == f"[talks {task_id}] hello from attempt 1"
    assert (record.task_id, record.task_name) == (task_id, "talks")  # type: ignore[attr-defined]


async def test_a_task_stopped_before_its_run_started_is_released_without_running(clock: ManualClock) -> None:
    backend = MemoryBackend()
    tasks = make(backend, clock)

    @tasks.register(name="never_started")
    async def never_started() -> None:
        raise AssertionError("must not run: the worker stopped before it started")

    async with tasks:
        task_id = await tasks.enqueue(never_started)
        claimed = await backend.claim(["default"], 1, now=clock(), lease_until=clock() + 30)
        worker = Worker(backend, tasks._registry, tasks.encoding, tasks._options, logging.getLogger("test"))
        worker._start(claimed)  # queued for the runners
        worker._running[claimed[0].token].cancel("shutdown")  # the drain, in the same step as the claim
        worker._closing = True
        async with anyio.create_task_group() as runners:
            runners.start_soon(worker._runner_loop)  # takes the queued task, releases it, ends
        (release,) = worker._settler._buffer
    assert (release.task_id, release.state, release.refund_attempt) == (task_id, TaskState.PENDING, True)


class SlowProgress(MemoryBackend):
    """A MemoryBackend whose progress writes wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = anyio.Event()
        self.release = anyio.Event()

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        self.writing.set()
        await self.release.wait()
        return await super().save_progress(updates)


async def test_a_runner_writing_a_finished_tasks_last_progress_is_not_counted_free(
    clock: ManualClock, group: Any
) -> None:
    # The slot of a task whose last progress is being written is free only after the write: no task is
    # claimed meanwhile to wait for a runner (it stays pending, for any worker to take).
    backend = SlowProgress()
    tasks = make(backend, clock, concurrency=1)
    second_ran = anyio.Event()

    @tasks.register(name="reports")
    async def reports(ctx: TaskContext) -> None:
        await ctx.progress(1, 2)

    @tasks.register(name="second")
    async def second() -> None:
        second_ran.set()

    async with tasks:
        group.start_soon(tasks.execute)
        first_id = await tasks.enqueue(reports)
        with anyio.fail_after(WAIT):
            await backend.writing.wait()
        second_id = await tasks.enqueue(second)
        try:
            await anyio.wait_all_tasks_blocked()  # the worker had every chance to claim it (it must not)
            info = await tasks.info(second_id)
            assert info is not None
            assert info.state is TaskState.PENDING
        finally:
            backend.release.set()  # else a failure would hang in the shutdown, which waits for the write
        with anyio.fail_after(WAIT):
            await second_ran.wait()
        first = await tasks.wait(first_id, timeout=WAIT)
        assert first.state is TaskState.SUCCEEDED
        assert first.progress == (1, 2)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # only asyncio lets a task raise its cancellation
async def test_a_task_raising_the_cancellation_exception_itself_fails_alone(
    anyio_backend: str, clock: ManualClock, group: Any
) -> None:
    import asyncio

    tasks = make(MemoryBackend(), clock, concurrency=1)

    @tasks.register(name="stray", max_retries=0)
    async def stray() -> None:
        raise asyncio.CancelledError("raised by the task: no one cancelled it")

    @tasks.register(name="after")
    async def after() -> str:
        return "ran"

    with anyio.fail_after(3 * WAIT):  # a worker ended by the stray cancellation would hang its shutdown
        await _run_stray_then_after(tasks, group)


async def _run_stray_then_after(tasks: AsyncTasks, group: Any) -> None:
    async with tasks:
        group.start_soon(tasks.execute)
        stray_id = await tasks.enqueue("stray")
        after_id = await tasks.enqueue("after")
        info = await tasks.wait(stray_id, timeout=WAIT)
        assert info.state is TaskState.DEAD
        assert "CancelledError: raised by the task" in (info.last_error or "")
        info = await tasks.wait(after_id, timeout=WAIT)
        assert (info.state, info.result) == (TaskState.SUCCEEDED, "ran"), "the worker goes on"


async def test_a_failed_final_flush_leaves_tasks_active_for_recovery(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import lifecycle.asynctask._engine._worker as worker_module

    monkeypatch.setattr(worker_module, "_FINAL_FLUSH_TIMEOUT", 0.2)
    backend = Instrumented()
    tasks = make(backend, clock, shutdown_grace=0)
    started = anyio.Event()

    @tasks.register(name="endless")
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    async with tasks:
        task_id = await tasks.enqueue(endless)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.execute)
            with anyio.fail_after(WAIT):
                await started.wait()
            backend.fail_settles = 10**6
            group.cancel_scope.cancel()
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.ACTIVE
        assert "could not save 1 task verdict(s) at shutdown" in caplog.text
        backend.fail_settles = 0
        clock.advance(31)
        assert await tasks.recover_expired() == 1
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.PENDING


async def test_an_engine_crash_surfaces_from_execute_unwrapped(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_claim_loop(self: Worker) -> None:
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(Worker, "_claim_loop", broken_claim_loop)
    tasks = make(MemoryBackend(), clock)
    async with tasks:
        with pytest.raises(RuntimeError, match="a bug in the engine"):
            await tasks.execute()
        assert tasks._worker is None, "a new execute() may start after a crash"


async def test_a_dead_workers_task_is_taken_over_within_lease_plus_recovery_interval() -> None:
    # Real time: the bound the docs state is a property of real leases and real recovery timers.
    lease = 0.6
    recovered_at: list[float] = []
    tasks = AsyncTasks(
        MemoryBackend(),
        lease=lease,
        poll_interval=0.05,
        retry_backoff=Backoff(initial=3600.0, cap=3600.0, jitter=False),  # recovered, then left alone
        on_error=lambda info, exc: recovered_at.append(time.time()),
    )
    tasks.register(lambda: None, name="victim")
    recovery_interval = tasks._options.recovery_interval
    assert recovery_interval == lease / 2, "the default"
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        task_id = await tasks.enqueue("victim", delay=3600)
        # The "killed" worker: it claimed (or renewed) the lease just before it died, the worst case.
        died_at = time.time()
        [claimed] = await tasks.backend.claim(["default"], 1, now=died_at + 3600, lease_until=died_at + lease)
        assert claimed.record.id == task_id
        info = await tasks.wait(task_id, states={"pending"}, timeout=WAIT)
        group.cancel_scope.cancel()
    assert info.last_error is not None
    assert info.last_error.startswith("worker lost")
    [taken_over] = recovered_at
    assert lease < taken_over - died_at <= lease + recovery_interval + 0.5, (  # slack: a busy machine
        f"taken over {taken_over - died_at:.2f} s after the death; docs: at most lease + recovery_interval"
    )


def test_the_docs_state_the_recovery_bound_the_engine_keeps() -> None:
    root = Path(__file__).resolve().parents[2]
    guide = (root / "docs" / "asynctask.md").read_text()
    operations = (root / "docs" / "operations.md").read_text()
    assert "at most `lease + recovery_interval` after it died" in guide
    assert "`1.5 \N{MULTIPLICATION SIGN} lease`" in guide
    assert "at most `lease + recovery_interval`" in operations
    assert "about one `lease`" not in guide, "the old, wrong promise"


class Combining(MemoryBackend):
    """A MemoryBackend with ``settle_and_claim`` (as SQLite has), recording which call saved each verdict; it
    can fail its combined calls on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.saved_by: dict[str, list[str]] = {"settle": [], "settle_and_claim": []}
        self.fail_combined = 0
        self.calls: list[str] = []  # "claim", "settle_and_claim", "failed settle_and_claim"

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        self.calls.append("claim")
        return await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        self.saved_by["settle"] += [s.task_id for s in settlements]
        return await super().settle(settlements)

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
        if self.fail_combined:
            self.fail_combined -= 1
            self.calls.append("failed settle_and_claim")
            raise ConnectionError("settle_and_claim failed on purpose")
        self.calls.append("settle_and_claim")
        self.saved_by["settle_and_claim"] += [s.task_id for s in settlements]
        lost = await MemoryBackend.settle(self, settlements)
        claimed = await MemoryBackend.claim(
            self, queues, limit, now=now, lease_until=lease_until, limits=limits
        )
        return lost, claimed


@pytest.mark.parametrize("failures", [0, 3])
async def test_the_claim_takes_the_verdicts_waiting_to_be_saved_along(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture, failures: int
) -> None:
    backend = Combining()
    backend.fail_combined = failures  # the verdicts go back to the settler, which saves them
    tasks = make(backend, clock, concurrency=4)
    # 64 batches: on trio, which orders wake-ups at random, the claim goes before the settler in some
    count = 256
    done = anyio.Event()
    ran: list[int] = []

    @tasks.register(name="quick")
    async def quick(index: int) -> None:
        ran.append(index)
        if len(ran) == count:
            done.set()

    async with tasks:
        ids = await tasks.enqueue_many([Call(quick, index) for index in range(count)])
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await done.wait()
            while (await backend.stats()).get("default", {}).get(TaskState.SUCCEEDED) != count:
                await anyio.sleep(0.01)
    assert sorted(ran) == list(range(count))  # each ran once: no verdict was lost or saved twice
    saved = backend.saved_by["settle"] + backend.saved_by["settle_and_claim"]
    assert sorted(saved) == sorted(ids)
    assert backend.saved_by["settle_and_claim"], "the claim never took verdicts along"
    assert backend.fail_combined == 0  # each failed call's verdicts were saved by the settler
    failed = [index for index, call in enumerate(backend.calls) if call == "failed settle_and_claim"]
    assert len(failed) == failures
    assert all(backend.calls[index + 1] == "claim" for index in failed), (
        "a failed call is followed by a claim"
    )
    assert "was not saved" not in caplog.text


class WaitClaiming(DeafBackend):
    """A DeafBackend with ``wait_and_claim`` (as Redis has): its wait ends only when woken or timed out, then
    it claims; notes the calls and which of them leased each task."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.leased_by: dict[str, str] = {}
        self.waiting = anyio.Event()

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        self.calls.append("claim")
        claimed = await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)
        self.leased_by.update((c.record.id, "claim") for c in claimed)
        return claimed

    async def wait_and_claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
    ) -> list[ClaimedTask] | None:
        self.calls.append("wait_and_claim")
        self.waiting.set()
        began = time.monotonic()
        with anyio.move_on_after(timeout):
            await woken.wait()
        # As the protocol allows (and Redis does): the claim's time moves on by the real time waited.
        waited = time.monotonic() - began
        claimed = await MemoryBackend.claim(
            self, queues, limit, now=now + waited, lease_until=lease_until + waited, limits=limits
        )
        self.leased_by.update((c.record.id, "wait_and_claim") for c in claimed)
        return claimed


async def test_an_idle_worker_claims_behind_its_wait_and_a_local_wake_up_ends_it(group: Any) -> None:
    """With a backend that has ``wait_and_claim``, the idle wait carries the next claim: the task a local
    enqueue wakes the worker for is leased by that call (no claim of its own follows), and idle again the
    worker waits that way once more. (On the real clock: see the next test.)"""
    backend = WaitClaiming()
    tasks = make(backend, time.time, poll_interval=3600)
    ran = anyio.Event()

    @tasks.register(name="quick")
    async def quick() -> None:
        ran.set()

    async with tasks:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await backend.waiting.wait()
            backend.waiting = anyio.Event()
            task_id = await tasks.enqueue(quick)
            await ran.wait()
            await backend.waiting.wait()  # idle again after the task
    assert backend.leased_by == {task_id: "wait_and_claim"}
    assert backend.calls[:3] == ["claim", "wait_and_claim", "wait_and_claim"], backend.calls


async def test_an_injected_clock_turns_the_claim_behind_the_wait_off(clock: ManualClock, group: Any) -> None:
    """The claim behind a wait moves its ``now`` on by the real time the wait took, which a manual clock does
    not: with an injected clock the worker waits and claims in two calls, so no task is claimed before the
    test's clock says it is due."""
    backend = WaitClaiming()
    tasks = make(backend, clock, poll_interval=3600)
    ran = anyio.Event()

    @tasks.register(name="quick")
    async def quick() -> None:
        ran.set()

    async with tasks:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            task_id = await tasks.enqueue(quick)
            await ran.wait()
    assert backend.leased_by == {task_id: "claim"}
    assert "wait_and_claim" not in backend.calls


async def test_tasks_claimed_behind_a_wait_that_stop_ended_are_run_before_the_worker_stops() -> None:
    """stop() ends the wait through ``woken``: the claim behind it has run by then, and the tasks it leased
    are the worker's to finish, not left ACTIVE until their lease expires."""
    backend = WaitClaiming()
    tasks = make(backend, time.time, poll_interval=3600)
    ran: list[str] = []

    @tasks.register(name="quick")
    async def quick() -> None:
        ran.append("quick")

    payload = b'{"__lifecycle__":"tuple","v":[]}'
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            await backend.waiting.wait()
            # Stored behind the engine's back: nothing wakes the worker for it but the stop below.
            (task_id,) = await MemoryBackend.enqueue_many(
                backend, [NewTask("t1", "quick", "default", payload, 3, None, T0, T0)]
            )
            group.cancel_scope.cancel()  # execute() stops the worker and drains
    assert backend.leased_by == {task_id: "wait_and_claim"}
    assert ran == ["quick"]
    record = await backend.get(task_id)
    assert record is not None
    assert record.state is TaskState.SUCCEEDED


def test_the_engine_waits_and_claims_in_one_call_only_through_the_backends_own_methods() -> None:
    from lifecycle.asynctask._backend import combined_wait_and_claim

    class OwnClaim(WaitClaiming):
        async def claim(
            self,
            queues: Sequence[str],
            limit: int,
            *,
            now: float,
            lease_until: float,
            limits: Mapping[str, FlowLimits] | None = None,
        ) -> list[ClaimedTask]:
            return await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)

    class OwnWait(WaitClaiming):
        async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
            await super().wait_for_work(queues, timeout=timeout)

    plain = WaitClaiming()
    assert combined_wait_and_claim(plain) == plain.wait_and_claim
    for bypassed in (OwnClaim(), OwnWait(), MemoryBackend()):
        assert combined_wait_and_claim(bypassed) is None, bypassed


async def test_a_held_settler_leaves_verdicts_to_its_taker_and_wakes_its_flusher_on_release() -> None:
    """``Settler.hold()``: a verdict put meanwhile does not wake the flusher; ``take()`` gets it and ends the
    hold (a verdict put after it wakes the flusher again), ``take()`` finding the flusher's batch in flight
    ends it too, and ``release()`` wakes the flusher for what was put meanwhile, which it then saves."""
    backend = Instrumented()
    now = T0
    await backend.enqueue_many(
        [NewTask(f"t{n}", "job", "default", b"[]", 0, None, now, now) for n in range(5)]
    )
    claimed = await backend.claim(["default"], 5, now=now, lease_until=now + 30)
    verdicts = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=now) for c in claimed]
    held = {c.record.id: c.token for c in claimed}
    settler = Settler(backend, held, lambda: None, logging.getLogger("test"))
    async with anyio.create_task_group() as group:
        group.start_soon(settler.run)
        await anyio.wait_all_tasks_blocked()
        settler.hold()
        settler.put(verdicts[0])
        await anyio.wait_all_tasks_blocked()
        assert backend.settle_calls == []  # the flusher sleeps: the verdict waits for its taker
        assert settler.take() == [verdicts[0]]
        settler.saved([verdicts[0]], set())
        settler.put(verdicts[1])  # no hold any more: the flusher saves it
        with anyio.fail_after(WAIT):
            await settler.flush()
        assert backend.settle_calls == [[verdicts[1].task_id]]
        # take() while the flusher's batch is in flight: it takes nothing and ends the hold.
        backend.heartbeats_held = None
        gate = anyio.Event()
        original = backend.settle

        async def slow_settle(settlements: Sequence[Settlement]) -> set[str]:
            await gate.wait()
            return await original(settlements)

        backend.settle = slow_settle  # type: ignore[method-assign]
        settler.put(verdicts[2])
        await anyio.wait_all_tasks_blocked()  # the flusher is saving it, held up by the gate
        settler.hold()
        assert settler.take() == []
        settler.put(verdicts[3])  # not held: saved by the flusher after its batch
        gate.set()
        with anyio.fail_after(WAIT):
            await settler.flush()
        assert backend.settle_calls[-2:] == [[verdicts[2].task_id], [verdicts[3].task_id]]
        settler.hold()
        settler.put(verdicts[4])
        await anyio.wait_all_tasks_blocked()
        assert backend.settle_calls[-1] == [verdicts[3].task_id]
        settler.release()
        with anyio.fail_after(WAIT):
            await settler.flush()
        assert backend.settle_calls[-1] == [verdicts[4].task_id]
        group.cancel_scope.cancel()
    assert held == {}


class _SilentSettleWait(MemoryBackend):
    """A backend whose ``settle_wait_and_claim`` breaks its contract: it returns without ever reporting the
    verdicts' outcome (nor saving them)."""

    async def wait_and_claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
    ) -> list[ClaimedTask] | None:
        await self.wait_for_work(queues, timeout=timeout)
        return await self.claim(queues, limit, now=time.time(), lease_until=lease_until, limits=limits)

    async def settle_wait_and_claim(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
        settled: Callable[[set[str] | None], None],
    ) -> list[ClaimedTask] | None:
        self.silenced += len(settlements)
        return await self.wait_and_claim(
            queues, limit, now=now, lease_until=lease_until, limits=limits, timeout=timeout, woken=woken
        )

    silenced = 0


async def test_verdicts_a_combined_wait_never_reported_are_saved_by_the_settler() -> None:
    """A backend's ``settle_wait_and_claim`` that returns without reporting the verdicts it was given: the
    worker counts them as not saved, and its settler's flusher saves them (rather than holding them in
    flight, unsaved, until the final flush gives up), before the claim loop's next call can take them."""
    backend = _SilentSettleWait()
    tasks = AsyncTasks(backend, poll_interval=0.05)

    @tasks.register(name="job")
    async def job() -> None:
        pass

    async with tasks:
        task_id = await tasks.enqueue("job")
        now = time.time()
        (claimed,) = await backend.claim(["default"], 1, now=now, lease_until=now + 30)
        worker = Worker(backend, tasks._registry, tasks.encoding, tasks._options, logging.getLogger("test"))
        worker._settle_wait = backend.settle_wait_and_claim
        worker._held[task_id] = claimed.token
        worker._settler.put(Settlement(task_id, claimed.token, TaskState.SUCCEEDED, at=now))
        assert await worker._wait_and_claim(backend.wait_and_claim, 0, 1) == []
        assert backend.silenced == 1  # the verdict went to the silent call
        assert worker._settler.take() == []  # given back: the flusher's to save first
        async with anyio.create_task_group() as group:
            group.start_soon(worker._settler.run)
            with anyio.fail_after(WAIT):
                await worker._settler.flush()
            group.cancel_scope.cancel()
        record = await backend.get(task_id)
        assert record is not None
        assert record.state is TaskState.SUCCEEDED
        assert worker._held == {}
