"""Interruptible: hot-reload a task (cleanup, initialize, execute again) when the process gets a signal."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterable

import anyio

from .._compat import BaseExceptionGroup, unwrap_single
from .._core._task import Task
from .._redact import library_logger

__all__ = ["Interruptible"]

logger = library_logger("lifecycle.tasks")

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _task_name(task: object) -> str:
    return type(task).__name__


class Interruptible:
    """A :class:`~lifecycle.Task` wrapping another one that reloads it when the process receives a signal.

    ``initialize`` and ``cleanup`` are the inner task's. ``execute`` runs the inner ``execute`` while
    listening for ``signals`` (``SIGHUP`` by default, through ``anyio.open_signal_receiver``). On a signal it
    reloads the inner task: it cancels the inner ``execute`` and waits for it to end, runs the inner
    ``cleanup`` (shielded from cancellation, like the manager's own cleanups), then the inner ``initialize``,
    then starts the inner ``execute`` again. The signal handlers are released when ``execute`` ends, however
    it ends.

    - The inner ``execute`` returning on its own ends this ``execute`` too (the manager then applies the task
      type); raising propagates its exception unchanged.
    - A failing reload (cleanup or initialize raising) ends ``execute`` with that exception, which stops the
      manager like any failure. The inner ``cleanup`` never runs twice in a row and never after a failed
      ``initialize`` (a failing ``initialize`` must release what it took, as for any Task).
    - Signals arriving during a reload are coalesced into one more reload once the current one is done.
    - Shutdown during a reload waits for the inner cleanup to finish and cancels the inner initialize.

    Signal handlers are per process and only the main thread can install them; run the manager in the main
    thread. Do not use the signals :func:`lifecycle.run` owns (SIGINT, SIGTERM).

    Raises ``TypeError`` when ``task`` is not a Task and ``ValueError`` for an empty or uncatchable set of
    signals.

    Example::

        manager.add_task("config", Interruptible(ConfigLoader("app.toml")))
        # kill -HUP <pid>  re-reads the configuration without restarting the service
    """

    def __init__(self, task: Task, signals: Iterable[int] = (signal.SIGHUP,)) -> None:
        if not isinstance(task, Task):
            raise TypeError(
                f"Interruptible needs a lifecycle Task (async initialize, execute and cleanup), got "
                f"{type(task).__name__}"
            )
        try:
            chosen = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Interruptible signals must be signal numbers such as signal.SIGHUP: {error}"
            ) from None
        if not chosen:
            raise ValueError("Interruptible needs at least one signal to reload on, e.g. (signal.SIGHUP,)")
        uncatchable = [s.name for s in chosen if s in _UNCATCHABLE]
        if uncatchable:
            raise ValueError(f"Interruptible cannot reload on {', '.join(uncatchable)}: it cannot be caught")
        self._task = task
        self._signals = chosen
        self._name = _task_name(task)
        self._initialized = False
        self._reload_pending = False
        self._execute_scope: anyio.CancelScope | None = None
        self._reloads = 0

    @property
    def task(self) -> Task:
        """The wrapped task."""
        return self._task

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        """The signals that trigger a reload."""
        return self._signals

    @property
    def reloads(self) -> int:
        """How many reloads have completed (the inner task initialized again)."""
        return self._reloads

    async def initialize(self) -> None:
        """Initialize the inner task."""
        await self._task.initialize()
        self._initialized = True

    async def execute(self) -> None:
        """Run the inner ``execute``, reloading the inner task on each signal, until it ends."""
        error: BaseException | None = None
        with anyio.open_signal_receiver(*self._signals) as received:
            try:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._listen, received)
                    await self._serve()
                    task_group.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                error = unwrap_single(group)
                if error is group:
                    raise
            finally:
                self._reload_pending = False
                self._execute_scope = None
        if error is not None:
            # Raised outside the except block so the group does not become the error's __context__.
            raise error

    async def cleanup(self) -> None:
        """Clean up the inner task, unless a failed reload already left it cleaned up."""
        if not self._initialized:
            return
        self._initialized = False
        await self._task.cleanup()

    async def _listen(self, received: AsyncIterator[signal.Signals]) -> None:
        async for signum in received:
            logger.info("%s: received %s: reloading", self._name, signal.Signals(signum).name)
            self._reload_pending = True
            if self._execute_scope is not None:
                self._execute_scope.cancel()

    async def _serve(self) -> None:
        while True:
            if not self._reload_pending:
                with anyio.CancelScope() as scope:
                    self._execute_scope = scope
                    await self._task.execute()
                self._execute_scope = None
                if not scope.cancel_called:
                    return  # the inner execute ended on its own
            self._reload_pending = False
            await self._reload()

    async def _reload(self) -> None:
        if self._initialized:
            self._initialized = False
            with anyio.CancelScope(shield=True):
                await self._task.cleanup()
        await self._task.initialize()
        self._initialized = True
        self._reloads += 1
        logger.info("%s: reloaded (%d reload(s) so far)", self._name, self._reloads)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._signals)
        return f"<Interruptible {self._name} on {names}, {self._reloads} reload(s)>"
