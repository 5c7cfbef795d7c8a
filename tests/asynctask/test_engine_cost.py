"""What the engine costs per task in a plain drain, counted rather than timed: the Python calls made in the
engine's own modules for each no-op task (every backend pays them, whatever its own cost)."""

from __future__ import annotations

import contextlib
import cProfile
import pstats

import anyio

from lifecycle.asynctask import AsyncTasks, Call, MemoryBackend

with contextlib.suppress(ImportError):  # imported (as redis-py may), tracing is looked up per batch, not task
    import opentelemetry.trace  # noqa: F401

TASKS = 640
CONCURRENCY = 32
ENGINE_CALLS_PER_TASK = 11.0
"""Per no-op task: the worker's run of it, the attempt, the definition lookup, decoding the arguments, the
verdict and its result's encoding, queueing the verdict (seven); the claims, batched saves, wake-ups and
timed loops shared by a batch add about one. Before issue 17's second round it was 30 (a wake-up of every
idle runner per batch, a control object, follow-up and hook checks, a new JSON decoder), then 10 (the
runner's dispatch to the attempt and noting the lease each a call of their own)."""

# The modules of the engine's per-task path (the backend's own calls are not counted: they are its cost).
_ENGINE = (
    "/asynctask/_engine/",
    "/asynctask/_encoding.py",
    "/asynctask/_records.py",
    "/asynctask/_registry.py",
    "/asynctask/_model.py",
    "/asynctask/_chain.py",
    "/asynctask/_meta.py",
    "/asynctask/_middleware.py",
    "/asynctask/_tracing.py",
    "/asynctask/_observer.py",
)


async def test_a_plain_drain_makes_few_engine_calls_per_task() -> None:
    tasks = AsyncTasks(MemoryBackend(), concurrency=CONCURRENCY)
    finished = anyio.Event()
    done = 0

    async def noop(index: int) -> None:
        nonlocal done
        done += 1
        if done == TASKS:
            finished.set()

    tasks.register(noop, name="noop")
    profiler = cProfile.Profile()
    async with tasks:
        await tasks.enqueue_many([Call("noop", index) for index in range(TASKS)])
        async with anyio.create_task_group() as group:
            profiler.enable()
            group.start_soon(tasks.execute)
            with anyio.fail_after(30):
                await finished.wait()
            profiler.disable()
            group.cancel_scope.cancel()
    counts = {
        f"{path.rsplit('/asynctask/', 1)[-1]}:{name}": calls
        for (path, _, name), (_, calls, _, _, _) in pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
        if any(part in path for part in _ENGINE)
    }
    per_task = sum(counts.values()) / TASKS
    top = ", ".join(
        f"{where} {calls / TASKS:.2f}" for where, calls in sorted(counts.items(), key=lambda i: -i[1])
    )
    assert per_task <= ENGINE_CALLS_PER_TASK, f"{per_task:.2f} engine calls per task: {top}"
    tracing = sum(calls for where, calls in counts.items() if where.startswith("_tracing.py"))
    assert tracing <= TASKS / 8, f"the tracing check ran {tracing} times for {TASKS} tasks: {top}"


ENQUEUE_CALLS = 16.0
"""Per awaited single enqueue by name on a ``MemoryBackend`` (whose one checkpoint resumes the two
coroutines of the call once more): ``enqueue`` and the coalescer (two each), building the task (the
registry look-up, the argument check and its predicate, the payload's text, the id, ``NewTask``), the
tracing check and the note that it was stored. It was 21 before the name check, the coalescer's
hand-off to the backend and the payload's error path stopped being calls of their own."""

_ENQUEUE_PATH = (
    *_ENGINE,
    "/asynctask/_async_tasks.py",
    "/asynctask/_coalesce.py",
    "/asynctask/_enqueue.py",
    "/asynctask/_typecheck.py",
    "/lifecycle/_checks.py",
)


async def test_a_single_enqueue_makes_few_engine_calls() -> None:
    tasks = AsyncTasks(MemoryBackend(), execution=False)

    async def noop(index: int) -> None:
        pass

    tasks.register(noop, name="noop")
    profiler = cProfile.Profile()
    async with tasks:
        await tasks.enqueue("noop", -1)  # the coalescer exists
        profiler.enable()
        for index in range(TASKS):
            await tasks.enqueue("noop", index)
        profiler.disable()
    counts = {
        f"{path.rsplit('/lifecycle/', 1)[-1]}:{name}": calls
        for (path, _, name), (_, calls, _, _, _) in pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
        if any(part in path for part in _ENQUEUE_PATH) or path == "<string>"  # <string>: new_task
    }
    per_call = sum(counts.values()) / TASKS
    top = ", ".join(
        f"{where} {calls / TASKS:.2f}" for where, calls in sorted(counts.items(), key=lambda i: -i[1])
    )
    assert per_call <= ENQUEUE_CALLS, f"{per_call:.2f} engine calls per enqueue: {top}"
