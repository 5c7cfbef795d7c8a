"""Periodic tasks: each fire time enqueued exactly once by any number of schedulers, failures do not end a
schedule, missed fire times skipped or run once, cron and interval triggers, and the checks at declaration."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import (
    Abort,
    AsyncTasks,
    Backend,
    ManualClock,
    MemoryBackend,
    SQLiteBackend,
    TaskState,
)
from lifecycle.asynctask._schedule import fire_stamp, fire_task_id

T0 = 1_700_000_000.0  # a multiple of 10 s
NEW_YEAR = 1_704_067_200.0  # 2024-01-01T00:00:00Z


async def report(region: str) -> str:
    return region


def make_tasks(
    backend: Backend, clock: ManualClock, *, execution: bool = False, **options: Any
) -> AsyncTasks:
    tasks = AsyncTasks(backend, clock=clock, execution=execution, **options)
    tasks.register(report, name="app.report")
    return tasks


@asynccontextmanager
async def executing(*all_tasks: AsyncTasks) -> AsyncIterator[None]:
    """Open and execute every AsyncTasks until the block ends; wait until each scheduler waits for its next
    fire time, so the test can move the clock."""
    async with AsyncExitStack() as stack:
        for tasks in all_tasks:
            await stack.enter_async_context(tasks)
        async with anyio.create_task_group() as group:
            for tasks in all_tasks:
                group.start_soon(tasks.execute)
            with anyio.fail_after(10):
                for tasks in all_tasks:
                    for info in tasks.schedules():
                        await tasks._scheduler.wait_for(info.name, lambda s: s.next_fire is not None)
            yield
            group.cancel_scope.cancel()


async def handled(all_tasks: list[AsyncTasks], name: str, fire: float) -> None:
    with anyio.fail_after(10):
        for tasks in all_tasks:
            await tasks._scheduler.wait_handled(name, fire)


async def stored_ids(tasks: AsyncTasks) -> list[str]:
    return sorted(record.id for record in await tasks.backend.list_records(limit=1000))


BackendFactory = Callable[[ManualClock], Backend]


def _memory_factory(tmp_path: Path) -> BackendFactory:
    shared = MemoryBackend()
    return lambda clock: shared


def _sqlite_factory(tmp_path: Path) -> BackendFactory:
    path = tmp_path / "tasks.db"
    return lambda clock: SQLiteBackend(path)  # one connection each, like separate processes


@pytest.fixture(params=["memory", "sqlite"])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    factories = {"memory": _memory_factory, "sqlite": _sqlite_factory}
    return factories[request.param](tmp_path)


async def test_several_schedulers_enqueue_each_fire_time_once(backends: BackendFactory) -> None:
    clock = ManualClock(T0)
    all_tasks = [make_tasks(backends(clock), clock) for _ in range(3)]
    for tasks in all_tasks:
        tasks.every(report, 10, "eu", name="tick")
    async with executing(*all_tasks):
        for step in range(1, 4):
            clock.advance(10)
            await handled(all_tasks, "tick", T0 + 10 * step)
        ids = await stored_ids(all_tasks[0])
    assert ids == sorted(fire_task_id("tick", T0 + 10 * step) for step in range(1, 4))
    async with all_tasks[0] as tasks:
        info = await tasks.info(fire_task_id("tick", T0 + 20))
        assert info is not None
        assert (info.name, info.schedule, info.state) == ("app.report", "tick", TaskState.PENDING)
        assert tasks.encoding.decode((await tasks.backend.get(info.id)).payload) == ("eu",)  # type: ignore[union-attr]


async def test_a_failing_run_does_not_end_the_schedule() -> None:
    clock = ManualClock(T0)
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(clock())
        raise Abort("the report service is down")

    tasks = AsyncTasks(MemoryBackend(), clock=clock)
    tasks.register(flaky, name="app.flaky", max_retries=0)
    tasks.every(flaky, timedelta(seconds=10), name="flaky")
    async with executing(tasks):
        for step in range(1, 4):
            clock.advance(10)
            await handled([tasks], "flaky", T0 + 10 * step)
            info = await tasks.wait(fire_task_id("flaky", T0 + 10 * step), timeout=10)
            assert info.state is TaskState.DEAD
            assert "the report service is down" in (info.last_error or "")
        assert tasks.schedules()[0].next_fire == T0 + 40
    assert runs == [T0 + 10, T0 + 20, T0 + 30]


async def test_fire_times_a_blocked_scheduler_passed_coalesce_into_one_run() -> None:
    clock = ManualClock(T0)
    tasks = make_tasks(MemoryBackend(), clock)
    tasks.every(report, 10, "eu", name="tick")
    async with executing(tasks):
        clock.advance(35)  # T0+10, +20, +30 all passed at once
        await handled([tasks], "tick", T0 + 30)
        assert await stored_ids(tasks) == [fire_task_id("tick", T0 + 30)]
        assert tasks.schedules()[0].last_fire == T0 + 30


async def test_missed_skip_does_not_run_fire_times_before_the_start() -> None:
    clock = ManualClock(T0 + 25)  # T0, T0+10 and T0+20 passed while nothing ran
    tasks = make_tasks(MemoryBackend(), clock)
    tasks.every(report, 10, "eu", name="tick")
    async with executing(tasks):
        assert await stored_ids(tasks) == []
        assert tasks.schedules()[0].next_fire == T0 + 30
        clock.advance(5)
        await handled([tasks], "tick", T0 + 30)
        assert await stored_ids(tasks) == [fire_task_id("tick", T0 + 30)]


async def test_missed_run_once_catches_up_the_latest_fire_time_once() -> None:
    clock = ManualClock(T0 + 25)
    backend = MemoryBackend()
    first, second = (make_tasks(backend, clock) for _ in range(2))
    for tasks in (first, second):
        tasks.every(report, 10, "eu", name="tick", missed="run_once")
    async with executing(first):
        await handled([first], "tick", T0 + 20)
        assert await stored_ids(first) == [fire_task_id("tick", T0 + 20)]
    clock.advance(2)  # a second process starts later: the catch-up is stored already
    async with executing(second):
        assert second.schedules()[0].last_fire is None
        assert await stored_ids(second) == [fire_task_id("tick", T0 + 20)]


async def test_missed_run_once_does_not_trust_fire_times_older_than_the_retention() -> None:
    # Records of finished runs are purged after the retention (1 day for succeeded): an older fire time
    # without a record may well have run, so it is not caught up.
    day = 86_400.0
    clock = ManualClock(3 * day * 10_000 + 2 * day)  # the latest fire time of a 3-day interval, 2 days ago
    tasks = make_tasks(MemoryBackend(), clock)
    tasks.every(report, 3 * day, "eu", name="rare", missed="run_once")
    async with executing(tasks):
        assert await stored_ids(tasks) == []
    kept = make_tasks(MemoryBackend(), clock, retention={"succeeded": None, "dead": None, "cancelled": None})
    kept.every(report, 3 * day, "eu", name="rare", missed="run_once")
    async with executing(kept):
        await handled([kept], "rare", 3 * day * 10_000)
        assert await stored_ids(kept) == [fire_task_id("rare", 3 * day * 10_000)]


async def test_cron_schedule_fires_on_its_expression_and_runs_the_call() -> None:
    clock = ManualClock(NEW_YEAR)
    tasks = make_tasks(MemoryBackend(), clock, execution=True)
    info = tasks.schedule(report, "*/5 * * * *", "us", name="five", queue="default")
    assert (info.kind, info.spec, info.timezone, info.next_fire) == (
        "cron",
        "*/5 * * * *",
        "UTC",
        NEW_YEAR + 300,
    )
    async with executing(tasks):
        clock.advance(300)
        await handled([tasks], "five", NEW_YEAR + 300)
        done = await tasks.wait(fire_task_id("five", NEW_YEAR + 300), timeout=10)
        assert (done.state, done.result, done.schedule) == (TaskState.SUCCEEDED, "us", "five")
        assert tasks.schedules()[0].next_fire == NEW_YEAR + 600


def test_cron_reads_the_fields_in_the_schedules_time_zone() -> None:
    clock = ManualClock(NEW_YEAR)
    tasks = make_tasks(MemoryBackend(), clock)
    paris = tasks.schedule(report, "0 3 * * *", "fr", name="paris", timezone="Europe/Paris")
    utc = tasks.schedule(report, "0 3 * * *", "fr", name="utc")
    assert fire_stamp(paris.next_fire) == "2024-01-01T02:00:00Z"  # 03:00 in Paris, winter time
    assert fire_stamp(utc.next_fire) == "2024-01-01T03:00:00Z"
    clock.set(1_719_792_000.0)  # 2024-07-01T00:00:00Z
    summer = {info.name: info for info in tasks.schedules()}
    assert fire_stamp(summer["paris"].next_fire) == "2024-07-01T01:00:00Z"  # summer time
    assert summer["paris"].task_id(summer["paris"].next_fire) == "schedule:paris:2024-07-01T01:00:00Z"


def test_every_fire_times_are_multiples_of_the_interval_since_the_epoch() -> None:
    clock = ManualClock(T0 + 3.25)
    tasks = make_tasks(MemoryBackend(), clock)
    assert tasks.every(report, 10, "eu", name="ten").next_fire == T0 + 10
    half = tasks.every(report, 0.5, "eu", name="half")
    assert half.next_fire == T0 + 3.5
    assert half.task_id(T0 + 3.5) == "schedule:half:2023-11-14T22:13:23.500Z"
    assert [info.name for info in tasks.schedules()] == ["half", "ten"]


def test_schedules_are_checked_when_declared() -> None:
    clock = ManualClock(T0)
    tasks = make_tasks(MemoryBackend(), clock)
    tasks.every(report, 10, "eu", name="tick")
    with pytest.raises(ValueError, match="'tick' exists already"):
        tasks.every(report, 10, "eu", name="tick")
    with pytest.raises(ValueError, match="not a valid cron expression"):
        tasks.schedule(report, "every monday", "eu", name="bad")
    with pytest.raises(
        ValueError, match=r"cron expression '0 0 31 2 \*' never fires: .*February 31"
    ) as never:
        tasks.schedule(report, "0 0 31 2 *", "eu", name="never")
    assert "croniter" not in type(never.value).__module__, "one clear error, not croniter's own"
    assert tasks.schedule(report, "0 0 29 2 *", "eu", name="leap-day").kind == "cron", "rare is not never"
    with pytest.raises(ValueError, match=r"every\(\): the schedule name must not contain NUL characters"):
        tasks.every(report, 10, "eu", name="a\x00b")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        tasks.schedule(report, "* * * * *", "eu", name="tz", timezone="Mars/Olympus")
    with pytest.raises(TypeError, match="takes 1 argument"):
        tasks.every(report, 10, name="arity")
    with pytest.raises(TypeError, match="not registered"):
        tasks.every(stored_ids, 10, name="unregistered")
    with pytest.raises(TypeError, match="argument 1"):
        tasks.every(report, 10, object(), name="unencodable")
    with pytest.raises(ValueError, match=r"at least 0\.001 s"):
        tasks.every(report, 0.0001, "eu", name="fast")
    with pytest.raises(ValueError, match=r"'skip'.*'run_once'"):
        tasks.every(report, 10, "eu", name="missed", missed="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"every\(\): the schedule name must be a non-empty string, got ''"):
        tasks.every(report, 10, "eu", name="")
    with pytest.raises(ValueError, match=r"schedule\(\): the schedule name must not be blank, got ' '"):
        tasks.schedule(report, "* * * * *", "eu", name=" ")
    with pytest.raises(TypeError, match=r"every\(\): the schedule name must be a non-empty string, got 5"):
        tasks.every(report, 10, "eu", name=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"every\(\): the interval must be a number of seconds"):
        tasks.every(report, "10", "eu", name="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"every\(\): the interval must be a finite number of seconds"):
        tasks.every(report, float("inf"), "eu", name="forever")
    assert [info.name for info in tasks.schedules()] == ["leap-day", "tick"]
    # A name no worker of this process registered is accepted, like enqueue by name.
    assert tasks.every("other.app.job", 60, 1, name="remote").task_name == "other.app.job"


def test_a_cron_schedule_without_croniter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "croniter", None)
    tasks = make_tasks(MemoryBackend(), ManualClock(T0))
    with pytest.raises(ImportError, match=r"anyio-lifecycle\[cron\]"):
        tasks.schedule(report, "* * * * *", "eu", name="cron")
    assert tasks.every(report, 60, "eu", name="interval").kind == "every"  # intervals need no extra


async def test_a_backend_failure_is_retried_and_the_fire_time_still_enqueued() -> None:
    class Flaky(MemoryBackend):
        failures = 1

        async def enqueue_many(self, tasks: Any, *, if_exists: Any = "error") -> list[str]:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("backend briefly unreachable")
            return await super().enqueue_many(tasks, if_exists=if_exists)

    clock = ManualClock(T0)
    tasks = make_tasks(Flaky(), clock)
    tasks.every(report, 10, "eu", name="tick")
    async with executing(tasks):
        clock.advance(10)
        await handled([tasks], "tick", T0 + 10)
        assert await stored_ids(tasks) == [fire_task_id("tick", T0 + 10)]
