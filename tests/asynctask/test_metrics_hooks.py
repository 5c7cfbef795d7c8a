"""AsyncTasks(metrics=...): the engine reports enqueues, attempts, outcomes and run times to its observer.

Known workloads run through a real AsyncTasks on MemoryBackend with a manual clock (task functions advance it,
so run times are exact), on asyncio and trio; values are read back through the Prometheus text exposition,
also over a real socket from HealthServer's /metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import lifecycle
from lifecycle import Backoff, Metrics
from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    ManualClock,
    MemoryBackend,
    TaskContext,
    TaskObserver,
    TaskState,
)
from lifecycle.tasks import HealthServer

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

WAIT = 20.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition as ``{(name, sorted labels): value}``."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(metrics: Metrics) -> Samples:
    body, _ = await metrics.exposition()
    return parse(body.decode())


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def engine(clock: ManualClock, **options: Any) -> AsyncTasks:
    """An AsyncTasks on MemoryBackend (or ``backend=``) driven by ``clock``: immediate retries, one task at a
    time (so each run time is exactly what its function advanced the clock by), periodic upkeep out of the
    way."""
    settings: dict[str, Any] = {
        "clock": clock,
        "concurrency": 1,
        "retry_backoff": Backoff(initial=0.0, cap=0.0, jitter=False),
        "poll_interval": 0.05,
        "recovery_interval": 3600.0,
        "retention_interval": 3600.0,
        **options,
    }
    backend = settings.pop("backend", None) or MemoryBackend(clock=clock)
    return AsyncTasks(backend, **settings)


@contextlib.asynccontextmanager
async def working(tasks: AsyncTasks) -> AsyncIterator[None]:
    """Open ``tasks`` and run its worker for the block; then cancel ``execute`` (drain) as a manager does."""
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        try:
            yield
        finally:
            group.cancel_scope.cancel()


class Recorder:
    """A TaskObserver that records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def enqueued(self, queue: str, task: str, count: int = 1) -> None:
        self.calls.append(("enqueued", queue, task, count))

    def started(self, queue: str, task: str) -> None:
        self.calls.append(("started", queue, task))

    def finished(self, queue: str, task: str, outcome: str, seconds: float) -> None:
        self.calls.append(("finished", queue, task, outcome, round(seconds, 6)))


async def test_counters_histograms_and_depths_after_a_known_workload() -> None:
    # 3 succeed; 2 fail once then succeed (2 retried); 2 fail twice (2 retried, then 2 dead).
    clock = ManualClock(1_000_000.0)
    metrics = Metrics(lifecycle.TaskManager(name="svc"))
    tasks = engine(clock, metrics=metrics)

    @tasks.register(name="ok")
    async def ok() -> None:
        clock.advance(0.04)

    @tasks.register(name="flaky", max_retries=2)
    async def flaky(ctx: TaskContext) -> None:
        clock.advance(2.0)
        if ctx.attempt == 1:
            raise ConnectionError("first attempt fails")

    @tasks.register(name="doomed", max_retries=1)
    async def doomed() -> None:
        clock.advance(30.0)
        raise ValueError("always fails")

    async with working(tasks):
        ids = [await tasks.enqueue(ok) for _ in range(3)]
        ids += await tasks.enqueue_many([Call(flaky), Call(flaky), Call(doomed), Call(doomed)])
        await tasks.enqueue_many([Call(ok, queue="low"), Call(ok, queue="low")])  # not served: pending
        with anyio.fail_after(WAIT):
            states = [(await tasks.wait(task_id)).state for task_id in ids]
        assert states == [TaskState.SUCCEEDED] * 5 + [TaskState.DEAD] * 2
        samples = await scrape(metrics)

    def value(name: str, task: str, queue: str = "default", **labels: str) -> float:
        return samples.get(key(f"lifecycle_asynctask_{name}", queue=queue, task=task, **labels), 0.0)

    assert value("enqueued_total", "ok") == 3
    assert value("enqueued_total", "ok", queue="low") == 2
    assert value("enqueued_total", "flaky") == 2
    assert value("enqueued_total", "doomed") == 2
    assert value("started_total", "ok") == 3
    assert value("started_total", "flaky") == 4
    assert value("started_total", "doomed") == 4
    assert value("started_total", "ok", queue="low") == 0
    assert (value("succeeded_total", "ok"), value("failed_total", "ok")) == (3, 0)
    assert (value("succeeded_total", "flaky"), value("retried_total", "flaky")) == (2, 2)
    assert (value("failed_total", "flaky"), value("dead_total", "flaky")) == (2, 0)
    assert (value("succeeded_total", "doomed"), value("retried_total", "doomed")) == (0, 2)
    assert (value("failed_total", "doomed"), value("dead_total", "doomed")) == (4, 2)

    assert value("run_seconds_count", "ok") == 3
    assert value("run_seconds_sum", "ok") == pytest.approx(0.12)
    assert value("run_seconds_bucket", "ok", le="0.025") == 0
    assert value("run_seconds_bucket", "ok", le="0.05") == 3
    assert value("run_seconds_count", "flaky") == 4
    assert value("run_seconds_sum", "flaky") == pytest.approx(8.0)
    assert value("run_seconds_bucket", "flaky", le="1.0") == 0
    assert value("run_seconds_bucket", "flaky", le="2.5") == 4
    assert value("run_seconds_sum", "doomed") == pytest.approx(120.0)
    assert value("run_seconds_bucket", "doomed", le="10.0") == 0
    assert value("run_seconds_bucket", "doomed", le="+Inf") == 4

    depth = "lifecycle_asynctask_queue_depth"  # tracked automatically by metrics=
    assert samples[key(depth, queue="default", state="succeeded")] == 5
    assert samples[key(depth, queue="default", state="dead")] == 2
    assert samples[key(depth, queue="default", state="pending")] == 0
    assert samples[key(depth, queue="low", state="pending")] == 2


async def test_health_server_serves_the_async_task_metrics_at_slash_metrics() -> None:
    clock = ManualClock(1_000_000.0)
    ready = anyio.Event()

    def on_event(event: lifecycle.LifecycleEvent) -> None:
        if event.kind is lifecycle.EventKind.READY:
            ready.set()

    manager = lifecycle.TaskManager(name="svc", on_event=on_event)
    metrics = Metrics(manager)
    tasks = engine(clock, metrics=metrics)

    @tasks.register(name="greet")
    async def greet(who: str) -> str:
        clock.advance(0.3)
        return f"hello {who}"

    server = HealthServer(manager, port=0, metrics=metrics)
    manager.add_task("health", server)
    manager.add_task("async-tasks", tasks)
    body = ""

    async def client() -> None:
        nonlocal body
        with anyio.fail_after(WAIT):
            await ready.wait()
            task_id = await tasks.enqueue(greet, "world")
            assert (await tasks.wait(task_id)).result == "hello world"
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(b"GET /metrics HTTP/1.1\r\nHost: probe\r\n\r\n")
                data = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        data += await stream.receive()
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        body = payload.decode()
        manager.shutdown()

    async with anyio.create_task_group() as group:
        group.start_soon(client)
        await manager.run()
    samples = parse(body)
    labels = {"queue": "default", "task": "greet"}
    assert samples[key("lifecycle_asynctask_enqueued_total", **labels)] == 1
    assert samples[key("lifecycle_asynctask_started_total", **labels)] == 1
    assert samples[key("lifecycle_asynctask_succeeded_total", **labels)] == 1
    assert samples[key("lifecycle_asynctask_run_seconds_sum", **labels)] == pytest.approx(0.3)
    assert samples[key("lifecycle_asynctask_queue_depth", queue="default", state="succeeded")] == 1
    assert samples[key("lifecycle_manager_ready", manager="svc")] == 1


async def test_a_custom_observer_sees_each_attempt_in_order() -> None:
    clock = ManualClock(1_000_000.0)
    recorder = Recorder()
    assert isinstance(recorder, TaskObserver)
    tasks = engine(clock, metrics=recorder, queues=["q"])

    @tasks.register(name="twice", queue="q", max_retries=1)
    async def twice(ctx: TaskContext) -> None:
        clock.advance(1.5)
        if ctx.attempt == 1:
            raise RuntimeError("once more")

    async with working(tasks):
        task_id = await tasks.enqueue(twice)
        with anyio.fail_after(WAIT):
            assert (await tasks.wait(task_id)).state is TaskState.SUCCEEDED
    assert recorder.calls == [
        ("enqueued", "q", "twice", 1),
        ("started", "q", "twice"),
        ("finished", "q", "twice", "retried", 1.5),
        ("started", "q", "twice"),
        ("finished", "q", "twice", "succeeded", 1.5),
    ]


async def test_an_attempt_lost_with_its_worker_counts_as_failed_when_recovered() -> None:
    clock = ManualClock(1_000_000.0)
    recorder = Recorder()
    tasks = engine(clock, metrics=recorder, lease=30.0)

    @tasks.register(name="job", max_retries=1)
    async def job() -> None:
        pass

    async with tasks:
        task_id = await tasks.enqueue(job)
        # A worker in another process claims it, then dies: its attempt is never reported here...
        claimed = await tasks.backend.claim(["default"], 1, now=clock(), lease_until=clock() + 30.0)
        assert [c.record.id for c in claimed] == [task_id]
    async with working(tasks):
        clock.advance(31.0)  # ...until its lease expired and this worker recovers the task
        assert await tasks.recover_expired() == 1
        with anyio.fail_after(WAIT):
            assert (await tasks.wait(task_id)).state is TaskState.SUCCEEDED
    assert recorder.calls == [
        ("enqueued", "default", "job", 1),
        ("finished", "default", "job", "retried", 31.0),  # from the lost attempt's start to its recovery
        ("started", "default", "job"),
        ("finished", "default", "job", "succeeded", 0.0),
    ]


async def test_an_attempt_released_at_shutdown_is_started_but_has_no_outcome() -> None:
    clock = ManualClock(1_000_000.0)
    recorder = Recorder()
    tasks = engine(clock, metrics=recorder, shutdown_grace=0.0)
    running = anyio.Event()

    @tasks.register(name="forever")
    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    async with working(tasks):
        task_id = await tasks.enqueue(forever)
        with anyio.fail_after(WAIT):
            await running.wait()
    async with tasks:
        info = await tasks.info(task_id)
    assert info is not None
    assert (info.state, info.attempts) == (TaskState.PENDING, 0)  # refunded
    assert recorder.calls == [("enqueued", "default", "forever", 1), ("started", "default", "forever")]


async def test_a_failing_observer_never_breaks_the_work(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def enqueued(self, queue: str, task: str, count: int = 1) -> None:
            raise RuntimeError("enqueued broke")

        def started(self, queue: str, task: str) -> None:
            raise RuntimeError("started broke")

        def finished(self, queue: str, task: str, outcome: str, seconds: float) -> None:
            raise RuntimeError("finished broke")

    clock = ManualClock(1_000_000.0)
    tasks = engine(clock, metrics=Broken())

    @tasks.register(name="fine")
    async def fine() -> int:
        return 7

    with caplog.at_level(logging.WARNING, logger="lifecycle.asynctask"):
        async with working(tasks):
            task_id = await tasks.enqueue(fine)
            with anyio.fail_after(WAIT):
                info = await tasks.wait(task_id)
    assert (info.state, info.result) == (TaskState.SUCCEEDED, 7)
    for method in ("enqueued", "started", "finished"):
        assert f"failed in {method}(); ignored" in caplog.text


async def test_queue_depths_are_skipped_quietly_while_the_backend_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(lifecycle.TaskManager(name="svc"))
    tasks = AsyncTasks(MemoryBackend(), execution=False, metrics=metrics.async_tasks)

    @tasks.register(name="noop")
    async def noop() -> None: ...

    with caplog.at_level(logging.WARNING):
        before = await scrape(metrics)  # not initialized yet: no stats() call, no warning
        async with tasks:
            await tasks.enqueue(noop)
            during = await scrape(metrics)
        await scrape(metrics)  # closed again
    assert "could not read the queue depths" not in caplog.text
    assert key("lifecycle_asynctask_queue_depth", queue="default", state="pending") not in before
    assert during[key("lifecycle_asynctask_queue_depth", queue="default", state="pending")] == 1
    assert during[key("lifecycle_asynctask_enqueued_total", queue="default", task="noop")] == 1


async def test_chain_steps_are_counted_as_they_are_stored() -> None:
    clock = ManualClock(1_000_000.0)
    recorder = Recorder()
    tasks = engine(clock, metrics=recorder, queues=["default", "math"])

    @tasks.register(name="fetch")
    async def fetch() -> int:
        return 2

    @tasks.register(name="double", queue="math")
    async def double(ctx: TaskContext) -> int:
        doubled: int = 2 * ctx.previous_result
        return doubled

    async with tasks, anyio.create_task_group() as group:
        chain_id = await tasks.enqueue_chain([Call(fetch), Call(double)])
        assert recorder.calls == [("enqueued", "default", "fetch", 1)], "the first step is stored at once"
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            info = await tasks.wait(chain_id)
        assert (info.state, info.result) == (TaskState.SUCCEEDED, 4)
        group.cancel_scope.cancel()
    enqueued = [call for call in recorder.calls if call[0] == "enqueued"]
    assert enqueued == [("enqueued", "default", "fetch", 1), ("enqueued", "math", "double", 1)]


async def test_a_schedule_fire_is_counted_once_by_the_scheduler_that_stored_it() -> None:
    clock = ManualClock(1_000_000.0)  # a multiple of the interval
    backend = MemoryBackend(clock=clock)
    recorders = [Recorder(), Recorder()]
    both = [engine(clock, metrics=recorder, backend=backend, execution=False) for recorder in recorders]
    for tasks in both:
        tasks.register(report, name="report")
        tasks.every(report, 10, "eu", name="tick")
    async with contextlib.AsyncExitStack() as stack:
        for tasks in both:
            await stack.enter_async_context(working(tasks))
        with anyio.fail_after(WAIT):
            for tasks in both:
                await tasks._scheduler.wait_for("tick", lambda schedule: schedule.next_fire is not None)
            for fire in (1_000_010.0, 1_000_020.0):
                clock.set(fire)
                for tasks in both:
                    await tasks._scheduler.wait_handled("tick", fire)
        assert len(await backend.list_records(limit=10)) == 2
    counted = [call for recorder in recorders for call in recorder.calls]
    assert counted == [("enqueued", "default", "report", 1)] * 2, "one count per stored fire time"


async def report(region: str) -> str:
    return region


async def test_any_object_holding_an_observer_in_async_tasks_is_accepted_as_metrics() -> None:
    # What lifecycle.Metrics offers, duck-typed: the durable-task layer does not import the metrics layer.
    class Holder:
        def __init__(self) -> None:
            self.async_tasks = Recorder()

    holder = Holder()
    tasks = AsyncTasks(MemoryBackend(), metrics=holder)

    @tasks.register(name="held")
    async def held() -> None: ...

    async with tasks:
        await tasks.enqueue(held)
    assert holder.async_tasks.calls == [("enqueued", "default", "held", 1)]


def test_metrics_must_be_metrics_or_an_observer() -> None:
    with pytest.raises(TypeError, match=r"metrics must be a lifecycle\.Metrics, its \.async_tasks, or"):
        AsyncTasks(MemoryBackend(), metrics=object())  # type: ignore[arg-type]
    assert AsyncTasks(MemoryBackend(), metrics=None)._observer is None


async def test_flow_control_metrics_count_waiting_tasks_refused_starts_and_paused_queues() -> None:
    clock = ManualClock(1_000_000.0)
    metrics = Metrics(lifecycle.TaskManager(name="svc"))
    tasks = engine(clock, metrics=metrics, concurrency=4)

    @tasks.register(name="rated", rate_limit="1/h")
    async def rated() -> None: ...

    async with working(tasks):
        ids = await tasks.enqueue_many([Call(rated) for _ in range(3)])
        with anyio.fail_after(WAIT):
            assert (await tasks.wait(ids[0])).state is TaskState.SUCCEEDED
            while (await tasks.info(ids[1])).waiting_on != "rate_limit":  # type: ignore[union-attr]
                await anyio.sleep(0.01)
        await tasks.pause("elsewhere")
        samples = await scrape(metrics)
        assert samples[key("lifecycle_asynctask_waiting", task="rated", reason="rate_limit")] == 2
        assert samples[key("lifecycle_asynctask_waiting", task="rated", reason="max_running")] == 0
        assert samples[key("lifecycle_asynctask_rate_limited_total", task="rated")] >= 1
        assert samples[key("lifecycle_asynctask_queue_paused", queue="elsewhere")] == 1
        assert samples[key("lifecycle_asynctask_queue_paused", queue="default")] == 0
        await tasks.resume("elsewhere")
        for task_id in ids[1:]:  # a bucket of one token: one more start per hour
            clock.advance(3600)
            with anyio.fail_after(WAIT):
                assert (await tasks.wait(task_id)).state is TaskState.SUCCEEDED
        samples = await scrape(metrics)
        assert samples[key("lifecycle_asynctask_waiting", task="rated", reason="rate_limit")] == 0
        assert samples[key("lifecycle_asynctask_queue_paused", queue="elsewhere")] == 0


async def test_running_tasks_cancelled_and_groups_finished_are_counted() -> None:
    clock = ManualClock(1_000_000.0)
    metrics = Metrics(lifecycle.TaskManager())
    tasks = engine(clock, metrics=metrics, concurrency=4)
    started = anyio.Event()

    @tasks.register(name="endless")
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    @tasks.register(name="part")
    async def part(n: int) -> int:
        if n < 0:
            raise lifecycle.asynctask.Abort("negative")
        return n

    async with working(tasks):
        task_id = await tasks.enqueue(endless)
        with anyio.fail_after(WAIT):
            await started.wait()
        assert await tasks.cancel(task_id)
        with anyio.fail_after(WAIT):
            assert (await tasks.wait(task_id)).state is TaskState.CANCELLED
        won = await tasks.enqueue_group([Call(part, 1), Call(part, 2)], then=Call(part, 3))
        lost = await tasks.enqueue_group([Call(part, -1), Call(part, 2)])
        pending = await tasks.enqueue_group([Call(part, 5, delay=600)])
        with anyio.fail_after(WAIT):
            for group_id in (won, lost):
                await tasks.wait_group(group_id)
        info = await tasks.group_info(pending)
        assert info is not None
        assert await tasks.cancel(info.task_ids[0])
        with anyio.fail_after(WAIT):
            while not await groups_counted(metrics, ("succeeded", "dead")):
                await anyio.sleep(0.01)  # the group counter is fed after the verdicts were saved
    samples = await scrape(metrics)
    assert samples[key("lifecycle_asynctask_cancelled_total", queue="default", task="endless")] == 1
    assert key("lifecycle_asynctask_failed_total", queue="default", task="endless") not in samples
    finished = {
        outcome: samples.get(key("lifecycle_asynctask_groups_finished_total", outcome=outcome))
        for outcome in ("succeeded", "dead", "cancelled")
    }
    assert finished == {"succeeded": 1, "dead": 1, "cancelled": 1}, "each group is counted once, when it ends"


async def groups_counted(metrics: Metrics, outcomes: tuple[str, ...]) -> bool:
    samples = await scrape(metrics)
    return all(samples.get(key("lifecycle_asynctask_groups_finished_total", outcome=o)) for o in outcomes)
