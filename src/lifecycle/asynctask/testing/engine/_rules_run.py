"""Engine conformance rules about running tasks: results, failures, retries, timeouts, unknown names."""

from __future__ import annotations

from typing import Any

import anyio

from ...._core._backoff import Backoff
from ..._model import Abort, Retry, TaskContext, TaskInfo
from ..._records import NewTask, TaskState
from ._harness import WAIT, EngineHarness, EngineSuiteBase

__all__ = ["RunRules"]


class RunRules(EngineSuiteBase):
    """enqueue -> run -> settle, for every kind of outcome."""

    async def test_a_task_runs_and_its_result_is_stored(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        seen: list[tuple[str, int, str]] = []

        @tasks.register(name="suite.add")
        async def add(ctx: TaskContext, a: int, b: list[int]) -> dict[str, Any]:
            seen.append((ctx.task_id, ctx.attempt, ctx.queue))
            return {"sum": a + sum(b), "pair": (a, b)}

        await engine.start(tasks)
        task_id = await tasks.enqueue(add, 1, [2, 3])
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert info.result == {"sum": 6, "pair": (1, [2, 3])}
        assert seen == [(task_id, 1, "default")]
        assert (info.name, info.queue, info.attempts, info.max_retries) == ("suite.add", "default", 1, 5)
        assert info.last_error is None
        assert info.enqueued_at == info.run_at == engine.clock()
        assert info.finished_at == engine.clock()

    async def test_a_plain_def_runs_in_a_worker_thread(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.sync")
        def multiply(a: int, b: int) -> int:
            return a * b

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(multiply, 6, 7), TaskState.SUCCEEDED)
        assert info.result == 42

    async def test_a_result_the_encoding_cannot_encode_is_not_stored(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.odd_result")
        async def odd_result() -> object:
            return object()

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(odd_result), TaskState.SUCCEEDED)
        assert info.result is None

    async def test_failures_are_retried_then_the_task_is_dead_with_its_traceback(
        self, engine: EngineHarness
    ) -> None:
        failures: list[tuple[TaskInfo, BaseException]] = []
        tasks = await engine.tasks(on_error=lambda info, exc: failures.append((info, exc)))
        attempts: list[int] = []

        @tasks.register(name="suite.always_fails", max_retries=2)
        async def always_fails(ctx: TaskContext, what: str) -> None:
            attempts.append(ctx.attempt)
            raise ValueError(f"{what} failed on attempt {ctx.attempt}")

        await engine.start(tasks)
        task_id = await tasks.enqueue(always_fails, "the job")
        info = await engine.finished(tasks, task_id, TaskState.DEAD)
        assert attempts == [1, 2, 3], "max_retries=2 means three attempts"
        assert info.attempts == 3
        assert info.last_error is not None
        assert "Traceback (most recent call last)" in info.last_error
        assert "ValueError: the job failed on attempt 3" in info.last_error
        assert "always_fails" in info.last_error, "the traceback names the failing function"
        assert [(f.state, f.attempts) for f, _ in failures] == [
            (TaskState.PENDING, 1),
            (TaskState.PENDING, 2),
            (TaskState.DEAD, 3),
        ]
        assert all(isinstance(exc, ValueError) for _, exc in failures)

    async def test_a_failed_attempt_waits_for_the_backoff(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks(retry_backoff=Backoff(initial=10.0, cap=1000.0, jitter=False))
        ran = anyio.Event()

        @tasks.register(name="suite.fails_once")
        async def fails_once(ctx: TaskContext) -> str:
            if ctx.attempt == 1:
                ran.set()
                raise RuntimeError("first attempt fails")
            return "second attempt"

        await engine.start(tasks)
        start = engine.clock()
        task_id = await tasks.enqueue(fails_once)
        info = await engine.retry_waiting(tasks, task_id)
        assert ran.is_set()
        assert info.run_at == start + 10.0, "the first retry waits backoff.delay(1) = initial"
        assert info.attempts == 1
        assert info.last_error is not None
        assert "RuntimeError: first attempt fails" in info.last_error
        engine.clock.advance(10.0)
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert (info.result, info.attempts) == ("second attempt", 2)
        assert "first attempt fails" in (info.last_error or ""), "last_error keeps the latest failure"

    async def test_retry_asks_for_another_attempt_after_the_given_delay(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.retry_later")
        async def retry_later(ctx: TaskContext) -> int:
            if ctx.attempt == 1:
                raise Retry(after=42.0, reason="rate limited")
            return ctx.attempt

        await engine.start(tasks)
        start = engine.clock()
        task_id = await tasks.enqueue(retry_later)
        info = await engine.retry_waiting(tasks, task_id)
        assert info.run_at == start + 42.0
        assert info.last_error is not None
        assert "rate limited" in info.last_error
        engine.clock.advance(42.0)
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert info.result == 2

    async def test_retry_is_bounded_by_max_retries(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.retry_forever", max_retries=1)
        async def retry_forever() -> None:
            raise Retry(reason="not yet")

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(retry_forever), TaskState.DEAD)
        assert info.attempts == 2
        assert info.last_error is not None
        assert "no retries left" in info.last_error

    async def test_abort_makes_the_task_dead_at_once(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.abort")
        async def abort(order_id: int) -> None:
            raise Abort(f"order {order_id} does not exist")

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(abort, 7), TaskState.DEAD)
        assert info.attempts == 1
        assert info.last_error is not None
        assert "order 7 does not exist" in info.last_error

    async def test_a_task_over_its_timeout_is_cancelled_and_fails(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()
        cancelled = anyio.Event()

        @tasks.register(name="suite.hangs", max_retries=0, timeout=0.2)
        async def hangs() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        await engine.start(tasks)
        info = await engine.finished(tasks, await tasks.enqueue(hangs), TaskState.DEAD)
        assert cancelled.is_set(), "the task must be cancelled at its deadline"
        assert info.last_error is not None
        assert "timed out after 0.2 s" in info.last_error
        assert info.timeout == 0.2

    async def test_the_timeout_given_at_enqueue_overrides_the_registered_one(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.slowish", max_retries=0, timeout=0.1)
        async def slowish(ctx: TaskContext) -> float | None:
            return ctx.deadline

        await engine.start(tasks)
        task_id = await tasks.enqueue(slowish, timeout=120)
        info = await engine.finished(tasks, task_id, TaskState.SUCCEEDED)
        assert info.timeout == 120.0
        assert info.result == engine.clock() + 120.0, "ctx.deadline is the start time plus the timeout"

    async def test_an_unknown_task_name_is_retried_then_dead_with_a_clear_error(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        await engine.start(tasks)
        task_id = await tasks.enqueue("suite.nobody_registered_this", 1, max_retries=1)
        info = await engine.finished(tasks, task_id, TaskState.DEAD)
        assert info.attempts == 2, "an unknown name is retried first (another worker version may know it)"
        assert info.last_error is not None
        assert (
            "no task function is registered under the name 'suite.nobody_registered_this'" in info.last_error
        )

    async def test_a_payload_that_cannot_be_decoded_is_dead_at_once(self, engine: EngineHarness) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.never_called")
        async def never_called(value: int) -> None:
            raise AssertionError("must not run with a corrupt payload")

        now = engine.clock()
        corrupt = NewTask(
            id="corrupt-payload",
            name="suite.never_called",
            queue="default",
            payload=b"\x80 this is not JSON",
            max_retries=5,
            timeout=None,
            enqueued_at=now,
            run_at=now,
        )
        await tasks.backend.enqueue_many([corrupt])
        await engine.start(tasks)
        info = await engine.finished(tasks, "corrupt-payload", TaskState.DEAD)
        assert info.attempts == 1, "retrying cannot make a payload readable"
        assert info.last_error is not None
        assert "cannot decode the arguments" in info.last_error

    async def test_poisoned_payloads_are_dead_and_their_batch_neighbours_run(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks(concurrency=8)

        @tasks.register(name="suite.echo")
        async def echo(value: int) -> int:
            return value

        now = engine.clock()
        poisons = {
            "poison-decimal": b'[{"__lifecycle__":"decimal","v":"abc"}]',  # decimal.InvalidOperation
            "poison-deep": b"[" * 1000 + b"]" * 1000,  # RecursionError without a depth limit
            "poison-set": b'[{"__lifecycle__":"set","v":[[1]]}]',  # TypeError: unhashable
        }
        stored = [
            NewTask(
                id=task_id,
                name="suite.echo",
                queue="default",
                payload=payload,
                max_retries=5,
                timeout=None,
                enqueued_at=now,
                run_at=now,
            )
            for task_id, payload in [
                ("healthy-0", tasks.encoding.encode((0,))),
                *poisons.items(),
                ("healthy-1", tasks.encoding.encode((1,))),
            ]
        ]
        await tasks.backend.enqueue_many(stored)
        running = await engine.start(tasks)
        for index in range(2):
            info = await engine.finished(tasks, f"healthy-{index}", TaskState.SUCCEEDED)
            assert (info.result, info.attempts) == (index, 1)
        for task_id in poisons:
            info = await engine.finished(tasks, task_id, TaskState.DEAD)
            assert info.attempts == 1, "retrying cannot make a payload readable"
            assert info.last_error is not None
            assert "cannot decode the arguments of task 'suite.echo'" in info.last_error
        assert not running.finished, "the worker survives poisoned payloads"
        info = await engine.finished(tasks, await tasks.enqueue(echo, 7), TaskState.SUCCEEDED)
        assert info.result == 7

    async def test_a_task_raising_keyboard_interrupt_fails_alone_and_the_worker_goes_on(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()
        started = anyio.Event()
        release = anyio.Event()

        @tasks.register(name="suite.interrupts", max_retries=1)
        async def interrupts() -> None:
            raise KeyboardInterrupt("raised by the task, not by a signal")

        @tasks.register(name="suite.exits", max_retries=0)
        def exits() -> None:  # in a worker thread
            raise SystemExit(3)

        @tasks.register(name="suite.neighbour")
        async def neighbour() -> str:
            started.set()
            await release.wait()
            return "unharmed"

        running = await engine.start(tasks)
        other = await tasks.enqueue(neighbour)
        with anyio.fail_after(WAIT):
            await started.wait()
        info = await engine.finished(tasks, await tasks.enqueue(interrupts), TaskState.DEAD)
        assert info.attempts == 2, "retried by its policy like any failure"
        assert "KeyboardInterrupt: raised by the task" in (info.last_error or "")
        info = await engine.finished(tasks, await tasks.enqueue(exits), TaskState.DEAD)
        assert "SystemExit: 3" in (info.last_error or "")
        release.set()
        info = await engine.finished(tasks, other, TaskState.SUCCEEDED)
        assert (info.result, info.attempts) == ("unharmed", 1), "no other task is charged an attempt"
        assert not running.finished, "the worker keeps running"

    async def test_an_error_text_no_backend_could_store_is_stored_escaped(
        self, engine: EngineHarness
    ) -> None:
        tasks = await engine.tasks()

        @tasks.register(name="suite.odd_message", max_retries=0)
        async def odd_message() -> None:
            raise ValueError("a NUL \x00 and a lone surrogate \udc80")

        @tasks.register(name="suite.beside")
        async def beside() -> str:
            return "saved"

        await engine.start(tasks)
        odd = await tasks.enqueue(odd_message)
        other = await tasks.enqueue(beside)
        info = await engine.finished(tasks, odd, TaskState.DEAD)
        assert "ValueError: a NUL \\x00 and a lone surrogate \\udc80" in (info.last_error or "")
        info = await engine.finished(tasks, other, TaskState.SUCCEEDED)
        assert info.result == "saved", "a verdict saved beside it is not held up"

    async def test_on_error_failures_never_break_the_worker(self, engine: EngineHarness) -> None:
        async def broken_hook(info: TaskInfo, exc: BaseException) -> None:
            raise RuntimeError("the hook itself fails")

        tasks = await engine.tasks(on_error=broken_hook)

        @tasks.register(name="suite.fails", max_retries=0)
        async def fails() -> None:
            raise ValueError("boom")

        @tasks.register(name="suite.works")
        async def works() -> str:
            return "still working"

        await engine.start(tasks)
        await engine.finished(tasks, await tasks.enqueue(fails), TaskState.DEAD)
        info = await engine.finished(tasks, await tasks.enqueue(works), TaskState.SUCCEEDED)
        assert info.result == "still working"
