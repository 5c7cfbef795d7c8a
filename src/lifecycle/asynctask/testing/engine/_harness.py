"""The harness of the engine conformance suite: AsyncTasks over the backend under test, a manual clock, and
workers started and stopped the way a TaskManager does it (``execute`` cancelled at shutdown).

Private: backend authors use :class:`~lifecycle.asynctask.testing.EngineConformance`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import anyio
import anyio.abc
import pytest

from ...._core._backoff import Backoff
from ..._async_tasks import AsyncTasks
from ..._backend import Backend
from ..._clock import ManualClock
from ..._model import TaskInfo
from ..._records import TaskState

__all__ = ["POLL", "EngineHarness", "EngineSuiteBase", "RunningWorker", "SUITE_OPTIONS", "WAIT"]

WAIT = 20.0
"""The longest the suite waits for something that should happen promptly (generous: a busy machine)."""

POLL = 0.01
"""How often :meth:`EngineHarness.eventually` checks its condition."""

SUITE_OPTIONS: dict[str, Any] = {
    "poll_interval": 0.05,
    "lease": 30.0,
    "recovery_interval": 3600.0,
    "retention_interval": 3600.0,
    "shutdown_grace": 5.0,
    "retry_backoff": Backoff(initial=0.0, cap=0.0, jitter=False),
    "concurrency": 4,
}
"""What every suite ``AsyncTasks`` gets unless the test overrides it: immediate retries, fast polls, and the
periodic recovery and retention loops out of the way (tests call them explicitly)."""


class RunningWorker:
    """A worker started by :meth:`EngineHarness.start`; :meth:`stop` cancels ``execute`` like a manager."""

    def __init__(self, tasks: AsyncTasks, scope: anyio.CancelScope, finished: anyio.Event) -> None:
        self.tasks = tasks
        self._scope = scope
        self._finished = finished
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """True once ``execute`` has returned or raised."""
        return self._finished.is_set()

    def request_stop(self) -> None:
        """Cancel ``execute`` (a manager's shutdown) without waiting for the drain."""
        self._scope.cancel()

    async def stopping(self) -> None:
        """Return once the engine has been told to stop claiming (after :meth:`request_stop`)."""
        with anyio.fail_after(WAIT):
            while True:
                worker = self.tasks._worker
                if worker is None:
                    return
                if worker.stopping.is_set():
                    return
                await worker.stopping.wait()

    async def stop(self) -> None:
        """Cancel ``execute`` and wait until it has drained and returned."""
        self._scope.cancel()
        with anyio.fail_after(WAIT):
            await self._finished.wait()
        if self.error is not None:
            raise self.error


class EngineHarness:
    """Builds ``AsyncTasks`` over the backend under test and runs their workers in the test's task group."""

    def __init__(
        self,
        backend_factory: Callable[[], Awaitable[Backend]],
        stack: contextlib.AsyncExitStack,
        group: anyio.abc.TaskGroup,
    ) -> None:
        self._factory = backend_factory
        self._stack = stack
        self._group = group
        self.clock: ManualClock = ManualClock(time.time())
        self._workers: list[RunningWorker] = []

    async def tasks(self, **options: Any) -> AsyncTasks:
        """A new, initialized ``AsyncTasks`` on a new backend object over the test's storage; it is cleaned
        up after the test. ``options`` override :data:`SUITE_OPTIONS`; the clock is :attr:`clock`."""
        backend = await self._factory()
        self._stack.push_async_callback(backend.close)
        tasks = AsyncTasks(backend, **{**SUITE_OPTIONS, "clock": self.clock, **options})
        await tasks.initialize()
        self._stack.push_async_callback(tasks.cleanup)
        return tasks

    async def start(self, tasks: AsyncTasks) -> RunningWorker:
        """Run ``tasks.execute()`` in the background until :meth:`RunningWorker.stop` (or the test's end)."""
        scope = anyio.CancelScope()
        finished = anyio.Event()
        running = RunningWorker(tasks, scope, finished)

        async def execute() -> None:
            try:
                with scope:
                    await tasks.execute()
            except Exception as exc:
                running.error = exc
            finally:
                finished.set()

        self._group.start_soon(execute)
        self._workers.append(running)
        return running

    async def stop_all(self) -> None:
        """Stop every worker still running (at the end of a test)."""
        for running in self._workers:
            if not running.finished:
                await running.stop()

    async def finished(self, tasks: AsyncTasks, task_id: str, state: TaskState | None = None) -> TaskInfo:
        """Wait until the task is finished and return it; with ``state``, assert it is that state."""
        info = await tasks.wait(task_id, timeout=WAIT)
        if state is not None:
            assert info.state is state, (
                f"task {task_id} ended {info.state.value}, expected {state.value}: {info}"
            )
        return info

    async def until(self, tasks: AsyncTasks, task_id: str, predicate: Callable[[TaskInfo], bool]) -> TaskInfo:
        """Wait until ``predicate(info)`` holds for the task and return it (woken by every verdict saved in
        this process, and by polling)."""
        return await tasks._wait_for(task_id, predicate, WAIT)

    async def eventually(self, condition: Callable[[], Awaitable[bool]], what: str) -> None:
        """Return once ``await condition()`` holds, checked every :data:`POLL` seconds; fail the test
        naming ``what`` after :data:`WAIT` seconds. For what no event reports, such as a heartbeat seen in the
        store: each step checks the condition, never a guess about how long something takes."""
        with anyio.move_on_after(WAIT) as deadline:
            while not await condition():
                await anyio.sleep(POLL)
        if deadline.cancelled_caught:
            pytest.fail(f"not seen within {WAIT:g} s: {what}")

    async def retry_waiting(self, tasks: AsyncTasks, task_id: str, attempts: int = 1) -> TaskInfo:
        """Wait until attempt ``attempts`` has failed and the task waits for its retry (pending again)."""
        return await self.until(
            tasks, task_id, lambda info: info.state is TaskState.PENDING and info.attempts == attempts
        )


class EngineSuiteBase:
    """The fixture every part of the engine suite shares. Needs ``backend_factory`` from the subclass."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    async def engine(self, backend_factory: Callable[[], Awaitable[Backend]]) -> AsyncIterator[EngineHarness]:
        """A harness whose workers and AsyncTasks are stopped and closed after the test."""
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as group:
            harness = EngineHarness(backend_factory, stack, group)
            try:
                yield harness
            finally:
                with anyio.CancelScope(shield=True):
                    await harness.stop_all()
