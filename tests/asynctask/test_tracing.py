"""OpenTelemetry tracing (the ``otel`` extra): ``enqueue`` stores the current trace context with the task,
and the worker runs each attempt in a span ``lifecycle.task <name>`` whose parent is the enqueuer's span;
retries and chain steps stay in the trace. Without a configured tracer provider nothing is stored, and
without OpenTelemetry imported nothing of it is even imported.

In-process tests install an SDK tracer provider with an in-memory exporter for one test (the API's global
is restored afterwards); ``test_a_trace_crosses_from_the_producer_process_to_the_worker_process`` runs a
producer and a worker as two processes, each with its own SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lifecycle import Backoff
from lifecycle.asynctask import AsyncTasks, Call, MemoryBackend, TaskContext, TaskState, backend_from_url
from lifecycle.asynctask._tracing import current_trace

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider, as an application would configure it, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # what set_tracer_provider sets, restored after
    yield exporter
    provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("tests.tracing")


class Flaky:
    """Fails its first ``failures`` attempts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def __call__(self, ctx: TaskContext, order: int) -> int:
        if ctx.attempt <= self.failures:
            raise ValueError(f"attempt {ctx.attempt} of order {order} fails")
        with tracer().start_as_current_span("charge the card"):
            return order


async def first_step() -> int:
    return 20


async def second_step(ctx: TaskContext) -> int:
    return int(ctx.previous_result) + 1


def threaded_step(ctx: TaskContext) -> str:
    with tracer().start_as_current_span("in a worker thread"):
        return "done"


def make_tasks(**options: Any) -> AsyncTasks:
    tasks = AsyncTasks(
        MemoryBackend(),
        retry_backoff=Backoff(initial=0, cap=0.01, jitter=False),
        poll_interval=0.05,
        **options,
    )
    tasks.register(Flaky(1), name="flaky")
    tasks.register(Flaky(99), name="hopeless", max_retries=1)
    tasks.register(first_step, name="first")
    tasks.register(second_step, name="second")
    tasks.register(threaded_step, name="threaded")
    return tasks


async def run_until_finished(tasks: AsyncTasks, *task_ids: str) -> None:
    async with anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        for task_id in task_ids:
            await tasks.wait(task_id, timeout=30)
        group.cancel_scope.cancel()


def attempts(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == f"lifecycle.task {name}"]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_enqueue_stores_the_current_span_as_w3c_traceparent(exporter: InMemorySpanExporter) -> None:
    tasks = make_tasks(execution=False)
    async with tasks:
        with tracer().start_as_current_span("request") as span:
            task_id = await tasks.enqueue("flaky", 1)
        untraced = await tasks.enqueue("flaky", 2)  # no span is current: nothing is stored
        record = await tasks.backend.get(task_id)
        assert record is not None
        context = span.get_span_context()
        version, trace_id, span_id, flags = json.loads(record.meta or "{}")["trace"]["traceparent"].split("-")
        assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
        assert int(flags, 16) & 1  # sampled
        other = await tasks.backend.get(untraced)
        assert other is not None
        assert other.meta is None


def test_with_an_empty_context_the_current_span_is_not_looked_up(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most enqueues run with OpenTelemetry imported (redis-py 8 imports it) and nothing in its context:
    ``current_trace`` sees the empty context and stops there, without ``get_current_span``; with a span
    current it still reads the span and stores its context."""
    looked_up: list[object] = []
    get_current_span = trace.get_current_span

    def counting(context: Any = None) -> Any:
        looked_up.append(context)
        return get_current_span(context)

    monkeypatch.setattr(trace, "get_current_span", counting)
    assert current_trace() is None
    assert looked_up == []
    with tracer().start_as_current_span("request"):
        carrier = current_trace()
    assert carrier is not None
    assert "traceparent" in carrier
    assert looked_up  # ours (and the propagator's)


async def test_without_a_tracer_provider_nothing_is_stored_or_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)  # none configured, whatever ran before
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # the API's default
    tasks = make_tasks()
    async with tasks:
        with trace.get_tracer("t").start_as_current_span("a no-op span"):
            task_id = await tasks.enqueue("flaky", 1)
        record = await tasks.backend.get(task_id)
        assert record is not None
        assert record.meta is None
        await run_until_finished(tasks, task_id)


async def test_each_attempt_runs_in_a_child_span_of_the_enqueuer(exporter: InMemorySpanExporter) -> None:
    tasks = make_tasks(queues=["default", "orders"])
    async with tasks:
        with tracer().start_as_current_span("request") as request:
            task_id = await tasks.enqueue("flaky", 7, queue="orders")
        await run_until_finished(tasks, task_id)
        info = await tasks.info(task_id)
        assert info is not None
        assert (info.state, info.attempts) == (TaskState.SUCCEEDED, 2)
    first, second = attempts(exporter, "flaky")
    origin = request.get_span_context()
    for attempt, span in enumerate((first, second), start=1):
        assert span.context.trace_id == origin.trace_id
        assert parent_of(span) == origin.span_id  # a retry is parented by the enqueuer again
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.attributes == {
            "lifecycle.task.id": task_id,
            "lifecycle.task.name": "flaky",
            "lifecycle.task.queue": "orders",
            "lifecycle.task.attempt": attempt,
            "lifecycle.task.outcome": "failed" if attempt == 1 else "succeeded",
        }
    assert first.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception"]
    assert first.events[0].attributes is not None
    assert first.events[0].attributes["exception.message"] == "attempt 1 of order 7 fails"
    assert second.status.status_code is trace.StatusCode.UNSET
    assert second.events == ()
    (inner,) = [span for span in exporter.get_finished_spans() if span.name == "charge the card"]
    assert parent_of(inner) == second.context.span_id  # the task's own spans are children of its attempt


async def test_a_dead_attempt_and_a_thread_task_are_traced(exporter: InMemorySpanExporter) -> None:
    tasks = make_tasks()
    async with tasks:
        with tracer().start_as_current_span("request"):
            dead = await tasks.enqueue("hopeless", 1)
            threaded = await tasks.enqueue("threaded")
        await run_until_finished(tasks, dead, threaded)
    outcomes = [span.attributes["lifecycle.task.outcome"] for span in attempts(exporter, "hopeless")]  # type: ignore[index]
    assert outcomes == ["failed", "dead"]
    (thread_attempt,) = attempts(exporter, "threaded")
    (in_thread,) = [span for span in exporter.get_finished_spans() if span.name == "in a worker thread"]
    assert parent_of(in_thread) == thread_attempt.context.span_id


async def test_a_chain_stays_in_one_trace_each_step_under_the_previous(
    exporter: InMemorySpanExporter,
) -> None:
    tasks = make_tasks()
    async with tasks:
        with tracer().start_as_current_span("request") as request:
            chain_id = await tasks.enqueue_chain([Call(first_step), Call(second_step)])
        await run_until_finished(tasks, chain_id)
        info = await tasks.info(chain_id)
        assert info is not None
        assert info.chain is not None
        assert info.chain.result == 21
    (first,) = attempts(exporter, "first")
    (second,) = attempts(exporter, "second")
    origin = request.get_span_context()
    assert first.context.trace_id == second.context.trace_id == origin.trace_id
    assert parent_of(first) == origin.span_id
    assert parent_of(second) == first.context.span_id


def test_a_blocking_producer_carries_the_calling_threads_span(
    exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    tasks = AsyncTasks(backend_from_url(url), execution=False)
    tasks.register(first_step, name="first")
    with tasks.blocking() as producer, tracer().start_as_current_span("django view") as span:
        task_id = producer.enqueue(first_step)
        chain_id = producer.enqueue_chain([Call(first_step)])
    stored = anyio.run(_meta_of, url, [task_id, f"{chain_id}.0"])
    context = span.get_span_context()
    for meta in stored:
        assert f"-{context.trace_id:032x}-{context.span_id:016x}-" in meta["trace"]["traceparent"]


async def _meta_of(url: str, task_ids: list[str]) -> list[dict[str, Any]]:
    backend = backend_from_url(url)
    await backend.open()
    try:
        records = [await backend.get(task_id) for task_id in task_ids]
    finally:
        await backend.close()
    return [json.loads(record.meta or "{}") for record in records if record is not None]


@pytest.mark.slow
def test_a_trace_crosses_from_the_producer_process_to_the_worker_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"

    def run(*args: str) -> Any:
        command = [sys.executable, "-m", "tests.asynctask.tracing_process", *args]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    produced = run("produce", url)
    spans = run("work", url, produced["task_id"], produced["chain_id"])
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    flaky = by_name["lifecycle.task flaky"]
    assert [span["attributes"]["lifecycle.task.outcome"] for span in flaky] == ["failed", "succeeded"]
    assert flaky[0]["events"] == ["exception"]
    assert flaky[0]["status"] == "ERROR"
    assert all(span["trace_id"] == produced["trace_id"] for span in spans)
    assert all(span["parent_id"] == produced["span_id"] for span in flaky)
    (first,) = by_name["lifecycle.task first_step"]
    (second,) = by_name["lifecycle.task second_step"]
    assert first["parent_id"] == produced["span_id"]
    assert second["parent_id"] == first["span_id"]
    (inside,) = by_name["inside the task"]
    assert inside["parent_id"] == flaky[1]["span_id"]


def test_without_opentelemetry_imported_nothing_of_it_is_imported_or_needed() -> None:
    """No cost when the extra is not installed (simulated by a ``None`` entry in ``sys.modules``) or not
    used: enqueueing and running a task import nothing of OpenTelemetry."""
    script = textwrap.dedent(
        """
        import sys
        if sys.argv[1] == "missing":
            sys.modules["opentelemetry"] = None  # as if the package were not installed
        import anyio
        from lifecycle.asynctask import AsyncTasks, MemoryBackend

        async def main():
            tasks = AsyncTasks(MemoryBackend())
            tasks.register(abs, name="abs")
            async with tasks, anyio.create_task_group() as group:
                group.start_soon(tasks.execute)
                info = await tasks.wait(await tasks.enqueue("abs", -3), timeout=30)
                group.cancel_scope.cancel()
            imported = [name for name, module in sys.modules.items() if module and "opentelemetry" in name]
            print(info.result, sorted(imported))

        anyio.run(main)
        """
    )
    for mode in ("missing", "installed"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["3", "[]"]
