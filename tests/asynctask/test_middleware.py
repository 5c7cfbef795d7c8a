"""Middleware, ``on_enqueue`` hooks and user metadata below the conformance suite: what registration refuses,
the helpers hooks use, the group and settlement paths the worker and the group code call, the deadline
around middleware, and the blocking producer's ``meta=`` (the end-to-end rules are in
``lifecycle.asynctask.testing``'s ``MiddlewareRules``, run on every backend)."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import (
    AsyncTasks,
    MemoryBackend,
    NewTask,
    Settlement,
    TaskContext,
    TaskState,
    meta_of,
    with_meta,
)
from lifecycle.asynctask._meta import add_sections, read_meta
from lifecycle.asynctask._middleware import Hooks
from lifecycle.asynctask._records import NewGroup

CallNext = Callable[[], Awaitable[Any]]


def new_task(task_id: str, *, meta: str | None = None, group_id: str | None = None) -> NewTask:
    return NewTask(
        id=task_id,
        name="app.job",
        queue="default",
        payload=b"[]",
        max_retries=0,
        timeout=None,
        enqueued_at=1.0,
        run_at=1.0,
        meta=meta,
        group_id=group_id,
    )


def test_middleware_must_be_an_async_def_taking_ctx_and_call_next() -> None:
    tasks = AsyncTasks(MemoryBackend())

    def plain(ctx: TaskContext, call_next: CallNext) -> Any:
        return None

    async def one_argument(ctx: TaskContext) -> Any:
        return None

    class Klass:
        pass

    with pytest.raises(TypeError, match=r"plain is not an async def; middleware awaits call_next\(\)"):
        tasks.middleware(plain)
    with pytest.raises(TypeError, match=r"one_argument must take 2 positional arguments \(ctx, call_next\)"):
        tasks.middleware(one_argument)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="takes an async def"):
        tasks.middleware(Klass)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="takes an async def"):
        tasks.middleware("app.mw")  # type: ignore[type-var]

    class Callable_:
        async def __call__(self, ctx: TaskContext, call_next: CallNext) -> Any:
            return await call_next()

    async def with_options(ctx: TaskContext, call_next: CallNext, label: str) -> Any:
        return await call_next()

    instance = Callable_()
    assert tasks.middleware(instance) is instance
    partial = functools.partial(with_options, label="x")
    assert tasks.middleware(partial) is partial


def test_enqueue_hooks_must_be_plain_functions_taking_the_task() -> None:
    tasks = AsyncTasks(MemoryBackend())

    async def coroutine_hook(task: NewTask) -> None:
        return None

    def no_argument() -> None:
        return None

    with pytest.raises(TypeError, match="is an async def; hooks are plain functions"):
        tasks.on_enqueue(coroutine_hook)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"must take 1 positional argument \(task\)"):
        tasks.on_enqueue(no_argument)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"hook\(task: NewTask\)"):
        tasks.on_enqueue(None)  # type: ignore[type-var]

    def hook(task: NewTask) -> None:
        return None

    assert tasks.on_enqueue(hook) is hook, "usable as a decorator: returns the hook unchanged"


def test_with_meta_changes_only_the_users_section() -> None:
    engine = add_sections(None, chain={"id": "chain-x", "step": 0}, trace={"traceparent": "00-ab"})
    task = new_task("a", meta=engine)
    changed = with_meta(task, {"tenant": "acme"}, region="eu")
    assert meta_of(changed) == {"tenant": "acme", "region": "eu"}
    sections = read_meta(changed.meta)
    assert sections["chain"] == {"id": "chain-x", "step": 0}
    assert sections["trace"] == {"traceparent": "00-ab"}
    assert dataclasses.replace(changed, meta=task.meta) == task, "nothing else changes"
    emptied = with_meta(changed, tenant=None, region=None)
    assert meta_of(emptied) == {}
    assert read_meta(emptied.meta) == read_meta(engine), "no empty user section is left behind"
    assert with_meta(new_task("b"), x=None).meta is None
    assert meta_of(new_task("c", meta="not json")) == {}, "damaged meta reads as no metadata"

    with pytest.raises(TypeError, match="with_meta\\(\\) takes a NewTask"):
        with_meta({"id": "a"}, tenant="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="items must be a mapping"):
        with_meta(task, [("tenant", "x")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NUL character"):
        with_meta(task, tenant="a\x00")
    with pytest.raises(ValueError, match="lone surrogate"):
        with_meta(task, tenant="\udc80")
    with pytest.raises(TypeError, match="meta_of\\(\\) takes a NewTask"):
        meta_of("a")  # type: ignore[arg-type]


def test_a_group_goes_through_the_hooks_members_first_then_its_then() -> None:
    hooks = Hooks()
    seen: list[str] = []

    def tag(task: NewTask) -> NewTask:
        seen.append(task.id)
        return with_meta(task, seen=str(len(seen)))

    hooks.add_enqueue_hook(tag)
    group = NewGroup(
        id="g",
        members=(new_task("g.0", group_id="g"), new_task("g.1", group_id="g")),
        then=new_task("after"),
        created_at=1.0,
    )
    prepared = hooks.prepare_group(group)
    assert seen == ["g.0", "g.1", "after"]
    assert [meta_of(task)["seen"] for task in prepared.members] == ["1", "2"]
    assert prepared.then is not None
    assert meta_of(prepared.then) == {"seen": "3"}
    assert [task.group_id for task in prepared.members] == ["g", "g"]

    def move(task: NewTask) -> NewTask:
        return dataclasses.replace(task, id=f"{task.id}-moved")

    hooks.add_enqueue_hook(move)
    with pytest.raises(ValueError, match="fixes the ids of chain steps, schedule fires and group members"):
        hooks.prepare_group(group)

    regroup = Hooks()
    regroup.add_enqueue_hook(lambda task: dataclasses.replace(task, group_id="other"))
    with pytest.raises(ValueError, match="changed the group_id"):
        regroup.prepare_group(group)


def test_a_settlement_enqueues_what_the_hooks_made_of_its_follow_ups() -> None:
    hooks = Hooks()
    success = Settlement(task_id="a", token="t", state=TaskState.SUCCEEDED, at=1.0)
    assert hooks.prepare_settlement(success) is success, "no hooks: nothing to do"
    hooks.add_enqueue_hook(lambda task: with_meta(task, worker="w1"))
    assert hooks.prepare_settlement(success) is success, "nothing enqueued next: nothing to do"
    group = NewGroup(id="g", members=(new_task("g.0", group_id="g"),), then=None, created_at=1.0)
    full = dataclasses.replace(success, then=(new_task("chain-x.1"),), then_groups=(group,))
    prepared = hooks.prepare_settlement(full)
    assert [meta_of(task) for task in prepared.then] == [{"worker": "w1"}]
    assert [meta_of(task) for task in prepared.then_groups[0].members] == [{"worker": "w1"}]


def test_hooks_get_the_task_and_a_changed_copy_replaces_it() -> None:
    hooks = Hooks()
    hooks.add_enqueue_hook(lambda task: None)
    hooks.add_enqueue_hook(lambda task: dataclasses.replace(task, queue="bulk", priority=3))
    hooks.add_enqueue_hook(lambda task: task)
    (task,) = hooks.prepare([new_task("a")])
    assert (task.queue, task.priority) == ("bulk", 3)

    hooks.add_enqueue_hook(lambda task: dataclasses.replace(task, queue="a\x00b"))
    with pytest.raises(ValueError, match="the queue name must not contain NUL"):
        hooks.prepare([new_task("a")])


@pytest.mark.anyio
async def test_the_tasks_timeout_covers_its_middleware() -> None:
    tasks = AsyncTasks(MemoryBackend(), poll_interval=0.05)
    stuck = anyio.Event()

    @tasks.middleware
    async def hangs(ctx: TaskContext, call_next: CallNext) -> Any:
        await stuck.wait()  # never set: only the task's deadline ends the attempt
        return await call_next()

    @tasks.register(name="app.quick", timeout=0.05, max_retries=0)
    async def quick() -> str:
        return "never reached"

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        info = await tasks.wait(await tasks.enqueue(quick), timeout=20)
        group.cancel_scope.cancel()
    assert info.state is TaskState.DEAD
    assert "timed out after 0.05 s" in (info.last_error or "")


tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


def test_the_blocking_producer_takes_meta_and_its_hooks_see_the_callers_context(tmp_path: Path) -> None:
    tasks = AsyncTasks(MemoryBackend(), execution=False)

    @tasks.on_enqueue
    def tag(task: NewTask) -> NewTask:
        return with_meta(task, tenant=tenant.get())

    tenant.set("acme")
    with tasks.blocking() as producer:
        task_id = producer.enqueue("app.jobs.send", 1, meta={"source": "web"})
        info = producer.info(task_id)
    assert info is not None
    assert info.meta == {"source": "web", "tenant": "acme"}
