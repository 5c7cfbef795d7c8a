"""Prometheus metrics: values after a known workload, read back through the text exposition."""

from __future__ import annotations

import sys

import anyio
import pytest

import lifecycle
from lifecycle import EventKind, Metrics, Restart
from lifecycle._metrics import metrics_available
from tests.core.fake_timing import FakeTiming
from tests.core.lifecycle_testkit import Boom, FakeTask, Outcome, manager, run_capturing

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


async def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition as ``{(name, sorted labels): value}``."""
    body, content_type = await metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def test_manager_metrics_after_a_known_workload() -> None:
    failures = iter([Boom("1"), Boom("2")])
    steady = anyio.Event()

    async def flaky() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        steady.set()
        await anyio.sleep_forever()

    m, events = manager(name="svc", **FakeTiming().seams())
    metrics = Metrics(m)
    m.add_task("db", FakeTask("db", []))
    m.add_execute_task("flaky", flaky, restart=Restart())
    m.add_execute_task("once", _returns, lifecycle.TaskType.ERROR)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await steady.wait()
        await events.wait(EventKind.TASK_RETURNED, "once")
        request = anyio.Event()
        m.add_execute_task("request-1", request.wait)  # added while running: counted, not labelled
        await events.wait(EventKind.TASK_EXECUTING, "request-1")
        samples = await scrape(metrics)
        request.set()
        m.shutdown()
    assert await outcome.finished() is None

    assert samples[key("lifecycle_manager_ready", manager="svc")] == 1.0
    assert samples[key("lifecycle_manager_live", manager="svc")] == 1.0
    assert samples[key("lifecycle_manager_draining", manager="svc")] == 0.0
    assert samples[key("lifecycle_manager_state", manager="svc", state="running")] == 1.0
    assert samples[key("lifecycle_manager_state", manager="svc", state="stopping")] == 0.0
    assert samples[key("lifecycle_task_restarts_total", manager="svc", task="flaky")] == 2.0
    assert samples[key("lifecycle_task_restarts_total", manager="svc", task="db")] == 0.0
    assert samples[key("lifecycle_task_state", manager="svc", task="flaky", state="running")] == 1.0
    assert samples[key("lifecycle_task_state", manager="svc", task="flaky", state="failed")] == 0.0
    assert samples[key("lifecycle_task_state", manager="svc", task="once", state="done")] == 1.0
    assert samples[key("lifecycle_execute_tasks_running", manager="svc")] == 1.0
    assert not [k for k in samples if ("task", "request-1") in k[1]]

    after = await scrape(metrics)
    assert after[key("lifecycle_manager_state", manager="svc", state="stopped")] == 1.0
    assert after[key("lifecycle_manager_live", manager="svc")] == 0.0
    assert after[key("lifecycle_task_state", manager="svc", task="db", state="done")] == 1.0
    assert after[key("lifecycle_task_restarts_total", manager="svc", task="flaky")] == 2.0


async def _returns() -> None:
    pass


async def test_two_managers_never_share_or_clash_over_metrics() -> None:
    first, second = lifecycle.TaskManager(name="a"), lifecycle.TaskManager(name="b")
    one, two = Metrics(first), Metrics(second)
    samples = await scrape(one)
    assert key("lifecycle_manager_ready", manager="a") in samples
    assert key("lifecycle_manager_ready", manager="b") not in samples
    assert key("lifecycle_manager_ready", manager="b") in await scrape(two)
    shared = prometheus_client.CollectorRegistry()
    Metrics(first, registry=shared)
    Metrics(second, registry=shared)  # same metric names, different manager label: no clash
    both = prometheus_client.generate_latest(shared).decode()
    assert 'lifecycle_manager_ready{manager="a"}' in both
    assert 'lifecycle_manager_ready{manager="b"}' in both


async def test_async_task_counters_histograms_and_queue_depths_after_a_known_workload() -> None:
    from lifecycle.asynctask import AsyncTasks, MemoryBackend

    metrics = Metrics(lifecycle.TaskManager(name="svc"))
    observer = metrics.async_tasks
    observer.enqueued("default", "send_mail", 3)
    observer.enqueued("low", "report")
    for _ in range(4):
        observer.started("default", "send_mail")
    observer.finished("default", "send_mail", "succeeded", 0.02)
    observer.finished("default", "send_mail", "succeeded", 0.3)
    observer.finished("default", "send_mail", "retried", 1.5)
    observer.finished("default", "send_mail", "dead", 0.01)
    with pytest.raises(ValueError, match="'succeeded', 'retried', 'dead' or 'cancelled'"):
        observer.finished("default", "send_mail", "lost", 1.0)  # type: ignore[arg-type]

    tasks = AsyncTasks(MemoryBackend(), execution=False)

    async def report(n: int) -> None: ...

    tasks.register(report, name="report")
    observer.track(tasks)
    async with tasks:
        await tasks.enqueue(report, 1)
        await tasks.enqueue(report, 2)
        await tasks.enqueue(report, 3, queue="low")
        samples = await scrape(metrics)

    labels = {"queue": "default", "task": "send_mail"}
    assert samples[key("lifecycle_asynctask_enqueued_total", **labels)] == 3
    assert samples[key("lifecycle_asynctask_enqueued_total", queue="low", task="report")] == 1
    assert samples[key("lifecycle_asynctask_started_total", **labels)] == 4
    assert samples[key("lifecycle_asynctask_succeeded_total", **labels)] == 2
    assert samples[key("lifecycle_asynctask_failed_total", **labels)] == 2  # retried + dead
    assert samples[key("lifecycle_asynctask_retried_total", **labels)] == 1
    assert samples[key("lifecycle_asynctask_dead_total", **labels)] == 1
    assert samples[key("lifecycle_asynctask_run_seconds_count", **labels)] == 4
    assert samples[key("lifecycle_asynctask_run_seconds_bucket", **labels, le="0.25")] == 2
    assert samples[key("lifecycle_asynctask_queue_depth", queue="default", state="pending")] == 2
    assert samples[key("lifecycle_asynctask_queue_depth", queue="low", state="pending")] == 1
    assert samples[key("lifecycle_asynctask_queue_depth", queue="low", state="dead")] == 0


async def test_a_failing_queue_depth_source_does_not_break_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        async def stats(self) -> dict[str, object]:
            raise ConnectionError("backend down")

    metrics = Metrics(lifecycle.TaskManager(name="svc"))
    metrics.async_tasks.track(Broken())
    samples = await scrape(metrics)
    assert samples[key("lifecycle_manager_live", manager="svc")] == 1.0
    assert "could not read the queue depths" in caplog.text


def test_without_prometheus_client_metrics_say_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'anyio-lifecycle\[metrics\]'"):
        Metrics(lifecycle.TaskManager())
    assert not metrics_available()  # so HealthServer answers /metrics with 404 and this hint
