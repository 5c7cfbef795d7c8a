"""The progress running attempts report, stored coalesced (at most one write per task per second, the last one
always before the verdict). The cancel request an attempt's context reads is the runner's ``Running``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from .._backend import Backend
from .._clock import Clock
from .._records import ClaimedTask, ProgressUpdate

__all__ = ["PROGRESS_INTERVAL", "ProgressBook"]

PROGRESS_INTERVAL = 1.0
"""Seconds (by the engine's clock) between two progress writes of one task."""


class ProgressBook:
    """The progress of every attempt of one worker: the latest report of each, written in batches by
    :meth:`run` no more often than every :data:`PROGRESS_INTERVAL` per task, and by :meth:`finish` before the
    attempt's verdict is saved. Progress is best effort: a failed write is logged, never fails the task."""

    def __init__(self, backend: Backend, clock: Clock, logger: logging.Logger) -> None:
        self._backend = backend
        self._clock = clock
        self._logger = logger
        self._latest: dict[str, ProgressUpdate] = {}  # by lease token: the report not written yet
        self._written: dict[str, float] = {}  # by lease token: when its last write started
        self._writing: dict[str, anyio.Event] = {}  # by lease token: set when its write in flight ends
        self._wake: anyio.Event | None = None
        self._warned = False

    def report(
        self, claimed: ClaimedTask, done: float | None, total: float | None, message: str | None
    ) -> None:
        """Keep ``claimed``'s latest progress (called from the task, in the event loop)."""
        self._latest[claimed.token] = ProgressUpdate(claimed.record.id, claimed.token, done, total, message)
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    def holds(self, claimed: ClaimedTask) -> bool:
        """Whether anything of ``claimed`` is unwritten or being written (else :meth:`finish` has nothing
        to do: the common case, checked without an await)."""
        token = claimed.token
        return token in self._latest or token in self._writing or token in self._written

    async def finish(self, claimed: ClaimedTask) -> None:
        """Write ``claimed``'s last report if it is not written yet, and forget the attempt (before its
        verdict is saved)."""
        token = claimed.token
        writing = self._writing.get(token)
        if writing is not None:
            await writing.wait()  # an older report in flight must not land after the last one
        update = self._latest.pop(token, None)
        self._written.pop(token, None)
        if update is not None and not await self._write([update]):
            self._latest.pop(token, None)  # the verdict is saved all the same: progress is best effort

    def forget(self, claimed: ClaimedTask) -> None:
        """Drop ``claimed``'s unwritten report (its lease was lost: nothing to store)."""
        self._latest.pop(claimed.token, None)
        self._written.pop(claimed.token, None)

    async def run(self) -> None:
        """Write reports as they become due, until cancelled."""
        while True:
            now = self._clock()
            due = [
                update
                for token, update in self._latest.items()
                if token not in self._writing
                and (token not in self._written or now >= self._written[token] + PROGRESS_INTERVAL)
            ]
            if due:
                for update in due:
                    del self._latest[update.token]
                    self._written[update.token] = now
                await self._write(due)
                continue
            wake = self._wake = anyio.Event()
            waiting = [self._written[token] for token in self._latest if token in self._written]
            if not waiting:
                await wake.wait()
                continue
            async with anyio.create_task_group() as group:
                group.start_soon(_wake_at, self._clock, min(waiting) + PROGRESS_INTERVAL, wake)
                await wake.wait()
                group.cancel_scope.cancel()

    async def _write(self, updates: list[ProgressUpdate]) -> bool:
        """Save ``updates``; on failure keep each one that no newer report replaced, for a later write."""
        events = {update.token: anyio.Event() for update in updates}
        self._writing.update(events)
        try:
            lost = await self._backend.save_progress(updates)
        except Exception as exc:
            self._logger.warning(
                "could not save the progress of %d task(s) (%s: %s); trying again in %g s",
                len(updates),
                type(exc).__name__,
                exc,
                PROGRESS_INTERVAL,
                exc_info=not self._warned,
            )
            self._warned = True
            for update in updates:
                self._latest.setdefault(update.token, update)
            return False
        finally:
            for token, event in events.items():
                if self._writing.get(token) is event:
                    del self._writing[token]
                event.set()
        if lost:
            self._logger.debug("progress of %s not saved: the lease was lost", ", ".join(sorted(lost)))
        return True


async def _wake_at(clock: Clock, deadline: float, event: anyio.Event) -> None:
    """Set ``event`` once ``clock`` reads ``deadline`` (a manual clock with ``wait_until`` is waited on)."""
    wait_until: Callable[[float], Awaitable[None]] | None = getattr(clock, "wait_until", None)
    while (remaining := deadline - clock()) > 0:
        if wait_until is not None:
            await wait_until(deadline)
        else:
            await anyio.sleep(min(remaining, PROGRESS_INTERVAL))
    event.set()
