"""Engine conformance rules for groups through the public API: ``enqueue_group`` with a ``then`` that runs
once with the members' results in call order, ``group_info``/``wait_group``, a dead member stopping the group,
a member recovered from a dead worker, and a :class:`Group` as a step of a chain.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from ..._model import Abort, Call, Group, GroupInfo, TaskContext
from ..._records import TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["FanInRules"]


class FanInRules(EngineSuiteBase):
    """Groups fan in exactly once: ``then`` runs once every member succeeded, with their results in call
    order; a dead or cancelled member makes the group final without it."""

    async def test_then_runs_once_with_the_members_results_in_call_order(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(concurrency=4)
        gates = [anyio.Event() for _ in range(4)]
        started: list[int] = []
        received: list[Any] = []

        @tasks.register(name="suite.square")
        async def square(n: int) -> int:
            started.append(n)
            await gates[n].wait()
            return n * n

        @tasks.register(name="suite.collect")
        async def collect(ctx: TaskContext, label: str) -> str:
            received.append(ctx.previous_result)
            return label

        group_id = await tasks.enqueue_group([Call(square, n) for n in range(4)], then=Call(collect, "all"))
        info = await tasks.group_info(group_id)
        assert isinstance(info, GroupInfo)
        assert (info.id, info.state, info.then_id) == (group_id, TaskState.PENDING, None)
        assert len(info.task_ids) == 4
        assert info.counts[TaskState.PENDING] == 4
        assert set(info.counts) == set(TaskState), "counts has every state"
        for task_id in info.task_ids:
            member = await tasks.info(task_id)
            assert member is not None
            assert (member.name, member.group_id) == ("suite.square", group_id)
        await engine.start(tasks)
        await engine.eventually(lambda: _started(started, 4), "every member started")
        running = await tasks.group_info(group_id)
        assert running is not None
        assert running.state is TaskState.ACTIVE
        for gate in reversed(gates):  # the members finish in reverse call order
            gate.set()
        final = await tasks.wait_group(group_id, timeout=WAIT)
        assert final.state is TaskState.SUCCEEDED
        assert final.counts[TaskState.SUCCEEDED] == 4
        assert final.then_id is not None
        then = await engine.finished(tasks, final.then_id, TaskState.SUCCEEDED)
        assert then.result == "all"
        assert received == [[0, 1, 4, 9]], "then ran once, with the results in call order"

    async def test_a_dead_member_makes_the_group_dead_and_then_never_runs(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        thens: list[Any] = []

        @tasks.register(name="suite.maybe")
        async def maybe(n: int) -> int:
            if n == 1:
                raise Abort("member 1 cannot")
            return n

        @tasks.register(name="suite.then")
        async def then(ctx: TaskContext) -> None:
            thens.append(ctx.previous_result)

        @tasks.register(name="suite.marker")
        async def marker() -> None: ...

        await engine.start(tasks)
        group_id = await tasks.enqueue_group([Call(maybe, n) for n in range(3)], then=Call(then))
        final = await tasks.wait_group(group_id, timeout=WAIT)
        assert final.state is TaskState.DEAD, "wait_group returns a dead group, it does not raise"
        assert final.then_id is None
        for task_id in final.task_ids:
            await engine.finished(tasks, task_id)
        await engine.finished(tasks, await tasks.enqueue(marker), TaskState.SUCCEEDED)
        after = await tasks.group_info(group_id)
        assert after is not None
        assert after.counts[TaskState.DEAD] == 1
        assert after.counts[TaskState.SUCCEEDED] == 2
        assert (after.state, after.then_id) == (TaskState.DEAD, None)
        assert thens == []

    async def test_cancelling_a_pending_member_cancels_the_group(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.later")
        async def later() -> None: ...

        group_id = await tasks.enqueue_group([Call(later, delay=60), Call(later, delay=60)], then=Call(later))
        info = await tasks.group_info(group_id)
        assert info is not None
        assert await tasks.cancel(info.task_ids[0]) is True
        cancelled = await tasks.wait_group(group_id, timeout=WAIT)
        assert (cancelled.state, cancelled.counts[TaskState.CANCELLED]) == (TaskState.CANCELLED, 1)
        assert cancelled.counts[TaskState.PENDING] == 1, "the other members are left as they are"

    async def test_a_member_recovered_from_a_dead_worker_completes_the_group_once(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(lease=5.0)
        runs: list[int] = []

        @tasks.register(name="suite.part")
        async def part(ctx: TaskContext, n: int) -> int:
            return n + 10 * ctx.attempt

        @tasks.register(name="suite.join")
        async def join(ctx: TaskContext) -> list[int]:
            runs.append(len(ctx.previous_result))
            return list(ctx.previous_result)

        group_id = await tasks.enqueue_group([Call(part, 0), Call(part, 1)], then=Call(join))
        now = engine.clock()
        # A worker that claims the first member and dies: the member is recovered and retried.
        (lost,) = await tasks.backend.claim(["default"], 1, now=now, lease_until=now + 5.0)
        engine.clock.advance(6)
        assert await tasks.recover_expired() == 1
        await engine.start(tasks)
        final = await tasks.wait_group(group_id, timeout=WAIT)
        assert final.state is TaskState.SUCCEEDED
        assert final.then_id is not None
        then = await engine.finished(tasks, final.then_id, TaskState.SUCCEEDED)
        assert lost.record.id == final.task_ids[0]
        assert then.result == [20, 11], "the retried member's second attempt, then the other's first"
        assert runs == [2]

    async def test_wait_group_times_out_and_unknown_groups_are_reported(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.later")
        async def later() -> None: ...

        group_id = await tasks.enqueue_group([Call(later, delay=60)])
        with pytest.raises(TimeoutError, match=group_id):
            await tasks.wait_group(group_id, timeout=0.05)
        assert await tasks.group_info("group-none") is None
        with pytest.raises(LookupError, match="group-none"):
            await tasks.wait_group("group-none", timeout=WAIT)

    async def test_enqueue_group_checks_its_calls_and_stores_nothing_when_one_is_bad(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(execution=False)

        @tasks.register(name="suite.one")
        async def one(n: int) -> None: ...

        with pytest.raises(ValueError, match="at least one Call"):
            await tasks.enqueue_group([])
        with pytest.raises(TypeError, match="task_id"):
            await tasks.enqueue_group([Call(one, 1, task_id="mine")])
        with pytest.raises(TypeError, match="Call objects"):
            await tasks.enqueue_group([one])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="takes 1 argument"):
            await tasks.enqueue_group([Call(one, 1), Call(one)])  # type: ignore[call-arg, arg-type]
        with pytest.raises(TypeError, match="then"):
            await tasks.enqueue_group([Call(one, 1)], then=one)  # type: ignore[arg-type]
        assert await tasks.list() == []

    # -- groups in chains ------------------------------------------------------------------------------------

    async def test_a_group_step_of_a_chain_passes_the_results_on(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        seen: dict[str, list[Any]] = {"b": [], "c": []}

        @tasks.register(name="suite.a")
        async def a(n: int) -> int:
            return n

        @tasks.register(name="suite.b")
        async def b(ctx: TaskContext, k: int) -> int:
            seen["b"].append(ctx.previous_result)
            previous: int = ctx.previous_result
            return previous * k

        @tasks.register(name="suite.c")
        async def c(ctx: TaskContext) -> int:
            seen["c"].append(ctx.previous_result)
            results: list[int] = ctx.previous_result
            return sum(results)

        await engine.start(tasks)
        chain_id = await tasks.enqueue_chain([Call(a, 2), Group([Call(b, 1), Call(b, 10)]), Call(c)])
        info = await engine.until(
            tasks, chain_id, lambda info: info.chain is not None and info.chain.state.is_final
        )
        assert info.chain is not None
        assert (info.chain.state, info.chain.result) == (TaskState.SUCCEEDED, 22)
        assert sorted(seen["b"]) == [2, 2], "each member receives the previous step's result"
        assert seen["c"] == [[2, 20]], "the step after the group receives its results in call order"
        steps = info.chain.steps
        assert [step.state for step in steps] == [TaskState.SUCCEEDED] * 3
        assert steps[1].name.startswith("group of 2")
        group = await tasks.group_info(steps[1].task_id)
        assert group is not None
        assert group.state is TaskState.SUCCEEDED

    async def test_a_chain_may_start_and_end_with_a_group(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.double")
        async def double(ctx: TaskContext, n: int) -> int:
            previous = ctx.previous_result
            added: int = sum(previous) if isinstance(previous, list) else 0
            return 2 * n + added

        await engine.start(tasks)
        chain_id = await tasks.enqueue_chain(
            [Group([Call(double, 1), Call(double, 2)]), Call(double, 100), Group([Call(double, 0)])]
        )
        info = await engine.until(
            tasks, chain_id, lambda info: info.chain is not None and info.chain.state.is_final
        )
        assert info.chain is not None
        assert info.chain.state is TaskState.SUCCEEDED
        assert info.chain.result == [0], "a chain that ends with a group returns the list of its results"
        middle = await tasks.info(info.chain.steps[1].task_id)
        assert middle is not None
        assert middle.result == 206, "the step after the first group received [2, 4]"

    async def test_two_groups_in_a_row_are_refused(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(execution=False)

        @tasks.register(name="suite.one")
        async def one() -> None: ...

        with pytest.raises(ValueError, match="both groups"):
            await tasks.enqueue_chain([Group([Call(one)]), Group([Call(one)])])
        assert await tasks.list() == []


async def _started(started: list[int], count: int) -> bool:
    return len(started) >= count
