"""Faults that belong to one task stay with that task: poisoned payloads, encodings that raise anything, a
task raising a BaseException, an engine error while handling one task. The worker goes on, every other task
of the batch runs, and nothing saved is lost (MemoryBackend, manual clock, asyncio and trio)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import pytest

from lifecycle import Backoff
from lifecycle.asynctask import (
    AsyncTasks,
    Call,
    ClaimedTask,
    FlowLimits,
    JSONEncoding,
    ManualClock,
    MemoryBackend,
    NewTask,
    Settlement,
    TaskContext,
    TaskInfo,
    TaskState,
)

T0 = 1_700_000_000.0
WAIT = 10.0


class CustomStop(BaseException):
    """A BaseException of the user's own."""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def group() -> AsyncIterator[Any]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


def make(backend: MemoryBackend, clock: ManualClock, **options: Any) -> AsyncTasks:
    defaults: dict[str, Any] = {
        "clock": clock,
        "poll_interval": 0.05,
        "retry_backoff": Backoff(initial=0.0, cap=0.0, jitter=False),
        "recovery_interval": 3600.0,
        "concurrency": 8,
    }
    return AsyncTasks(backend, **{**defaults, **options})


def raw_task(task_id: str, payload: bytes, *, name: str = "ok", max_retries: int = 3) -> NewTask:
    return NewTask(
        id=task_id,
        name=name,
        queue="default",
        payload=payload,
        max_retries=max_retries,
        timeout=None,
        enqueued_at=T0,
        run_at=T0,
    )


class Running:
    """``execute`` in the background, with its outcome kept: the worker must still be running at the end."""

    def __init__(self, tasks: AsyncTasks, group: Any) -> None:
        self.error: BaseException | None = None
        self.done = anyio.Event()
        group.start_soon(self._execute, tasks)

    async def _execute(self, tasks: AsyncTasks) -> None:
        try:
            await tasks.execute()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.done.set()

    def assert_alive(self) -> None:
        assert not self.done.is_set(), f"execute() ended: {self.error!r}"


POISONS = {
    "bad-decimal": b'[{"__lifecycle__":"decimal","v":"abc"}]',
    "deep": b"[" * 1000 + b"]" * 1000,
    "not-utf8": b'["\xc3\x28 invalid UTF-8"]',
    "tag-not-a-string": b'[{"__lifecycle__":["x"],"v":1}]',
    "huge-timedelta": b'[{"__lifecycle__":"timedelta","v":[1e300,0,0]}]',
    "unhashable-set": b'[{"__lifecycle__":"set","v":[[1]]}]',
    "bad-zone": b'[{"__lifecycle__":"datetime","v":"2024-01-01T00:00:00","tz":"No/Such_Zone"}]',
}


async def test_poisoned_payloads_are_dead_naming_the_cause_and_the_rest_of_the_batch_runs(
    clock: ManualClock, group: Any
) -> None:
    backend = MemoryBackend()
    tasks = make(backend, clock)

    @tasks.register(name="ok")
    async def ok(value: object) -> object:
        return value

    async with tasks:
        healthy = [raw_task(f"good-{i}", tasks.encoding.encode((i,))) for i in range(5)]
        poisoned = [raw_task(key, payload) for key, payload in POISONS.items()]
        # Poisoned tasks between healthy ones, all in one claim batch.
        await backend.enqueue_many([healthy[0], *poisoned[:4], healthy[1], *poisoned[4:], *healthy[2:]])
        worker = Running(tasks, group)
        for index, task in enumerate(healthy):
            info = await tasks.wait(task.id, timeout=WAIT)
            assert (info.state, info.result) == (TaskState.SUCCEEDED, index)
        errors: dict[str, str] = {}
        for key in POISONS:
            info = await tasks.wait(key, timeout=WAIT)
            assert info.state is TaskState.DEAD, key
            assert info.attempts == 1, f"{key}: retrying cannot help, so it is dead at once"
            assert info.last_error is not None
            assert info.last_error.startswith("cannot decode the arguments of task 'ok'"), info.last_error
            errors[key] = info.last_error
        assert "'decimal'" in errors["bad-decimal"]
        assert "nests 1000 levels deep" in errors["deep"]
        assert "UnicodeDecodeError" in errors["not-utf8"]
        assert "'timedelta'" in errors["huge-timedelta"]
        after = await tasks.enqueue(ok, "still here")
        assert (await tasks.wait(after, timeout=WAIT)).result == "still here"
        worker.assert_alive()


class FussyEncoding(JSONEncoding):
    """A third-party encoding that breaks the protocol: it raises whatever a payload names."""

    RAISES: dict[str, type[Exception]] = {
        "runtime": RuntimeError,
        "key": KeyError,
        "recursion": RecursionError,
        "memory": MemoryError,
    }

    def decode(self, data: bytes) -> Any:
        for key, error in self.RAISES.items():
            if f'"decode-raises-{key}"'.encode() in data:
                raise error(f"{key} from decode")
        return super().decode(data)

    def encode(self, value: Any) -> bytes:
        if value == "encode-raises":
            raise RuntimeError("the encoding broke on the result")
        return super().encode(value)


async def test_any_exception_from_a_third_party_decode_makes_only_that_task_dead(
    clock: ManualClock, group: Any
) -> None:
    tasks = make(MemoryBackend(), clock, encoding=FussyEncoding())

    @tasks.register(name="echo")
    async def echo(value: str) -> str:
        return value

    async with tasks:
        poisoned = {key: await tasks.enqueue(echo, f"decode-raises-{key}") for key in FussyEncoding.RAISES}
        fine = await tasks.enqueue(echo, "fine")
        worker = Running(tasks, group)
        assert (await tasks.wait(fine, timeout=WAIT)).result == "fine"
        for key, task_id in poisoned.items():
            info = await tasks.wait(task_id, timeout=WAIT)
            assert info.state is TaskState.DEAD
            error = FussyEncoding.RAISES[key].__name__
            assert info.last_error is not None
            assert f"cannot decode the arguments of task 'echo': {error}" in info.last_error, info.last_error
        worker.assert_alive()


async def test_a_result_the_encoding_raises_on_is_stored_as_success_without_a_result(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = make(MemoryBackend(), clock, encoding=FussyEncoding())
    runs: list[str] = []

    @tasks.register(name="returns")
    async def returns(value: str) -> str:
        runs.append(value)
        return value

    async with tasks:
        broken = await tasks.enqueue(returns, "encode-raises")
        fine = await tasks.enqueue(returns, "fine")
        worker = Running(tasks, group)
        info = await tasks.wait(broken, timeout=WAIT)
        assert (info.state, info.result, info.attempts) == (TaskState.SUCCEEDED, None, 1)
        assert (await tasks.wait(fine, timeout=WAIT)).result == "fine"
        assert sorted(runs) == ["encode-raises", "fine"], "the task ran once: it is not run again"
        assert f"task {broken} (returns) succeeded, but its result is not stored" in caplog.text
        assert "RuntimeError: the encoding broke on the result" in caplog.text
        worker.assert_alive()


async def test_a_previous_result_the_encoding_cannot_decode_is_none_and_the_step_runs(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = make(MemoryBackend(), clock, encoding=FussyEncoding())
    seen: list[object] = []

    @tasks.register(name="first")
    async def first() -> str:
        return "decode-raises-key"

    @tasks.register(name="second")
    async def second(ctx: TaskContext) -> str:
        seen.append(ctx.previous_result)
        return "done"

    async with tasks:
        worker = Running(tasks, group)
        chain_id = await tasks.enqueue_chain([Call(first), Call(second)])
        info = await tasks.wait(chain_id, timeout=WAIT)  # the step the chain is at, once it is finished
        assert info.chain is not None
        assert (info.chain.state, info.id, seen) == (TaskState.SUCCEEDED, f"{chain_id}.1", [None])
        assert "cannot decode the previous step's result" in caplog.text
        worker.assert_alive()


class WrongTypes(MemoryBackend):
    """A backend bug: it hands out one record with a field of the wrong type, without a ``fault``."""

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        claimed = await super().claim(queues, limit, now=now, lease_until=lease_until, limits=limits)
        return [
            ClaimedTask(c.token, dataclasses.replace(c.record, timeout="soon"))  # type: ignore[arg-type]
            if c.record.id == "broken"
            else c
            for c in claimed
        ]


async def test_an_unexpected_error_while_handling_one_task_makes_it_dead_and_the_worker_goes_on(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = WrongTypes()
    tasks = make(backend, clock)
    release = anyio.Event()
    finished: list[str] = []

    @tasks.register(name="work")
    async def work(key: str) -> str:
        if key == "slow":
            await release.wait()
        finished.append(key)
        return key

    async with tasks:
        before = await tasks.enqueue(work, "before")
        worker = Running(tasks, group)
        assert (await tasks.wait(before, timeout=WAIT)).state is TaskState.SUCCEEDED
        slow = await tasks.enqueue(work, "slow")
        broken = await tasks.enqueue(work, "broken", task_id="broken")
        info = await tasks.wait(broken, timeout=WAIT)
        assert info.state is TaskState.DEAD
        assert info.last_error is not None
        assert info.last_error.startswith("internal error while handling the task"), info.last_error
        assert "TypeError" in info.last_error
        assert "internal error while handling task broken (work)" in caplog.text
        release.set()
        assert (await tasks.wait(slow, timeout=WAIT)).state is TaskState.SUCCEEDED
        assert (await tasks.wait(before, timeout=WAIT)).result == "before", "nothing saved is lost"
        worker.assert_alive()


def _raiser(kind: type[BaseException], *, is_async: bool) -> Any:
    if is_async:

        async def raises_async(ctx: TaskContext) -> None:
            raise kind("raised by the task")

        return raises_async

    def raises_in_thread() -> None:
        raise kind("raised by the task")

    return raises_in_thread


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, GeneratorExit, CustomStop])
@pytest.mark.parametrize("is_async", [True, False], ids=["async", "thread"])
async def test_a_base_exception_from_a_task_is_that_tasks_failure_and_the_worker_goes_on(
    clock: ManualClock, group: Any, kind: type[BaseException], is_async: bool
) -> None:
    failures: list[tuple[TaskInfo, BaseException]] = []
    tasks = make(MemoryBackend(), clock, on_error=lambda info, exc: failures.append((info, exc)))
    tasks.register(_raiser(kind, is_async=is_async), name="raises", max_retries=1)
    release = anyio.Event()
    started = anyio.Event()

    @tasks.register(name="neighbour")
    async def neighbour() -> str:
        started.set()
        await release.wait()
        return "fine"

    async with tasks:
        worker = Running(tasks, group)
        other = await tasks.enqueue(neighbour)
        with anyio.fail_after(WAIT):
            await started.wait()
        raising = await tasks.enqueue("raises")
        info = await tasks.wait(raising, timeout=WAIT)
        assert (info.state, info.attempts) == (TaskState.DEAD, 2), "retried by its policy, then dead"
        assert info.last_error is not None
        assert f"{kind.__name__}: raised by the task" in info.last_error
        assert [(f.state, type(exc)) for f, exc in failures] == [
            (TaskState.PENDING, kind),
            (TaskState.DEAD, kind),
        ]
        release.set()
        neighbour_info = await tasks.wait(other, timeout=WAIT)
        assert (neighbour_info.state, neighbour_info.attempts) == (TaskState.SUCCEEDED, 1), (
            "no other task is charged an attempt"
        )
        again = await tasks.enqueue(neighbour)
        assert (await tasks.wait(again, timeout=WAIT)).state is TaskState.SUCCEEDED
        worker.assert_alive()


async def test_an_on_error_hook_raising_a_base_exception_is_logged_and_the_worker_goes_on(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(info: TaskInfo, exc: BaseException) -> None:
        raise KeyboardInterrupt("from the hook")

    tasks = make(MemoryBackend(), clock, on_error=hook)

    @tasks.register(name="fails", max_retries=0)
    async def fails() -> None:
        raise ValueError("boom")

    async with tasks:
        worker = Running(tasks, group)
        info = await tasks.wait(await tasks.enqueue(fails), timeout=WAIT)
        assert info.state is TaskState.DEAD
        assert "on_error raised while handling task" in caplog.text
        worker.assert_alive()


async def test_the_task_that_blocks_the_event_loop_is_named_in_a_warning(
    clock: ManualClock, group: Any
) -> None:
    warned = threading.Event()
    reports: list[logging.LogRecord] = []

    class Watch(logging.Handler):
        # Keeps the record itself: the watchdog thread reaches caplog's root handler only after this one,
        # by which time the woken task may have let the test go on.
        def emit(self, record: logging.LogRecord) -> None:
            if "the event loop was blocked" in record.getMessage():
                reports.append(record)
                warned.set()

    handler = Watch()
    logging.getLogger("lifecycle.asynctask").addHandler(handler)
    tasks = make(MemoryBackend(), clock, lease=0.6)

    @tasks.register(name="blocker")
    async def blocker() -> str:
        # Blocks the loop (no await) until the watchdog has reported it: no timing guess needed.
        return "reported" if warned.wait(WAIT) else "not reported"

    try:
        async with tasks:
            worker = Running(tasks, group)
            task_id = await tasks.enqueue(blocker)
            info = await tasks.wait(task_id, timeout=WAIT)
            assert info.result == "reported"
            worker.assert_alive()
    finally:
        logging.getLogger("lifecycle.asynctask").removeHandler(handler)
    [record] = reports
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"by task {task_id} (blocker)" in message
    assert "more than lease / 3 = 0.2 s" in message
    assert "in blocker" in message, "the stack of the blocking task"
    assert "warned.wait(WAIT)" in message, "the stack of the blocking task"
    assert "past the lease (0.6 s) another worker runs the task again" in message


async def test_the_loop_watchdog_thread_ends_with_the_worker(clock: ManualClock) -> None:
    tasks = make(MemoryBackend(), clock, lease=0.6)

    def watchdogs() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "lifecycle-asynctask-loopwatch"]

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        with anyio.fail_after(WAIT):
            while not watchdogs():  # the thread is the observable: poll it, bounded
                await anyio.sleep(0.01)
        assert len(watchdogs()) == 1
        group.cancel_scope.cancel()
    assert watchdogs() == [], "stopping the worker stops and joins its watchdog thread"


class RefusingBackend(MemoryBackend):
    """A store that refuses to save one task's success (as a store refuses a value it cannot hold), and so
    every batch holding it; it saves everything else."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused
        self.refusals = 0

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        if any(s.task_id == self.refused and s.state is TaskState.SUCCEEDED for s in settlements):
            self.refusals += 1
            raise ValueError("the store cannot hold this result")
        return await super().settle(settlements)


async def test_a_verdict_the_store_refuses_does_not_hold_up_the_others_of_its_batch(
    clock: ManualClock, group: Any
) -> None:
    backend = RefusingBackend(refused="refused")
    tasks = make(backend, clock)
    release = anyio.Event()

    @tasks.register(name="gated")
    async def gated(value: int) -> int:
        await release.wait()  # every task finishes at once, so their verdicts share a batch
        return value

    async with tasks:
        ids = [await tasks.enqueue(gated, n, task_id=f"t{n}") for n in range(4)]
        ids.append(await tasks.enqueue(gated, 99, task_id="refused"))
        worker = Running(tasks, group)
        with anyio.fail_after(WAIT):
            while (await tasks.stats())["default"].active < 5:
                await anyio.sleep(0.01)
        release.set()
        for n, task_id in enumerate(ids[:4]):
            assert (await tasks.wait(task_id, timeout=WAIT)).result == n
        refused = await tasks.wait("refused", timeout=WAIT)
        assert refused.state is TaskState.DEAD
        assert refused.last_error is not None
        assert "verdict (succeeded) could not be saved: ValueError: the store cannot hold this result" in (
            refused.last_error
        )
        assert backend.refusals >= 2, "the whole batch was tried before the verdicts were saved one by one"
        worker.assert_alive()


async def test_a_password_in_a_tasks_error_is_masked_in_the_stored_error_and_the_log(
    clock: ManualClock, group: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = make(MemoryBackend(), clock)
    secret = "Hunter2-Hunter2"

    @tasks.register(name="connects", max_retries=0)
    async def connects() -> None:
        raise ConnectionError(f"cannot reach postgresql://app:{secret}@db/app?sslpassword={secret}")

    with caplog.at_level(logging.DEBUG, logger="lifecycle"):
        async with tasks:
            task_id = await tasks.enqueue(connects)
            worker = Running(tasks, group)
            info = await tasks.wait(task_id, timeout=WAIT)
            worker.assert_alive()
    assert info.state is TaskState.DEAD
    assert info.last_error is not None
    assert secret not in info.last_error
    assert "postgresql://app:***@db/app?sslpassword=***" in info.last_error
    logged = "\n".join(caplog.text.splitlines())
    assert "connects" in logged
    assert secret not in logged
