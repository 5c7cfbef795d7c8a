"""Chains: steps run in order, each receiving the previous result; a dead step stops the chain and the chain's
progress says where; requeueing the dead step resumes it; bad chains store nothing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import (
    Abort,
    AsyncTasks,
    Call,
    Group,
    ManualClock,
    MemoryBackend,
    NewTask,
    SQLiteBackend,
    TaskContext,
    TaskState,
)
from lifecycle.asynctask._chain import build_chain, chain_fields, follow_up
from lifecycle.asynctask._records import GroupRecord, TaskRecord

T0 = 1_700_000_000.0


class Steps:
    """Task functions of a three-step chain, recording what each received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.fail_parse = False

    def register(self, tasks: AsyncTasks) -> None:
        tasks.register(self.fetch, name="chain.fetch")
        tasks.register(self.parse, name="chain.parse", max_retries=0)
        tasks.register(self.store, name="chain.store")

    async def fetch(self, ctx: TaskContext, url: str) -> dict[str, Any]:
        self.seen.append(("fetch", ctx.previous_result))
        return {"url": url, "size": 3}

    async def parse(self, ctx: TaskContext) -> list[int]:
        self.seen.append(("parse", ctx.previous_result))
        if self.fail_parse:
            raise Abort("cannot parse the page")
        return [1, 2, ctx.previous_result["size"]]

    def store(self, ctx: TaskContext, table: str) -> str:  # a plain def: runs in a thread
        self.seen.append(("store", (ctx.previous_result, ctx.chain_id)))
        return f"{table}:{sum(ctx.previous_result)}"


@pytest.fixture(params=["memory", "sqlite"])
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[AsyncTasks, Steps]]:
    backend = MemoryBackend() if request.param == "memory" else SQLiteBackend(tmp_path / "tasks.db")
    tasks = AsyncTasks(backend, clock=ManualClock(T0))
    steps = Steps()
    steps.register(tasks)
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        yield tasks, steps
        group.cancel_scope.cancel()


def chain_of(steps: Steps) -> list[Call]:
    return [Call(steps.fetch, "https://example.org"), Call(steps.parse), Call(steps.store, "pages")]


async def test_each_step_runs_after_the_previous_with_its_result(running: tuple[AsyncTasks, Steps]) -> None:
    tasks, steps = running
    chain_id = await tasks.enqueue_chain(chain_of(steps))
    info = await tasks.wait(chain_id, timeout=10)
    assert steps.seen == [
        ("fetch", None),
        ("parse", {"url": "https://example.org", "size": 3}),
        ("store", ([1, 2, 3], chain_id)),
    ]
    assert (info.id, info.state, info.result) == (f"{chain_id}.2", TaskState.SUCCEEDED, "pages:6")
    chain = info.chain
    assert chain is not None
    assert (chain.id, chain.state, chain.current, chain.result, chain.stopped_at) == (
        chain_id,
        TaskState.SUCCEEDED,
        2,
        "pages:6",
        None,
    )
    assert [(s.name, s.task_id, s.state) for s in chain.steps] == [
        ("chain.fetch", f"{chain_id}.0", TaskState.SUCCEEDED),
        ("chain.parse", f"{chain_id}.1", TaskState.SUCCEEDED),
        ("chain.store", f"{chain_id}.2", TaskState.SUCCEEDED),
    ]
    assert chain.succeeded_steps == 3
    # Any step's id shows the chain too; list rows name the chain and step without the progress.
    middle = await tasks.info(f"{chain_id}.1")
    assert middle is not None
    assert middle.chain == chain
    assert middle.chain_step == 1
    rows = {row.id: row for row in await tasks.list()}
    assert (rows[f"{chain_id}.0"].chain_id, rows[f"{chain_id}.0"].chain_step) == (chain_id, 0)
    assert rows[f"{chain_id}.0"].chain is None


async def test_a_dead_step_stops_the_chain_and_requeueing_it_resumes(
    running: tuple[AsyncTasks, Steps],
) -> None:
    tasks, steps = running
    steps.fail_parse = True
    chain_id = await tasks.enqueue_chain(chain_of(steps))
    info = await tasks.wait(chain_id, timeout=10)
    assert info.id == f"{chain_id}.1"
    assert info.state is TaskState.DEAD
    chain = info.chain
    assert chain is not None
    assert (chain.state, chain.stopped_at, chain.current) == (TaskState.DEAD, 1, 1)
    assert [s.state for s in chain.steps] == [TaskState.SUCCEEDED, TaskState.DEAD, None]
    assert "cannot parse the page" in (chain.steps[1].last_error or "")
    assert await tasks.backend.get(f"{chain_id}.2") is None
    assert [name for name, _ in steps.seen] == ["fetch", "parse"]

    steps.fail_parse = False
    assert await tasks.requeue(f"{chain_id}.1")
    info = await tasks.wait(chain_id, timeout=10, states=[TaskState.SUCCEEDED])
    assert info.chain is not None
    assert info.chain.result == "pages:6"
    assert steps.seen[-1] == ("store", ([1, 2, 3], chain_id))


class StaleFirstReads(MemoryBackend):
    """A store whose first read of each id answers with what that id held while it still ran: the read a
    busy machine makes when a step finishes (and the steps after it run) between two reads of one progress
    walk."""

    def __init__(self) -> None:
        super().__init__()
        self.stale: dict[str, TaskRecord | GroupRecord] = {}
        self.reads: list[str] = []

    async def get(self, task_id: str) -> TaskRecord | None:
        self.reads.append(task_id)
        stale = self.stale.pop(task_id, None)
        return stale if isinstance(stale, TaskRecord) else await super().get(task_id)

    async def get_group(self, group_id: str) -> GroupRecord | None:
        self.reads.append(group_id)
        stale = self.stale.pop(group_id, None)
        return stale if isinstance(stale, GroupRecord) else await super().get_group(group_id)


@pytest.mark.parametrize("unfinished", ["first step", "group step"])
async def test_a_step_read_while_it_ran_is_read_again_once_a_later_step_is_found(unfinished: str) -> None:
    """The progress walk reads step after step; a step that read as unfinished before a later step was found
    finished meanwhile (the later step exists only after it succeeded), so it is read again."""
    backend = StaleFirstReads()
    tasks = AsyncTasks(backend, clock=ManualClock(T0))

    @tasks.register(name="chain.one")
    async def one(ctx: TaskContext, n: int) -> int:
        previous = ctx.previous_result
        return n + (sum(previous) if isinstance(previous, list) else previous or 0)

    async with tasks, anyio.create_task_group() as running:
        running.start_soon(tasks.execute)
        chain_id = await tasks.enqueue_chain(
            [Call(one, 1), Group([Call(one, 10), Call(one, 100)]), Call(one, 0)]
        )
        done = await tasks.wait(chain_id, timeout=10)
        running.cancel_scope.cancel()
    assert done.chain is not None
    assert (done.chain.state, done.chain.result) == (TaskState.SUCCEEDED, 112)
    async with AsyncTasks(backend, clock=ManualClock(T0), execution=False) as reader:
        if unfinished == "first step":
            first = await backend.get(f"{chain_id}.0")
            assert first is not None
            backend.stale[first.id] = dataclasses.replace(first, state=TaskState.ACTIVE, result=None)
        else:
            group = await backend.get_group(f"{chain_id}.1")
            assert group is not None
            backend.stale[group.id] = dataclasses.replace(group, outcome=None, then_id=None)
        backend.reads.clear()
        info = await reader.info(chain_id)
    assert info is not None
    assert info.chain is not None
    assert [step.state for step in info.chain.steps] == [TaskState.SUCCEEDED] * 3
    assert info.chain.state is TaskState.SUCCEEDED
    stale_id = f"{chain_id}.0" if unfinished == "first step" else f"{chain_id}.1"
    assert backend.reads.count(stale_id) == 2, "read once in the walk, once more after the last step's read"
    assert backend.stale == {}


async def test_waiting_for_a_chain_waits_for_the_whole_group_step_not_its_first_member() -> None:
    """At a group step ``info(chain_id)`` shows the first member's record; once that member succeeded while
    another still runs, ``wait(chain_id)`` still waits: for the chain, not for the record shown."""
    tasks = AsyncTasks(MemoryBackend(), clock=ManualClock(T0), concurrency=2)
    release = anyio.Event()

    @tasks.register(name="chain.quick")
    async def quick(n: int) -> int:
        return n

    @tasks.register(name="chain.held")
    async def held(n: int) -> int:
        await release.wait()
        return n

    @tasks.register(name="chain.total")
    async def total(ctx: TaskContext) -> int:
        results: list[int] = ctx.previous_result
        return sum(results)

    async with tasks, anyio.create_task_group() as running:
        running.start_soon(tasks.execute)
        chain_id = await tasks.enqueue_chain([Group([Call(quick, 1), Call(held, 2)]), Call(total)])
        group = await tasks.group_info(f"{chain_id}.0")
        assert group is not None
        first = await tasks.wait(group.task_ids[0], timeout=10)
        assert first.state is TaskState.SUCCEEDED
        shown = await tasks.info(chain_id)
        assert shown is not None
        assert shown.chain is not None
        assert (shown.id, shown.state, shown.chain.state) == (first.id, TaskState.SUCCEEDED, TaskState.ACTIVE)
        with pytest.raises(TimeoutError, match=r"the chain is still active at step 0 \(group of 2"):
            await tasks.wait(chain_id, timeout=0)  # one look (a short timeout > 0 might end before it)
        release.set()
        done = await tasks.wait(chain_id, timeout=10)
        running.cancel_scope.cancel()
    assert done.chain is not None
    assert (done.state, done.chain.state, done.chain.result) == (TaskState.SUCCEEDED, TaskState.SUCCEEDED, 3)


async def test_cancelling_a_waiting_step_stops_the_chain() -> None:
    clock = ManualClock(T0)
    tasks = AsyncTasks(MemoryBackend(), clock=clock, execution=False)
    steps = Steps()
    steps.register(tasks)
    async with tasks:
        chain_id = await tasks.enqueue_chain(chain_of(steps))
        assert await tasks.cancel(f"{chain_id}.0")
        info = await tasks.info(chain_id)
        assert info is not None
        assert info.chain is not None
        assert (info.chain.state, info.chain.stopped_at) == (TaskState.CANCELLED, 0)
        pending = await tasks.info(await tasks.enqueue_chain(chain_of(steps)))
        assert pending is not None
        assert pending.chain is not None
        assert (pending.state, pending.chain.state, pending.chain.current) == (TaskState.PENDING,) * 2 + (0,)


async def test_bad_chains_are_refused_and_store_nothing() -> None:
    tasks = AsyncTasks(MemoryBackend(), clock=ManualClock(T0), execution=False)
    steps = Steps()
    steps.register(tasks)
    async with tasks:
        with pytest.raises(ValueError, match="at least one Call"):
            await tasks.enqueue_chain([])
        with pytest.raises(TypeError, match="drop task_id"):
            await tasks.enqueue_chain([Call(steps.fetch, "u"), Call(steps.parse, task_id="mine")])
        with pytest.raises(TypeError, match="takes 1 argument"):
            await tasks.enqueue_chain([Call(steps.fetch, "u"), Call(steps.parse), Call(steps.store)])  # type: ignore[arg-type, call-arg]
        with pytest.raises(TypeError, match="Call objects"):
            await tasks.enqueue_chain([steps.fetch])  # type: ignore[list-item]
        assert await tasks.list() == []
        assert await tasks.info("chain-0000") is None


def test_the_next_step_is_deterministic_and_its_delay_counts_from_the_success() -> None:
    tasks = AsyncTasks(MemoryBackend(), clock=ManualClock(T0))
    steps = Steps()
    steps.register(tasks)
    calls = [Call(steps.fetch, "u"), Call(steps.parse, delay=30, queue="slow")]
    chain_id, first = build_chain(calls, T0, tasks._registry, tasks.encoding)
    assert isinstance(first, NewTask)
    record = TaskRecord(
        id=first.id,
        name=first.name,
        queue=first.queue,
        payload=first.payload,
        state=TaskState.ACTIVE,
        attempts=1,
        max_retries=first.max_retries,
        timeout=first.timeout,
        enqueued_at=T0,
        run_at=T0,
        meta=first.meta,
    )
    result = tasks.encoding.encode({"size": 1})
    (second,), groups = follow_up(record, result, T0 + 100)
    assert groups == ()
    assert (second.id, second.name, second.queue, second.run_at) == (
        f"{chain_id}.1",
        "chain.parse",
        "slow",
        T0 + 130,
    )
    assert follow_up(record, result, T0 + 200)[0][0].id == second.id  # a rerun enqueues the same (skipped) id
    last = TaskRecord(**{**{f: getattr(record, f) for f in TaskRecord.__slots__}, "meta": second.meta})
    assert follow_up(last, None, T0) == ((), ())
    damaged = TaskRecord(**{**{f: getattr(record, f) for f in TaskRecord.__slots__}, "meta": '{"chain": {}}'})
    with pytest.raises(ValueError, match="damaged"):
        follow_up(damaged, None, T0)
    for bad_name in ("chain.\u0000parse", "chain.\udc80parse"):  # what no backend could store
        meta = first.meta.replace('"chain.parse"', json.dumps(bad_name, ensure_ascii=True))  # type: ignore[union-attr]
        unstorable = TaskRecord(**{**{f: getattr(record, f) for f in TaskRecord.__slots__}, "meta": meta})
        with pytest.raises(ValueError, match="damaged"):
            follow_up(unstorable, None, T0)
    for bad_meta in ("[" * 5000 + "]" * 5000, '{"chain": {"id": "c", "step": "x"}}'):
        odd = TaskRecord(**{**{f: getattr(record, f) for f in TaskRecord.__slots__}, "meta": bad_meta})
        assert chain_fields(odd) == (None, None, None), "inspection of damaged bookkeeping never raises"
