"""Interruptible: a real SIGHUP sent to this process reloads the inner task; handlers are released after.

Signals are only sent once the Interruptible is known to be listening (its inner execute has started, and
the receiver is opened before that), so the default SIGHUP action can never kill the test run.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import anyio
import pytest

import lifecycle
from lifecycle.tasks import Interruptible, Subprocess


@pytest.fixture(autouse=True)
def default_sighup_and_usr1() -> Iterator[None]:
    """Start from the default actions (what asyncio restores on release) and put the originals back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGUSR1)}
    for sig in saved:
        signal.signal(sig, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Recorder:
    """An inner Task that logs its stages and reports each execute start on a stream."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.executions = 0
        self._executed: anyio.Event | None = None
        self.fail_initialize_on: int | None = None
        self.initializes = 0
        self.cleanup_started: anyio.Event | None = None
        self.release_cleanup: anyio.Event | None = None
        self.return_from_execute = False
        self.raise_from_execute: BaseException | None = None

    async def initialize(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.initializes += 1
        if self.initializes == self.fail_initialize_on:
            self.log.append("initialize failed")
            raise OSError("cannot read the new configuration")
        self.log.append("initialize")

    async def executed(self, count: int) -> None:
        """Wait until ``execute`` has started ``count`` times in all."""
        with anyio.fail_after(10):
            while self.executions < count:
                if self._executed is None:
                    self._executed = anyio.Event()
                await self._executed.wait()

    async def execute(self) -> None:
        self.executions += 1
        self.log.append("execute")
        if self._executed is not None:
            self._executed.set()
            self._executed = None
        if self.raise_from_execute is not None:
            raise self.raise_from_execute
        if self.return_from_execute:
            return
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.log.append("execute cancelled")
            raise

    async def cleanup(self) -> None:
        self.log.append("cleanup started")
        if self.cleanup_started is not None:
            self.cleanup_started.set()
        if self.release_cleanup is not None:
            await self.release_cleanup.wait()
        self.log.append("cleanup")


async def test_sighup_reloads_cleanup_then_initialize_then_execute() -> None:
    inner = Recorder()
    task = Interruptible(inner)
    with anyio.fail_after(10):
        await task.initialize()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(task.execute)
            await inner.executed(1)
            os.kill(os.getpid(), signal.SIGHUP)
            await inner.executed(2)
            os.kill(os.getpid(), signal.SIGHUP)
            await inner.executed(3)
            task_group.cancel_scope.cancel()
        await task.cleanup()
    reload = ["execute cancelled", "cleanup started", "cleanup", "initialize", "execute"]
    assert inner.log == ["initialize", "execute", *reload, *reload, "execute cancelled", *reload[1:3]]
    assert task.reloads == 2


async def test_signal_handlers_are_installed_while_executing_and_released_after() -> None:
    inner = Recorder()
    inner.return_from_execute = True
    task = Interruptible(inner, signals=(signal.SIGUSR1, signal.SIGHUP))
    seen_during: list[object] = []

    original_execute = inner.execute

    async def execute_and_look() -> None:
        seen_during.extend(signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGHUP))
        await original_execute()

    inner.execute = execute_and_look  # type: ignore[method-assign]
    with anyio.fail_after(10):
        await task.initialize()
        await task.execute()  # the inner execute returns on its own: so does the Interruptible's
    assert signal.SIG_DFL not in seen_during
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


async def test_handlers_are_released_when_cancelled() -> None:
    inner = Recorder()
    task = Interruptible(inner)
    with anyio.fail_after(10):
        await task.initialize()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(task.execute)
            await inner.executed(1)
            assert signal.getsignal(signal.SIGHUP) != signal.SIG_DFL
            task_group.cancel_scope.cancel()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


async def test_custom_signal_triggers_the_reload() -> None:
    inner = Recorder()
    task = Interruptible(inner, signals=[signal.SIGUSR1])
    assert task.signals == (signal.SIGUSR1,)
    with anyio.fail_after(10):
        await task.initialize()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(task.execute)
            await inner.executed(1)
            os.kill(os.getpid(), signal.SIGUSR1)
            await inner.executed(2)
            task_group.cancel_scope.cancel()
    assert task.reloads == 1


async def test_an_error_from_the_inner_execute_propagates_unwrapped() -> None:
    inner = Recorder()
    inner.raise_from_execute = ValueError("inner failed")
    task = Interruptible(inner)
    with anyio.fail_after(10):
        await task.initialize()
        with pytest.raises(ValueError, match="inner failed"):
            await task.execute()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


async def test_failed_reload_raises_and_the_inner_cleanup_does_not_run_twice() -> None:
    inner = Recorder()
    inner.fail_initialize_on = 2
    task = Interruptible(inner)
    with anyio.fail_after(10):
        await task.initialize()
        async with anyio.create_task_group() as task_group:

            async def send_sighup() -> None:
                await inner.executed(1)
                os.kill(os.getpid(), signal.SIGHUP)

            task_group.start_soon(send_sighup)
            with pytest.raises(OSError, match="new configuration"):
                await task.execute()
        await task.cleanup()  # the manager calls it: the inner task is not initialized, so nothing runs
    assert inner.log == [
        "initialize",
        "execute",
        "execute cancelled",
        "cleanup started",
        "cleanup",
        "initialize failed",
    ]
    assert task.reloads == 0


async def test_shutdown_during_a_reload_lets_the_inner_cleanup_finish() -> None:
    inner = Recorder()
    inner.release_cleanup = anyio.Event()
    inner.cleanup_started = anyio.Event()
    task = Interruptible(inner)
    with anyio.fail_after(10):
        await task.initialize()
        execute_scope = anyio.CancelScope()

        async def execute() -> None:
            with execute_scope:
                await task.execute()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(execute)
            await inner.executed(1)
            os.kill(os.getpid(), signal.SIGHUP)
            await inner.cleanup_started.wait()
            execute_scope.cancel()  # shutdown while the inner cleanup is running
            await anyio.lowlevel.checkpoint()
            assert inner.log[-1] == "cleanup started"
            inner.release_cleanup.set()
        await task.cleanup()
    # The shielded cleanup finished; the initialize after it was cancelled; no second cleanup.
    assert inner.log == ["initialize", "execute", "execute cancelled", "cleanup started", "cleanup"]


async def test_reload_through_a_task_manager() -> None:
    inner = Recorder()
    manager = lifecycle.TaskManager(name="reload-test")
    manager.add_task("config", Interruptible(inner))

    async def operator() -> None:
        await inner.executed(1)
        os.kill(os.getpid(), signal.SIGHUP)
        await inner.executed(2)
        manager.shutdown()

    manager.add_execute_task("operator", operator, lifecycle.TaskType.ERROR)
    with anyio.fail_after(10):
        await manager.run()
    assert inner.log == [
        "initialize",
        "execute",
        "execute cancelled",
        "cleanup started",
        "cleanup",
        "initialize",
        "execute",
        "execute cancelled",
        "cleanup started",
        "cleanup",
    ]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_rejects_what_is_not_a_task() -> None:
    class OnlyExecute:
        async def execute(self) -> None: ...

    with pytest.raises(TypeError, match="needs a lifecycle Task"):
        Interruptible(OnlyExecute())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        ((), "at least one signal"),
        ((signal.SIGKILL,), "SIGKILL"),
        ((99999,), "signal numbers"),
        (("HUP",), "signal numbers"),
    ],
)
def test_rejects_bad_signals(signals: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Interruptible(Recorder(), signals=signals)  # type: ignore[arg-type]


def test_is_a_task_and_describes_itself() -> None:
    task = Interruptible(Recorder())
    assert isinstance(task, lifecycle.Task)
    assert task.signals == (signal.SIGHUP,)
    assert "Recorder" in repr(task)
    assert "SIGHUP" in repr(task)


async def test_sighup_restarts_a_subprocess_with_a_new_child() -> None:
    class WatchedSubprocess(Subprocess):
        """Reports each execute start, so the test knows the signal receiver is open."""

        def __init__(self) -> None:
            code = "import os, time; print('ready', flush=True); time.sleep(3600)"
            super().__init__([sys.executable, "-c", code], ready=lambda line: line == "ready")
            self.pids: list[int | None] = []
            self.executing: anyio.Event | None = None

        async def execute(self) -> None:
            self.pids.append(self.pid)
            if self.executing is not None:
                self.executing.set()
            await super().execute()

    child = WatchedSubprocess()
    task = Interruptible(child)
    with anyio.fail_after(30):
        await task.initialize()
        async with anyio.create_task_group() as task_group:
            child.executing = anyio.Event()
            task_group.start_soon(task.execute)
            await child.executing.wait()
            child.executing = anyio.Event()
            os.kill(os.getpid(), signal.SIGHUP)
            await child.executing.wait()
            task_group.cancel_scope.cancel()
        await task.cleanup()
    first, second = child.pids
    assert first is not None
    assert second is not None
    assert first != second
    assert child.pid is None
    assert child.returncode == -signal.SIGTERM
