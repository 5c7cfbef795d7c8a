"""ExecuteHandle: what :meth:`TaskManager.add_execute_task` returns, to stop or await one execute task."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ._entry import Entry

__all__ = ["ExecuteHandle"]


class ExecuteHandle:
    """A handle on one execute task: cancel it on its own, or wait until it has ended.

    Cancelling an execute task is not an error, whatever its :class:`~lifecycle.TaskType` (a ``STOP_GROUP``
    task cancelled this way counts as ended for its group). Use it from the manager's event loop; from
    another thread go through ``anyio.from_thread.run_sync(handle.cancel)`` or a blocking portal.

    Example::

        handle = manager.add_execute_task(f"conn-{n}", serve_connection)
        ...
        handle.cancel()
        await handle.wait()
    """

    __slots__ = ("_cancel", "_entry")

    def __init__(self, entry: Entry, cancel: Callable[[Entry], None]) -> None:
        # Built by the manager: ``cancel`` is its bound method that cancels one entry (and checks the thread).
        self._entry = entry
        self._cancel = cancel

    @property
    def name(self) -> str:
        """The name the execute task was added under."""
        return self._entry.name

    @property
    def done(self) -> bool:
        """Whether the execute task has ended (returned, failed, was cancelled, or will never start)."""
        return self._entry.finished

    def cancel(self) -> None:
        """Cancel the execute task (before it starts, it never starts); no-op once it has ended."""
        self._cancel(self._entry)

    async def wait(self) -> None:
        """Wait until the execute task has ended; returns at once if it already has. Never raises its error:
        the manager reports that (``run()`` raises :class:`~lifecycle.TaskManagerError`)."""
        entry = self._entry
        if entry.finished:
            return
        if entry.done_event is None:
            entry.done_event = anyio.Event()
        await entry.done_event.wait()

    def __repr__(self) -> str:
        entry = self._entry
        return f"<ExecuteHandle {entry.name!r} {entry.state}>"
