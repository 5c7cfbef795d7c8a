"""AsyncTasks: options, enqueue checks before anything is stored, the Task stages under a manager."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import anyio
import pytest

import lifecycle
from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    JSONEncoding,
    ManualClock,
    MemoryBackend,
    NewTask,
    QueueStats,
    TaskContext,
    TaskState,
)

T0 = 1_700_000_000.0


async def job(ctx: TaskContext, key: str, items: list[Any]) -> str:
    return key


async def no_args() -> None: ...


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def tasks(clock: ManualClock) -> Any:
    tasks = AsyncTasks(MemoryBackend(), clock=clock, execution=False)
    tasks.register(job, name="app.job", queue="jobs", max_retries=3, timeout=9)
    async with tasks:
        yield tasks


async def stored(tasks: AsyncTasks, task_id: str) -> Any:
    record = await tasks.backend.get(task_id)
    assert record is not None
    return record


async def test_enqueue_stores_the_call_with_the_registered_defaults(tasks: AsyncTasks) -> None:
    task_id = await tasks.enqueue(job, "k", ["r"])
    record = await stored(tasks, task_id)
    assert (record.name, record.queue, record.max_retries, record.timeout) == ("app.job", "jobs", 3, 9.0)
    assert (record.enqueued_at, record.run_at, record.state) == (T0, T0, TaskState.PENDING)
    assert tasks.encoding.decode(record.payload) == ("k", ["r"])
    assert len(task_id) == 32


async def test_enqueue_options_override_the_defaults(tasks: AsyncTasks) -> None:
    task_id = await tasks.enqueue(
        job,
        "k",
        [],
        queue="other",
        max_retries=0,
        timeout=timedelta(seconds=2),
        delay=timedelta(minutes=1),
        task_id="mine",
    )
    assert task_id == "mine"
    record = await stored(tasks, task_id)
    assert (record.queue, record.max_retries, record.timeout, record.run_at) == ("other", 0, 2.0, T0 + 60)
    at = await tasks.enqueue(job, "k", [], at=datetime.fromtimestamp(T0 + 3600, timezone.utc))
    assert (await stored(tasks, at)).run_at == T0 + 3600
    epoch = await tasks.enqueue(job, "k", [], at=T0 + 5)
    assert (await stored(tasks, epoch)).run_at == T0 + 5


async def test_enqueue_by_name_of_an_unknown_function_only_checks_encodability(tasks: AsyncTasks) -> None:
    task_id = await tasks.enqueue("elsewhere.job", 1, 2, 3)
    record = await stored(tasks, task_id)
    assert (record.name, record.queue, record.max_retries, record.timeout) == (
        "elsewhere.job",
        "default",
        5,
        None,
    )
    with pytest.raises(TypeError, match="argument 2: cannot encode"):
        await tasks.enqueue("elsewhere.job", 1, object())


async def test_enqueue_by_registered_name_checks_the_arity(tasks: AsyncTasks) -> None:
    with pytest.raises(TypeError, match=r"task 'app.job' takes 2 arguments \(key, items\) but 1 was given"):
        await tasks.enqueue("app.job", "k")


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        (("k",), {}, TypeError, r"takes 2 arguments \(key, items\) but 1 was given"),
        (("k", [], 3), {}, TypeError, "but 3 were given"),
        (("k", [1j]), {}, TypeError, r"argument 2 \(items\): cannot encode builtins.complex"),
        (("k", []), {"delay": 1, "at": T0}, TypeError, "pass delay= or at=, not both"),
        (("k", []), {"delay": -1}, ValueError, r"enqueue\('app.job'\): delay must be a finite number of sec"),
        (("k", []), {"delay": "soon"}, TypeError, r"enqueue\('app.job'\): delay must be a number of seconds"),
        (("k", []), {"at": datetime(2030, 1, 1)}, ValueError, "has no timezone"),
        (("k", []), {"at": "tomorrow"}, TypeError, "at must be an aware datetime or seconds since the epoch"),
        (("k", []), {"at": float("inf")}, ValueError, "at must be a finite number of seconds since"),
        (("k", []), {"queue": ""}, ValueError, "the queue name must be a non-empty string, got ''"),
        (("k", []), {"queue": 5}, TypeError, "the queue name must be a non-empty string, got 5"),
        (("k", []), {"max_retries": -2}, ValueError, "max_retries must be at least 0, got -2"),
        (("k", []), {"max_retries": True}, TypeError, r"max_retries must be a whole number .*got True"),
        (("k", []), {"timeout": -2}, ValueError, "timeout must be a finite number of seconds greater"),
        (("k", []), {"timeout": float("inf")}, ValueError, r"than zero, got inf \(or None for no limit"),
        (("k", []), {"task_id": ""}, ValueError, "task_id must be a non-empty string, got ''"),
        (("k", []), {"task_id": 5}, TypeError, "task_id must be a non-empty string, got 5"),
    ],
)
async def test_bad_enqueues_raise_before_anything_is_stored(
    tasks: AsyncTasks, args: tuple[Any, ...], options: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        await tasks.enqueue(job, *args, **options)
    assert await tasks.list() == []


async def test_enqueue_of_an_unregistered_function_says_to_register_it(tasks: AsyncTasks) -> None:
    with pytest.raises(TypeError, match=r"no_args is not registered with this AsyncTasks: decorate it"):
        await tasks.enqueue(no_args)


async def test_enqueue_many_is_all_or_nothing(tasks: AsyncTasks) -> None:
    with pytest.raises(TypeError, match="cannot encode"):
        await tasks.enqueue_many([Call(job, "a", []), Call(job, "b", [object()])])
    assert await tasks.list() == []
    ids = await tasks.enqueue_many([Call(job, "a", []), Call("app.job", "b", [], delay=5)])
    assert [info.id for info in await tasks.list()] == ids[::-1]
    assert await tasks.enqueue_many([]) == []
    with pytest.raises(TypeError, match="takes Call objects"):
        await tasks.enqueue_many([job])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="for one call use enqueue"):
        await tasks.enqueue_many(Call(job, "a", []))  # type: ignore[arg-type]


async def test_connection_needs_a_transactional_backend(tasks: AsyncTasks) -> None:
    with pytest.raises(TypeError, match="MemoryBackend cannot: drop connection="):
        await tasks.enqueue(job, "k", [], connection=object())


class RecordingTransactionalBackend(MemoryBackend):
    """A MemoryBackend that also offers enqueue_many_in (records what joined which "transaction")."""

    def __init__(self) -> None:
        super().__init__()
        self.joined: list[tuple[object, list[str]]] = []

    async def enqueue_many_in(
        self, connection: object, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip"] = "error"
    ) -> list[str]:
        self.joined.append((connection, [task.id for task in tasks]))
        return [task.id for task in tasks]


async def test_connection_goes_to_enqueue_many_in_of_a_transactional_backend() -> None:
    backend = RecordingTransactionalBackend()
    tasks = AsyncTasks(backend, execution=False)
    tasks.register(job, name="app.job")
    transaction = object()
    task_id = await tasks.enqueue(job, "k", [], connection=transaction)  # no open() needed for this path
    assert backend.joined == [(transaction, [task_id])]
    assert await backend.get(task_id) is None, "only the caller's transaction stores it"


async def test_operations_before_the_backend_is_open_say_how_to_start() -> None:
    tasks = AsyncTasks(MemoryBackend())
    tasks.register(job, name="app.job")
    with pytest.raises(RuntimeError, match=r"AsyncTasks.enqueue\(\) before the backend is open: add"):
        await tasks.enqueue(job, "k", [])
    with pytest.raises(RuntimeError, match="before the backend is open"):
        await tasks.stats()


async def test_cancel_requeue_purge_and_wait_on_an_enqueue_only_instance(
    tasks: AsyncTasks, clock: ManualClock
) -> None:
    task_id = await tasks.enqueue(job, "k", [], delay=60)
    assert await tasks.cancel(task_id)
    info = await tasks.wait(task_id, timeout=5)
    assert (info.state, info.finished_at) == (TaskState.CANCELLED, T0)
    assert await tasks.requeue(task_id), "a cancelled task can be requeued by id"
    assert (await stored(tasks, task_id)).run_at == T0
    with pytest.raises(TimeoutError):
        await tasks.wait(task_id, timeout=0.05)
    clock.advance(10)
    assert await tasks.purge("pending", older_than=5) == 1
    with pytest.raises(LookupError, match="no task with id"):
        await tasks.wait(task_id, timeout=5)
    with pytest.raises(ValueError, match="cannot delete active tasks"):
        await tasks.purge([TaskState.ACTIVE, TaskState.DEAD])
    with pytest.raises(ValueError, match="unknown task state"):
        await tasks.list(state="finished")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"concurrency": 0}, ValueError, "concurrency must be at least 1, got 0"),
        ({"concurrency": 2.0}, TypeError, r"concurrency must be a whole number of at least 1 \(an int\)"),
        ({"queues": "default"}, TypeError, r"write queues=\['default'\]"),
        ({"queues": []}, ValueError, "queues is empty"),
        ({"queues": ["a", "a"]}, ValueError, "lists 'a' more than once"),
        ({"queues": ["a", 3]}, TypeError, "queues: a queue name must be a non-empty string, got 3"),
        ({"queues": ["a", ""]}, ValueError, "queues: a queue name must be a non-empty string, got ''"),
        ({"queues": {"a": 0}}, ValueError, "queues: the weight of queue 'a' must be at least 1, got 0"),
        ({"queues": {"a": 1.5}}, TypeError, "queues: the weight of queue 'a' must be a whole number"),
        ({"lease": 0}, ValueError, "lease must be a finite number of seconds greater than zero, got 0"),
        ({"lease": "30"}, TypeError, "lease must be a number of seconds greater than zero"),
        ({"poll_interval": float("inf")}, ValueError, "poll_interval must be a finite number of seconds"),
        ({"recovery_interval": float("nan")}, ValueError, "recovery_interval must be a finite number"),
        ({"retention_interval": -1}, ValueError, "retention_interval must be a finite number"),
        ({"shutdown_grace": -1}, ValueError, "shutdown_grace must be a finite number of seconds zero"),
        ({"retention": {"dead": float("inf")}}, ValueError, r"retention\['dead'\] .* \(or None for no limit"),
        ({"retention": {"pending": 5}}, ValueError, "pending tasks are not finished"),
        ({"retention": {"done": 5}}, ValueError, "unknown state 'done'"),
        ({"encoding": object()}, TypeError, "encoding must have encode"),
        ({"on_error": 3}, TypeError, "on_error must be a callable"),
        ({"retry_backoff": 3}, TypeError, "retry_backoff must be a lifecycle.Backoff"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        AsyncTasks(MemoryBackend(), **options)


def test_the_backend_must_be_a_backend() -> None:
    with pytest.raises(TypeError, match=r"AsyncTasks needs a Backend \(MemoryBackend\(\), SQLiteBackend"):
        AsyncTasks("sqlite:///tasks.db")  # type: ignore[arg-type]


def test_properties_describe_the_configuration() -> None:
    encoding = JSONEncoding()
    tasks = AsyncTasks(MemoryBackend(), encoding=encoding, queues={"a": 3, "b": 1}, concurrency=7)
    assert (tasks.encoding, tasks.queues, tasks.concurrency, tasks.execution) == (
        encoding,
        ("a", "b"),
        7,
        True,
    )
    assert isinstance(tasks, lifecycle.Task)


async def test_under_a_task_manager_tasks_run_and_shutdown_drains() -> None:
    tasks = AsyncTasks(MemoryBackend(), shutdown_grace=0.05, poll_interval=0.05)
    started = anyio.Event()

    @tasks.register(name="app.quick")
    async def quick(value: int) -> int:
        return value + 1

    @tasks.register(name="app.stuck")
    async def stuck() -> None:
        started.set()
        await anyio.sleep_forever()

    executing = anyio.Event()

    def on_event(event: lifecycle.LifecycleEvent) -> None:
        if event.kind is lifecycle.EventKind.TASK_EXECUTING and event.task_name == "async-tasks":
            executing.set()

    manager = lifecycle.TaskManager(name="tasks-test", on_event=on_event)
    manager.add_task("async-tasks", tasks)

    async with anyio.create_task_group() as group:
        group.start_soon(manager.run)
        with anyio.fail_after(10):
            await executing.wait()
            quick_id = await tasks.enqueue(quick, 41)
            info = await tasks.wait(quick_id, timeout=10)
            stuck_id = await tasks.enqueue(stuck)
            await started.wait()
            manager.shutdown()
    assert (info.state, info.result) == (TaskState.SUCCEEDED, 42)
    async with tasks:  # the manager closed it; reopen the same storage to look
        stuck_info = await tasks.info(stuck_id)
    assert stuck_info is not None
    assert (stuck_info.state, stuck_info.attempts) == (TaskState.PENDING, 0)


async def test_execute_without_execution_waits_until_cancelled(tasks: AsyncTasks) -> None:
    with anyio.move_on_after(0.05) as scope:
        await tasks.execute()
    assert scope.cancelled_caught


async def test_two_async_tasks_over_two_backends_never_interfere() -> None:
    first, second = (
        AsyncTasks(MemoryBackend(), poll_interval=0.05),
        AsyncTasks(MemoryBackend(), poll_interval=0.05),
    )
    ran: list[str] = []

    async def record(where: str) -> None:
        ran.append(where)

    first.register(record, name="record")
    second.register(record, name="record")
    async with first, second, anyio.create_task_group() as group:
        group.start_soon(first.execute)
        task_id = await first.enqueue(record, "first")
        await first.wait(task_id, timeout=10)
        assert await second.info(task_id) is None
        assert await second.stats() == {}
        group.cancel_scope.cancel()
    assert ran == ["first"]


async def test_configure_worker_sets_the_concurrency_and_queues_the_worker_uses() -> None:
    tasks = AsyncTasks(MemoryBackend(), poll_interval=0.05)
    tasks.configure_worker(concurrency=2, queues=["fast"])
    assert (tasks.concurrency, tasks.queues) == (2, ("fast",))
    release = anyio.Event()
    two_running = anyio.Event()
    running = 0

    @tasks.register(name="app.blocking", queue="fast")
    async def blocking() -> None:
        nonlocal running
        running += 1
        if running == 2:
            two_running.set()
        await release.wait()

    async with tasks, anyio.create_task_group() as group:
        fast = await tasks.enqueue_many([Call(blocking) for _ in range(3)])
        elsewhere = await tasks.enqueue(blocking, queue="default")
        group.start_soon(tasks.execute)
        with anyio.fail_after(10):
            await two_running.wait()
            stats = await tasks.stats()
            assert (stats["fast"].active, stats["fast"].pending) == (2, 1), "concurrency=2 is the limit"
            release.set()
            for task_id in fast:
                assert (await tasks.wait(task_id)).state is TaskState.SUCCEEDED
        info = await tasks.info(elsewhere)
        assert info is not None
        assert info.state is TaskState.PENDING, "a queue the worker was not configured for is not served"
        group.cancel_scope.cancel()


async def test_configure_worker_keeps_unset_values_and_takes_weighted_queues() -> None:
    tasks = AsyncTasks(MemoryBackend(), concurrency=3, queues=["a", "b"])
    tasks.configure_worker()
    assert (tasks.concurrency, tasks.queues) == (3, ("a", "b"))
    tasks.configure_worker(queues={"x": 2, "y": 1})
    assert (tasks.concurrency, tasks.queues) == (3, ("x", "y"))
    tasks.configure_worker(concurrency=9)
    assert (tasks.concurrency, tasks.queues) == (9, ("x", "y"))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"concurrency": 0}, ValueError, "concurrency must be at least 1, got 0"),
        ({"concurrency": True}, TypeError, r"concurrency must be a whole number .*got True"),
        ({"concurrency": 2, "queues": "fast"}, TypeError, r"write queues=\['fast'\]"),
        ({"concurrency": 2, "queues": []}, ValueError, "queues is empty"),
        ({"concurrency": 2, "queues": {"a": -1}}, ValueError, "the weight of queue 'a' must be at least 1"),
    ],
)
def test_configure_worker_checks_like_the_constructor_and_changes_nothing_on_error(
    options: dict[str, Any], error: type, message: str
) -> None:
    tasks = AsyncTasks(MemoryBackend(), concurrency=4, queues=["default"])
    with pytest.raises(error, match=message):
        tasks.configure_worker(**options)
    assert (tasks.concurrency, tasks.queues) == (4, ("default",))


async def test_configure_worker_is_refused_once_execute_started() -> None:
    tasks = AsyncTasks(MemoryBackend(), poll_interval=0.05)

    @tasks.register(name="app.quick")
    async def quick() -> None: ...

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        with anyio.fail_after(10):
            await tasks.wait(await tasks.enqueue(quick))  # the worker runs
        with pytest.raises(RuntimeError, match=r"before execute\(\) starts"):
            tasks.configure_worker(concurrency=1)
        group.cancel_scope.cancel()
    with pytest.raises(RuntimeError, match="pass concurrency= and queues= to AsyncTasks"):
        tasks.configure_worker(queues=["other"])  # nor after it stopped
    assert (tasks.concurrency, tasks.queues) == (10, ("default",))


async def test_nul_characters_are_refused_before_anything_reaches_the_backend(tasks: AsyncTasks) -> None:
    # PostgreSQL cannot store a NUL in text, SQLite and Redis could: the engine refuses it for all alike.
    nul = "a\x00b"
    refused = re.escape(" must not contain NUL characters ('\\x00'), got 'a\\x00b'")
    with pytest.raises(ValueError, match=r"register\(job\(\)\): the task name" + refused):
        tasks.register(job, name=nul)
    with pytest.raises(ValueError, match=r"register\(no_args\(\)\): the queue name" + refused):
        tasks.register(no_args, name="q.nul", queue=nul)
    with pytest.raises(ValueError, match=r"enqueue\(\): the task name" + refused):
        await tasks.enqueue(nul)
    with pytest.raises(ValueError, match=r"enqueue\('app.job'\): the queue name" + refused):
        await tasks.enqueue(job, "k", [], queue=nul)
    with pytest.raises(ValueError, match=r"enqueue\('app.job'\): task_id" + refused):
        await tasks.enqueue(job, "k", [], task_id=nul)
    with pytest.raises(ValueError, match=refused):
        await tasks.enqueue_many([Call(job, "k", []), Call(job, "k", [], task_id=nul)])
    with pytest.raises(ValueError, match="queues: a queue name" + refused):
        AsyncTasks(MemoryBackend(), queues=["default", nul])
    for operation in (tasks.info, tasks.cancel, tasks.requeue, tasks.wait):
        name = operation.__name__
        with pytest.raises(ValueError, match=rf"AsyncTasks.{name}\(\): the task id" + refused):
            await operation(nul)
    for listing in (tasks.list, tasks.requeue_dead):
        with pytest.raises(ValueError, match=r"the queue name" + refused):
            await listing(queue=nul)
    with pytest.raises(ValueError, match=r"AsyncTasks.purge\(\): the queue name" + refused):
        await tasks.purge("dead", queue=nul)
    assert await tasks.stats() == {}, "nothing was stored"


async def test_operation_arguments_follow_the_one_validator_rule(
    tasks: AsyncTasks, clock: ManualClock
) -> None:
    # A wrong type is a TypeError, a wrong value (empty, negative, infinite) a ValueError, naming the call.
    with pytest.raises(TypeError, match=r"AsyncTasks.info\(\): the task id must be a non-empty string, got"):
        await tasks.info(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"AsyncTasks.cancel\(\): the task id must be a non-empty string"):
        await tasks.cancel("")
    with pytest.raises(TypeError, match=r"AsyncTasks.list\(\): the queue name must be a non-empty string"):
        await tasks.list(queue=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"AsyncTasks.list\(\): limit must be at least 0, got -1"):
        await tasks.list(limit=-1)
    with pytest.raises(TypeError, match=r"AsyncTasks.list\(\): offset must be a whole number"):
        await tasks.list(offset=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"purge\(\): older_than must be a finite number of seconds zero"):
        await tasks.purge("dead", older_than=-1)
    with pytest.raises(TypeError, match=r"purge\(\): older_than must be a number of seconds"):
        await tasks.purge("dead", older_than="1d")  # type: ignore[arg-type]
    task_id = await tasks.enqueue(job, "k", [])
    with pytest.raises(ValueError, match=r"wait\(\): timeout must be a finite .* \(or None for no limit\)"):
        await tasks.wait(task_id, timeout=float("inf"))
    with pytest.raises(TypeError, match=r"wait\(\): timeout must be a number of seconds"):
        await tasks.wait(task_id, timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ManualClock.advance\(seconds\) must be a finite number"):
        clock.advance(-1)
    with pytest.raises(TypeError, match=r"ManualClock.advance\(seconds\) must be a number of seconds"):
        clock.advance("1")  # type: ignore[arg-type]
    assert clock.advance(timedelta(seconds=2)) == T0 + 2
    assert await tasks.stats() == {"jobs": QueueStats(pending=1)}, "nothing else was stored"


async def test_a_wait_that_times_out_says_which_task_and_its_state(tasks: AsyncTasks) -> None:
    task_id = await tasks.enqueue(job, "k", [], delay=60)
    with pytest.raises(TimeoutError) as caught:
        await tasks.wait(task_id, timeout=0)  # one read: a short timeout > 0 could pass before it answered
    assert str(caught.value) == (
        f"tasks.wait({task_id!r}, timeout=0) timed out: the task is still pending (attempt 0 of 4)"
    )


class SlowReads(MemoryBackend):
    """A store whose reads answer only after ``delay`` seconds: the read of a busy machine."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0

    async def get(self, task_id: str) -> Any:
        await anyio.sleep(self.delay)
        return await super().get(task_id)

    async def get_group(self, group_id: str) -> Any:
        await anyio.sleep(self.delay)
        return await super().get_group(group_id)


async def test_a_wait_with_timeout_0_reads_once_and_any_other_timeout_bounds_the_reads_too() -> None:
    # timeout=0 looks once, however long the read takes (it gave up without looking: its deadline had passed
    # before the first read answered); a timeout > 0 is kept even while a read does not answer.
    backend = SlowReads()
    tasks = AsyncTasks(backend, clock=ManualClock(T0), execution=False)
    tasks.register(job, name="app.job", queue="jobs")
    async with tasks:
        done = await tasks.enqueue(job, "done", [])
        assert await tasks.cancel(done)
        waiting = await tasks.enqueue(job, "waiting", [], delay=60)
        group_id = await tasks.enqueue_group([Call(job, "member", [])])
        group = await tasks.group_info(group_id)
        assert group is not None
        assert await tasks.cancel(group.task_ids[0])
        backend.delay = 0.1
        assert (await tasks.wait(done, timeout=0)).state is TaskState.CANCELLED
        assert (await tasks.wait_group(group_id, timeout=0)).state is TaskState.CANCELLED
        with pytest.raises(TimeoutError, match=r"timed out: the task is still pending \(attempt 0 of"):
            await tasks.wait(waiting, timeout=0)
        backend.delay = 3600.0
        with anyio.fail_after(30), pytest.raises(TimeoutError, match="the task's state was not read yet"):
            await tasks.wait(done, timeout=0.05)


async def test_async_with_inside_a_running_manager_leaves_the_managers_backend_open() -> None:
    closed: list[str] = []

    class Tracked(MemoryBackend):
        async def close(self) -> None:
            closed.append("closed")
            await super().close()

    tasks = AsyncTasks(Tracked(), poll_interval=0.05)

    @tasks.register(name="app.double")
    async def double(value: int) -> int:
        return value * 2

    outcome: list[object] = []

    async def producer() -> None:
        async with tasks:  # a script's habit, inside a service whose manager opened the backend
            first = await tasks.enqueue(double, 1)
        second = await tasks.enqueue(double, 2)  # the manager's backend is still open
        outcome.extend(
            [(await tasks.wait(first, timeout=10)).result, (await tasks.wait(second, timeout=10)).result]
        )
        outcome.append(list(closed))
        manager.shutdown()

    manager = lifecycle.TaskManager(name="nested-open")
    manager.add_task("async-tasks", tasks)
    manager.add_execute_task("producer", producer)
    with anyio.fail_after(10):
        await manager.run()
    assert outcome == [2, 4, []], "the inner `async with` did not close the manager's backend"
    assert closed == ["closed"], "the manager's cleanup closed it, once"
    with pytest.raises(RuntimeError, match="before the backend is open"):
        await tasks.stats()
