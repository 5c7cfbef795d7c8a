"""Engine conformance rules about middleware around every attempt, ``on_enqueue`` hooks on every path that
stores a task, and the user's metadata travelling from the enqueue to the task (``ctx.meta``) and to
``TaskInfo.meta``."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ..._meta import add_sections
from ..._middleware import meta_of, with_meta
from ..._model import Abort, Call, Retry, TaskContext
from ..._records import NewTask, TaskState
from ..._schedule import fire_task_id
from ._harness import EngineHarness, EngineSuiteBase
from ._rules_compose import INTERVAL, _handled, _scheduling

__all__ = ["MiddlewareRules"]

CallNext = Callable[[], Awaitable[Any]]


class MiddlewareRules(EngineSuiteBase):
    """Middleware wrap each attempt in order and decide its outcome like the task would; hooks see every
    task before it is stored, on every path; metadata goes round trip, apart from the engine's own."""

    async def test_middleware_wrap_every_attempt_outermost_first(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        seen: list[object] = []
        loop_thread = threading.get_ident()

        @tasks.middleware
        async def outer(ctx: TaskContext, call_next: CallNext) -> Any:
            seen.append(("outer", ctx.name, ctx.attempt, dict(ctx.meta)))
            result = await call_next()
            seen.append(("outer done", result))
            return {"wrapped": result}

        @tasks.middleware
        async def inner(ctx: TaskContext, call_next: CallNext) -> Any:
            seen.append(("inner", ctx.task_id))
            result = await call_next()
            seen.append(("inner done", result))
            return result * 10

        @tasks.register(name="suite.mw.add")
        async def add(a: int, b: int) -> int:  # no TaskContext: middleware get one all the same
            seen.append("add")
            return a + b

        @tasks.register(name="suite.mw.sync")
        def multiply(ctx: TaskContext, a: int) -> int:
            seen.append(("multiply", ctx.task_id, threading.get_ident() != loop_thread))
            return a * 3

        await engine.start(tasks)
        first = await tasks.enqueue(add, 1, 2, meta={"tenant": "acme"})
        info = await engine.finished(tasks, first, TaskState.SUCCEEDED)
        assert info.result == {"wrapped": 30}
        assert seen == [
            ("outer", "suite.mw.add", 1, {"tenant": "acme"}),
            ("inner", first),
            "add",
            ("inner done", 3),
            ("outer done", 30),
        ]
        seen.clear()
        second = await tasks.enqueue(multiply, 2)
        info = await engine.finished(tasks, second, TaskState.SUCCEEDED)
        assert info.result == {"wrapped": 60}
        assert seen == [
            ("outer", "suite.mw.sync", 1, {}),
            ("inner", second),
            ("multiply", second, True),  # the plain def runs in its worker thread, inside call_next
            ("inner done", 6),
            ("outer done", 60),
        ]

    async def test_a_middleware_that_does_not_call_next_gives_the_result(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        ran: list[str] = []

        @tasks.middleware
        async def cached(ctx: TaskContext, call_next: CallNext) -> Any:
            if ctx.meta.get("cached") == "yes":
                return "from the cache"
            return await call_next()

        @tasks.register(name="suite.mw.expensive")
        async def expensive() -> str:
            ran.append("expensive")
            return "computed"

        await engine.start(tasks)
        hit = await tasks.enqueue(expensive, meta={"cached": "yes"})
        miss = await tasks.enqueue(expensive)
        assert (await engine.finished(tasks, hit, TaskState.SUCCEEDED)).result == "from the cache"
        assert (await engine.finished(tasks, miss, TaskState.SUCCEEDED)).result == "computed"
        assert ran == ["expensive"], "the task runs only where call_next() was called"

    async def test_retry_and_abort_from_middleware_fail_the_attempt_as_from_the_task(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        ran: list[tuple[str, int]] = []

        @tasks.middleware
        async def gate(ctx: TaskContext, call_next: CallNext) -> Any:
            if ctx.meta.get("mode") == "retry" and ctx.attempt == 1:
                raise Retry(after=30.0, reason="upstream busy")
            result = await call_next()
            if ctx.meta.get("mode") == "abort":
                raise Abort("the result is not acceptable")
            if ctx.meta.get("mode") == "fail":
                raise LookupError("middleware failure after the task")
            return result

        @tasks.register(name="suite.mw.job", max_retries=0)
        async def job(ctx: TaskContext) -> int:
            ran.append((ctx.meta["mode"], ctx.attempt))
            return ctx.attempt

        @tasks.register(name="suite.mw.retried", max_retries=1)
        async def retried(ctx: TaskContext) -> int:
            ran.append((ctx.meta["mode"], ctx.attempt))
            return ctx.attempt

        await engine.start(tasks)
        start = engine.clock()
        retry_id = await tasks.enqueue(retried, meta={"mode": "retry"})
        waiting = await engine.retry_waiting(tasks, retry_id)
        assert waiting.run_at == start + 30.0, "Retry(after=30) from middleware sets the next attempt"
        assert "upstream busy" in (waiting.last_error or "")
        assert ran == [], "the middleware raised before call_next(): the task did not run"
        engine.clock.advance(30.0)
        info = await engine.finished(tasks, retry_id, TaskState.SUCCEEDED)
        assert (info.result, info.attempts) == (2, 2)

        abort_id = await tasks.enqueue(job, meta={"mode": "abort"})
        dead = await engine.finished(tasks, abort_id, TaskState.DEAD)
        assert dead.attempts == 1
        assert "aborted by the task: the result is not acceptable" in (dead.last_error or "")

        fail_id = await tasks.enqueue(job, meta={"mode": "fail"})
        failed = await engine.finished(tasks, fail_id, TaskState.DEAD)
        assert "LookupError: middleware failure after the task" in (failed.last_error or "")
        assert "gate" in (failed.last_error or ""), "the traceback names the middleware"
        assert ran == [("retry", 2), ("abort", 1), ("fail", 1)]

    async def test_call_next_runs_the_task_once_per_attempt(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        ran: list[int] = []

        @tasks.middleware
        async def twice(ctx: TaskContext, call_next: CallNext) -> Any:
            await call_next()
            return await call_next()

        @tasks.register(name="suite.mw.once", max_retries=0)
        async def once(ctx: TaskContext) -> None:
            ran.append(ctx.attempt)

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(once), TaskState.DEAD)
        assert "called call_next() twice" in (info.last_error or "")
        assert ran == [1]

    async def test_middleware_added_while_the_worker_runs_wraps_the_next_attempts(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.mw.plain")
        async def plain() -> str:
            return "plain"

        await engine.start(tasks)
        before = await engine.finished(tasks, await tasks.enqueue(plain), TaskState.SUCCEEDED)
        assert before.result == "plain"

        @tasks.middleware
        async def shout(ctx: TaskContext, call_next: CallNext) -> Any:
            return str(await call_next()).upper()

        after = await engine.finished(tasks, await tasks.enqueue(plain), TaskState.SUCCEEDED)
        assert after.result == "PLAIN"

    async def test_hooks_see_every_task_before_it_is_stored_on_every_path(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        hooked: list[tuple[str, str]] = []
        seen_meta: dict[str, dict[str, str]] = {}

        @tasks.on_enqueue
        def first_hook(task: NewTask) -> NewTask:
            hooked.append((task.name, task.id))
            return with_meta(task, hooked="yes", name=task.name)

        @tasks.on_enqueue
        def second_hook(task: NewTask) -> NewTask | None:
            assert meta_of(task)["hooked"] == "yes", "hooks run in order, each on the previous one's task"
            if task.name == "suite.hook.bulk":
                return dataclasses.replace(task, priority=7)
            return None

        def remember(ctx: TaskContext) -> str:
            seen_meta[ctx.task_id] = dict(ctx.meta)
            return ctx.task_id

        @tasks.register(name="suite.hook.one")
        async def one(ctx: TaskContext) -> str:
            return remember(ctx)

        @tasks.register(name="suite.hook.bulk")
        async def bulk(ctx: TaskContext, n: int) -> str:
            return remember(ctx)

        @tasks.register(name="suite.hook.step")
        async def step(ctx: TaskContext, n: int) -> str:
            return remember(ctx)

        @tasks.register(name="suite.hook.tick")
        async def tick(ctx: TaskContext) -> str:
            return remember(ctx)

        tasks.every(tick, INTERVAL, name="suite-hook-tick")
        single = await tasks.enqueue(one)
        many = await tasks.enqueue_many([Call(bulk, 1), Call(bulk, 2, meta={"own": "kept"})])
        assert hooked == [
            ("suite.hook.one", single),
            ("suite.hook.bulk", many[0]),
            ("suite.hook.bulk", many[1]),
        ]
        chain_id = await tasks.enqueue_chain([Call(step, 0), Call(step, 1), Call(step, 2)])
        assert hooked[-1] == ("suite.hook.step", f"{chain_id}.0"), "only the first step is stored now"
        stored = await tasks.info(many[1])
        assert stored is not None
        assert (stored.priority, stored.meta) == (
            7,
            {"hooked": "yes", "name": "suite.hook.bulk", "own": "kept"},
        )

        await engine.start(tasks)
        await _scheduling(tasks)
        fire = tasks.schedules()[0].next_fire
        assert fire is not None
        engine.clock.set(fire)
        await _handled([tasks], "suite-hook-tick", fire)
        fired = fire_task_id("suite-hook-tick", fire)
        ids = [single, *many, f"{chain_id}.0", f"{chain_id}.1", f"{chain_id}.2", fired]
        for task_id in ids:
            info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
            assert info.meta["hooked"] == "yes", info
            assert info.meta["name"] == info.name, "each task went through the hooks itself"
            assert seen_meta[task_id] == dict(info.meta), "the task reads what TaskInfo shows"
        assert sorted(hooked) == sorted(
            [
                ("suite.hook.one", single),
                ("suite.hook.bulk", many[0]),
                ("suite.hook.bulk", many[1]),
                ("suite.hook.step", f"{chain_id}.0"),
                ("suite.hook.step", f"{chain_id}.1"),  # stored by the worker, with the success of step 0
                ("suite.hook.step", f"{chain_id}.2"),
                ("suite.hook.tick", fired),
            ]
        ), "once for each task stored, whichever path stored it"

    async def test_a_hook_that_raises_stores_nothing_of_the_batch(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        class Refused(Exception):
            pass

        @tasks.on_enqueue
        def refuse(task: NewTask) -> None:
            if meta_of(task).get("refuse") == "yes":
                raise Refused(f"not storing {task.id}")

        @tasks.register(name="suite.hook.job")
        async def job(n: int) -> int:
            return n

        with pytest.raises(Refused):
            await tasks.enqueue_many([Call(job, 1), Call(job, 2, meta={"refuse": "yes"}), Call(job, 3)])
        with pytest.raises(Refused):
            await tasks.enqueue(job, 4, meta={"refuse": "yes"})
        with pytest.raises(Refused):
            await tasks.enqueue_chain([Call(job, 5, meta={"refuse": "yes"}), Call(job, 6)])
        assert await tasks.list() == [], "nothing of a refused batch is stored"
        task_id = await tasks.enqueue(job, 7)
        assert [info.id for info in await tasks.list()] == [task_id]

    async def test_hooks_may_not_return_what_cannot_be_stored(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        mode: list[str] = []

        @tasks.on_enqueue
        def broken(task: NewTask) -> Any:
            if mode[-1] == "dict":
                return {"id": task.id}
            if mode[-1] == "same id":
                return dataclasses.replace(task, id="taken")
            if mode[-1] == "bookkeeping":
                return dataclasses.replace(task, meta=add_sections(task.meta, chain={"id": "forged"}))
            if mode[-1] == "raw meta":
                return dataclasses.replace(task, meta='{"user":{"n":1}}')
            if mode[-1] == "chain id":
                return dataclasses.replace(task, id="elsewhere")
            return None

        @tasks.register(name="suite.hook.job")
        async def job(n: int) -> int:
            return n

        mode.append("dict")
        with pytest.raises(TypeError, match=r"returned .* a hook returns a NewTask"):
            await tasks.enqueue(job, 1)
        mode.append("same id")
        with pytest.raises(ValueError, match="the id of another task of the same batch"):
            await tasks.enqueue_many([Call(job, 1), Call(job, 2)])
        mode.append("bookkeeping")
        with pytest.raises(ValueError, match="changed the engine's bookkeeping"):
            await tasks.enqueue(job, 1)
        mode.append("raw meta")
        with pytest.raises(TypeError, match="meta values must be str"):
            await tasks.enqueue(job, 1)
        mode.append("chain id")
        with pytest.raises(ValueError, match="fixes the ids of chain steps"):
            await tasks.enqueue_chain([Call(job, 1), Call(job, 2)])
        assert await tasks.list() == []
        mode.append("ok")
        assert await tasks.enqueue(job, 1, task_id="kept") == "kept"

    async def test_a_hook_that_refuses_a_later_chain_step_makes_its_predecessor_dead(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        ran: list[int] = []

        @tasks.on_enqueue
        def no_second_step(task: NewTask) -> None:
            if task.id.endswith(".1"):
                raise PermissionError("step 1 may not be stored")

        @tasks.register(name="suite.hook.step")
        async def step(n: int) -> int:
            ran.append(n)
            return n

        chain_id = await tasks.enqueue_chain([Call(step, 0), Call(step, 1)])
        await engine.start(tasks)
        info = await engine.finished(tasks, f"{chain_id}.0", TaskState.DEAD)
        assert "PermissionError: step 1 may not be stored" in (info.last_error or "")
        assert "on_enqueue hook" in (info.last_error or "")
        assert await tasks.info(f"{chain_id}.1") is None, "the refused step is not stored"
        assert ran == [0]

    async def test_metadata_goes_from_the_enqueue_to_the_task_without_the_engines(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        seen: list[dict[str, str]] = []

        @tasks.register(name="suite.meta.step")
        async def step(ctx: TaskContext, n: int) -> int:
            seen.append(dict(ctx.meta))
            with pytest.raises(TypeError):
                ctx.meta["tenant"] = "other"  # type: ignore[index]  # read-only
            return n

        chain_id = await tasks.enqueue_chain(
            [
                Call(step, 0, meta={"tenant": "acme", "trace": "t-1"}),
                Call(step, 1),
                Call(step, 2, meta={"trace": "t-2"}),
            ]
        )
        plain = await tasks.enqueue(step, 3)
        pending = await tasks.info(chain_id)
        assert pending is not None
        assert pending.meta == {"tenant": "acme", "trace": "t-1"}, "user keys named like engine sections"
        await engine.start(tasks)
        for index, expected in enumerate(
            [
                {"tenant": "acme", "trace": "t-1"},
                {"tenant": "acme", "trace": "t-1"},  # a later step inherits the previous step's metadata
                {"tenant": "acme", "trace": "t-2"},  # ... updated with its own Call's
            ]
        ):
            info = await engine.finished(tasks, f"{chain_id}.{index}", TaskState.SUCCEEDED)
            assert info.meta == expected
        assert (await engine.finished(tasks, plain, TaskState.SUCCEEDED)).meta == {}
        expected_seen = [
            {"tenant": "acme", "trace": "t-1"},
            {"tenant": "acme", "trace": "t-1"},
            {"tenant": "acme", "trace": "t-2"},
            {},
        ]
        assert sorted(seen, key=lambda meta: sorted(meta.items())) == sorted(
            expected_seen, key=lambda meta: sorted(meta.items())
        )

    async def test_bad_metadata_is_refused_before_anything_is_stored(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.meta.job")
        async def job() -> None:
            pass

        bad: list[tuple[Any, type[Exception], str]] = [
            ("tenant=acme", TypeError, "meta must be a mapping of str to str"),
            ({"n": 1}, TypeError, r"meta values must be str, got meta\['n'\] = 1"),
            ({1: "x"}, TypeError, "meta keys must be str, got the key 1"),
            ({"": "x"}, ValueError, "meta keys must be non-empty"),
            ({"k": "a\x00b"}, ValueError, "NUL character"),
            ({"k\x00": "v"}, ValueError, "NUL character"),
        ]
        for meta, error, message in bad:
            with pytest.raises(error, match=message):
                await tasks.enqueue(job, meta=meta)
            with pytest.raises(error, match=message):
                await tasks.enqueue_many([Call(job), Call(job, meta=meta)])
        assert await tasks.list() == []

        removed: list[NewTask] = []

        @tasks.on_enqueue
        def drop_secret(task: NewTask) -> NewTask:
            removed.append(task)
            return with_meta(task, {"secret": None}, kept="yes")

        task_id = await tasks.enqueue(job, meta={"secret": "s", "other": "o"})
        info = await tasks.info(task_id)
        assert info is not None
        assert info.meta == {"other": "o", "kept": "yes"}, "with_meta(..., key=None) removes the key"
        with pytest.raises(TypeError, match="meta values must be str"):
            with_meta(removed[0], n=1)  # type: ignore[arg-type]
