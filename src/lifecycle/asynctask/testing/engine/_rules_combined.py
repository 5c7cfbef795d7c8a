"""Engine conformance rules for the features of issue 14 used together: a cancel reaching a task wrapped in
middleware, ``on_enqueue`` hooks seeing the members and the ``then`` of a group (at ``enqueue_group`` and
when a chain's success stores a group step), the user's metadata read by group members and by a ``then``,
and progress reported from inside middleware and from the task it wraps.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from ..._middleware import meta_of, with_meta
from ..._model import Call, Group, TaskContext
from ..._records import NewTask, TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["CombinedRules"]

CallNext = Callable[[], Awaitable[Any]]


class CombinedRules(EngineSuiteBase):
    """Cancelling, progress, groups, middleware, hooks and metadata hold together, not only one by one."""

    async def test_a_cancel_ends_a_middleware_wrapped_attempt_cancelled_whatever_the_middleware_does(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started = anyio.Event()
        seen: list[tuple[str, bool]] = []

        @tasks.middleware
        async def swallowing(ctx: TaskContext, call_next: CallNext) -> Any:
            try:
                return await call_next()
            except BaseException:  # a middleware that (wrongly) turns every failure into a result
                seen.append(("swallowing", ctx.cancel_requested))
                return "swallowed"

        @tasks.middleware
        async def observing(ctx: TaskContext, call_next: CallNext) -> Any:
            try:
                return await call_next()
            finally:
                seen.append(("observing", ctx.cancel_requested))

        @tasks.register(name="suite.both.endless", max_retries=3)
        async def endless() -> None:  # no TaskContext: the middleware's is the attempt's all the same
            started.set()
            await anyio.sleep_forever()

        @tasks.register(name="suite.both.marker")
        async def marker() -> None: ...

        await engine.start(tasks)
        task_id = await tasks.enqueue(endless)
        with anyio.fail_after(WAIT):
            await started.wait()
        assert await tasks.cancel(task_id) is True
        info = await engine.finished(tasks, task_id, TaskState.CANCELLED)
        assert seen == [("observing", True), ("swallowing", True)], (
            "the cancellation went out through every middleware, which saw ctx.cancel_requested"
        )
        assert (info.attempts, info.result) == (1, None), (
            "cancelled, not succeeded with the middleware's value"
        )
        await engine.finished(tasks, await tasks.enqueue(marker), TaskState.SUCCEEDED)
        again = await tasks.info(task_id)
        assert again is not None
        assert (again.state, again.attempts) == (TaskState.CANCELLED, 1), "and never retried"

    async def test_a_def_task_under_middleware_sees_cancel_requested_through_the_same_context(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started = threading.Event()
        contexts: list[TaskContext] = []

        @tasks.middleware
        async def remember(ctx: TaskContext, call_next: CallNext) -> Any:
            contexts.append(ctx)
            result = await call_next()
            return f"wrapped {result}"

        @tasks.register(name="suite.both.polling", max_retries=3)
        def polling(ctx: TaskContext) -> str:
            contexts.append(ctx)
            started.set()
            pause = threading.Event()
            for _ in range(int(WAIT / 0.005)):
                if ctx.cancel_requested:
                    return "stopped early"
                pause.wait(0.005)
            return "never asked"

        await engine.start(tasks)
        task_id = await tasks.enqueue(polling)
        assert await anyio.to_thread.run_sync(started.wait, WAIT), "the def task did not start"
        assert await tasks.cancel(task_id) is True
        info = await engine.finished(tasks, task_id, TaskState.CANCELLED)
        assert len(contexts) == 2
        assert contexts[0] is contexts[1], "the task gets the context its middleware got"
        assert contexts[0].cancel_requested is True
        assert (info.attempts, info.result) == (1, None)

    async def test_hooks_see_a_groups_members_then_its_then_and_meta_reaches_both(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        hooked: list[tuple[str, str | None, str]] = []
        meta_seen: dict[str, dict[str, str]] = {}
        results: list[Any] = []

        @tasks.on_enqueue
        def tag(task: NewTask) -> NewTask:
            hooked.append((task.id, task.group_id, task.name))
            return with_meta(task, hooked=task.name)

        @tasks.register(name="suite.both.part")
        async def part(ctx: TaskContext, n: int) -> int:
            meta_seen[ctx.task_id] = dict(ctx.meta)
            return n * 2

        @tasks.register(name="suite.both.join")
        async def join(ctx: TaskContext) -> str:
            meta_seen[ctx.task_id] = dict(ctx.meta)
            results.append(ctx.previous_result)
            return "joined"

        group_id = await tasks.enqueue_group(
            [Call(part, 1, meta={"tenant": "a"}), Call(part, 2)],
            then=Call(join, meta={"tenant": "b"}),
        )
        info = await tasks.group_info(group_id)
        assert info is not None
        members = list(info.task_ids)
        assert hooked[:2] == [
            (members[0], group_id, "suite.both.part"),
            (members[1], group_id, "suite.both.part"),
        ], "members first, in call order, each already in its group"
        assert len(hooked) == 3, "and then the then, once, in the same batch"
        then_hooked_id, then_group, then_name = hooked[2]
        assert (then_group, then_name) == (None, "suite.both.join"), "the then is not a member"
        await engine.start(tasks)
        final = await tasks.wait_group(group_id, timeout=WAIT)
        assert final.state is TaskState.SUCCEEDED
        assert final.then_id == then_hooked_id, "the then stored is the one the hooks saw"
        then = await engine.finished(tasks, then_hooked_id, TaskState.SUCCEEDED)
        assert results == [[2, 4]], "the hooks kept the engine's bookkeeping: the then got the results"
        assert meta_seen[members[0]] == {"tenant": "a", "hooked": "suite.both.part"}
        assert meta_seen[members[1]] == {"hooked": "suite.both.part"}
        assert meta_seen[then_hooked_id] == {"tenant": "b", "hooked": "suite.both.join"}, (
            "a standalone group's then has its own Call's metadata (and the hooks'), not a member's"
        )
        assert then.meta == meta_seen[then_hooked_id]
        assert len(hooked) == 3, "running the group stored nothing more"

    async def test_a_hook_that_raises_for_a_groups_then_stores_nothing_of_the_group(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        seen: list[str] = []

        class Refused(Exception):
            pass

        @tasks.on_enqueue
        def refuse_joins(task: NewTask) -> None:
            seen.append(task.id)
            if meta_of(task).get("refuse") == "yes":
                raise Refused(f"not storing {task.id}")

        @tasks.register(name="suite.both.part")
        async def part(n: int) -> int:
            return n

        @tasks.register(name="suite.both.join")
        async def join() -> None: ...

        with pytest.raises(Refused):
            await tasks.enqueue_group([Call(part, 1), Call(part, 2)], then=Call(join, meta={"refuse": "yes"}))
        assert len(seen) == 3, "the members went through the hooks before the then raised"
        group_id = seen[0].rsplit(".", 1)[0]
        assert await tasks.group_info(group_id) is None, "the group is not stored"
        assert await tasks.list() == [], "nor any of its members"
        with pytest.raises(Refused):
            await tasks.enqueue_group([Call(part, 1), Call(part, 2, meta={"refuse": "yes"})])
        assert await tasks.list() == []

    async def test_a_chains_group_step_goes_through_the_hooks_and_carries_the_chains_meta(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        hooked: list[tuple[str, str | None]] = []
        meta_seen: dict[str, dict[str, str]] = {}

        @tasks.on_enqueue
        def count(task: NewTask) -> NewTask:
            hooked.append((task.id, task.group_id))
            return with_meta(task, seen="yes")

        @tasks.register(name="suite.both.step")
        async def step(ctx: TaskContext, n: int) -> Any:
            meta_seen[ctx.task_id] = dict(ctx.meta)
            return n if ctx.previous_result is None else [n, ctx.previous_result]

        chain_id = await tasks.enqueue_chain(
            [
                Call(step, 0, meta={"tenant": "acme"}),
                Group([Call(step, 1, meta={"member": "one"}), Call(step, 2)]),
                Call(step, 3, meta={"last": "yes"}),
            ]
        )
        assert hooked == [(f"{chain_id}.0", None)]
        await engine.start(tasks)
        await engine.finished(tasks, f"{chain_id}.0", TaskState.SUCCEEDED)  # the group is stored with it
        final = await tasks.wait_group(f"{chain_id}.1", timeout=WAIT)
        assert final.state is TaskState.SUCCEEDED
        last = await engine.finished(tasks, f"{chain_id}.2", TaskState.SUCCEEDED)
        members = list(final.task_ids)
        assert hooked == [
            (f"{chain_id}.0", None),
            (members[0], f"{chain_id}.1"),  # stored by the worker with step 0's success, through its hooks
            (members[1], f"{chain_id}.1"),
            (f"{chain_id}.2", None),  # the group's then: stored by the fan-in, hooked with the group
        ]
        assert meta_seen[f"{chain_id}.0"] == {"tenant": "acme", "seen": "yes"}
        assert meta_seen[members[0]] == {"tenant": "acme", "member": "one", "seen": "yes"}, (
            "a member: the chain's metadata, updated with its own"
        )
        assert meta_seen[members[1]] == {"tenant": "acme", "seen": "yes"}
        assert meta_seen[f"{chain_id}.2"] == {"tenant": "acme", "last": "yes", "seen": "yes"}, (
            "the step after the group: the chain's metadata and its own, not what one member added"
        )
        assert last.result == [3, [[1, 0], [2, 0]]]

    async def test_progress_from_middleware_and_from_the_task_it_wraps_is_stored(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        go_on = anyio.Event()

        @tasks.middleware
        async def reporting(ctx: TaskContext, call_next: CallNext) -> Any:
            await ctx.progress(0, None, "starting")
            result = await call_next()
            await ctx.progress(message=f"wrapped up {result}")
            return result

        @tasks.register(name="suite.both.work")
        async def work(ctx: TaskContext, total: int) -> int:
            await go_on.wait()
            for done in range(1, total + 1):
                await ctx.progress(done, total, f"row {done}")
            return total

        @tasks.register(name="suite.both.quiet")
        async def quiet() -> str:  # no TaskContext: its middleware still reports for it
            return "quiet"

        await engine.start(tasks)
        task_id = await tasks.enqueue(work, 3)

        async def starting_stored() -> bool:
            info = await tasks.info(task_id)
            assert info is not None
            return (info.progress, info.progress_message) == ((0.0, None), "starting")

        await engine.eventually(starting_stored, "the middleware's report, made before the task ran, stored")
        go_on.set()
        done = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert (done.progress, done.progress_message) == ((None, None), "wrapped up 3"), (
            "the middleware's last report, made after the task returned, is stored before the verdict"
        )
        silent = await engine.finished(tasks, await tasks.enqueue(quiet), TaskState.SUCCEEDED)
        assert (silent.progress, silent.progress_message) == ((None, None), "wrapped up quiet")
