"""A producer or a worker process for ``test_tracing.py``, each with its own OpenTelemetry SDK and in-memory
exporter: ``python -m tests.asynctask.tracing_process produce URL`` enqueues inside a span and prints the
span's ids and the task ids as JSON; ``... work URL ID...`` runs a worker until those tasks are finished and
prints the spans it exported as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lifecycle import Backoff
from lifecycle.asynctask import AsyncTasks, Call, TaskContext, backend_from_url

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.tracing_process")


async def flaky(ctx: TaskContext, order: int) -> int:
    if ctx.attempt == 1:
        raise ValueError(f"order {order}: the first attempt fails")
    with tracer.start_as_current_span("inside the task"):
        return order


async def first_step() -> int:
    return 1


async def second_step(ctx: TaskContext) -> int:
    return int(ctx.previous_result) + 1


def make_tasks(url: str) -> AsyncTasks:
    tasks = AsyncTasks(
        backend_from_url(url), poll_interval=0.05, retry_backoff=Backoff(initial=0, cap=0.01, jitter=False)
    )
    for fn in (flaky, first_step, second_step):
        tasks.register(fn, name=fn.__name__)
    return tasks


async def produce(url: str) -> dict[str, Any]:
    tasks = make_tasks(url)
    async with tasks:
        with tracer.start_as_current_span("web request") as span:
            task_id = await tasks.enqueue(flaky, 7)
            chain_id = await tasks.enqueue_chain([Call(first_step), Call(second_step)])
    context = span.get_span_context()
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "task_id": task_id,
        "chain_id": chain_id,
    }


async def work(url: str, task_ids: list[str]) -> list[dict[str, Any]]:
    tasks = make_tasks(url)
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        for task_id in task_ids:
            await tasks.wait(task_id, timeout=60)
        group.cancel_scope.cancel()
    return [
        {
            "name": span.name,
            "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
            "attributes": dict(span.attributes or {}),
            "events": [event.name for event in span.events],
            "status": span.status.status_code.name,
        }
        for span in exporter.get_finished_spans()
    ]


if __name__ == "__main__":
    mode, url, *ids = sys.argv[1:]
    result = anyio.run(produce, url) if mode == "produce" else anyio.run(work, url, ids)
    print(json.dumps(result))
