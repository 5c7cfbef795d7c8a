"""The settle buffer: verdicts of finished attempts, applied to the backend in batches by one flusher."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from ..._core._backoff import Backoff
from .._backend import Backend
from .._records import Settlement, TaskState
from ._loop import LoopPrimitives, loop_primitives
from ._verdict import storable

__all__ = ["Settler"]

_RETRY = Backoff(initial=0.05, cap=5.0, jitter=False)
_ISOLATE_AFTER = 3  # failed tries of a batch before its verdicts are saved one by one


class Settler:
    """Collects settlements and applies them with one ``backend.settle`` call per batch.

    The flusher starts a batch as soon as it is free, so a lone result is saved after one round trip and a
    burst of results shares round trips; nothing waits on a timer. While the worker's claim loop is about to
    take the verdicts for its next backend call (see :meth:`hold`), a verdict put does not wake the flusher,
    which would otherwise run only to find them taken. ``held`` maps each task id whose lease this
    worker holds to its token: the worker adds an entry when it claims, the settler removes it once the
    verdict is applied (so the heartbeat keeps extending leases of results not yet saved). A failing backend
    is retried with backoff; the batch is kept in order meanwhile.
    """

    def __init__(
        self,
        backend: Backend,
        held: dict[str, str],
        on_applied: Callable[[], None],
        logger: logging.Logger,
        *,
        on_saved: Callable[[list[Settlement], set[str]], None] | None = None,
    ) -> None:
        self._backend = backend
        self._held = held
        self._on_applied = on_applied
        self._on_saved = on_saved
        self._logger = logger
        self._buffer: list[Settlement] = []
        self._in_flight = 0
        self._wake: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._holding = False  # see hold()
        self._flusher_first = False  # verdicts were given back: the flusher takes the buffer next
        self._new_event: Callable[[], anyio.Event] = anyio.Event
        self.applied = 0

    @property
    def backlog(self) -> int:
        """Settlements not applied yet (buffered or being written)."""
        return len(self._buffer) + self._in_flight

    def put(self, settlement: Settlement) -> None:
        """Queue a verdict; the flusher applies it soon."""
        self._buffer.append(settlement)
        if not self._holding:
            self._wake_flusher()

    def hold(self) -> None:
        """Keep the flusher asleep for the verdicts put from now on: the caller takes them with :meth:`take`
        (which ends the hold) or ends the hold with :meth:`release`, before it awaits anything but a
        checkpoint. For the worker's claim loop between a claim and the next call that carries the verdicts:
        a task that ends meanwhile would wake the flusher only for it to find its verdict taken."""
        self._holding = True

    def release(self) -> None:
        """End :meth:`hold`: wake the flusher for the verdicts put meanwhile. Idempotent."""
        self._holding = False
        if self._buffer:
            self._wake_flusher()

    async def run(self, primitives: LoopPrimitives | None = None) -> None:
        """The flusher: apply batches until cancelled. ``primitives``: the running loop's, if looked up
        already (see :func:`loop_primitives`)."""
        new_event = self._new_event = (primitives or loop_primitives()).new_event
        while True:
            if not self._buffer:
                self._set_idle()
                wake = self._wake = new_event()
                await wake.wait()
                continue
            batch, self._buffer = self._buffer, []
            self._flusher_first = False  # what was given back is in this batch
            self._in_flight += len(batch)
            try:
                await self._apply(batch)
            finally:
                self._in_flight -= len(batch)

    def take(self) -> list[Settlement]:
        """The buffered verdicts, for a caller that saves them in its own backend call (the worker's claim,
        with a backend that settles and claims in one step); ``[]`` while the flusher is saving a batch (so
        a batch it retries keeps its order, and after :meth:`give_back` until the flusher has taken what was
        given back). The caller reports back with :meth:`saved` or :meth:`give_back`. Ends :meth:`hold`: what
        was held is taken, or left to the flusher."""
        batch = self._buffer
        if not batch or self._in_flight or self._flusher_first:
            self.release()
            return []
        self._holding = False
        self._buffer = []
        self._in_flight = len(batch)
        return batch

    def saved(self, batch: list[Settlement], lost: set[str]) -> None:
        """``batch`` from :meth:`take` was saved but for the tasks in ``lost``: as if the flusher had."""
        self._in_flight -= len(batch)
        self._done(batch, lost, failures=0)
        if not self._buffer and not self._in_flight:
            self._set_idle()

    def give_back(self, batch: list[Settlement]) -> None:
        """``batch`` from :meth:`take` was not saved (its call failed): the flusher saves it, first (until it
        has taken the buffer, :meth:`take` takes nothing: a caller whose calls keep failing to save would
        otherwise take the verdicts back before the flusher, with its retries, could)."""
        self._in_flight -= len(batch)
        self._flusher_first = True
        self._buffer[:0] = batch
        self._wake_flusher()

    async def flush(self) -> None:
        """Return once everything put so far is applied (needs :meth:`run` running)."""
        while self._buffer or self._in_flight:
            idle = self._idle = self._new_event()
            await idle.wait()

    def _wake_flusher(self) -> None:
        """Wake the flusher if it waits for verdicts."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _set_idle(self) -> None:
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    async def _apply(self, batch: list[Settlement]) -> None:
        failures = 0
        while True:
            try:
                lost = await self._backend.settle(batch)
            except Exception as exc:
                failures += 1
                if failures >= _ISOLATE_AFTER:
                    # A verdict the store refuses must not hold up the others: try them one by one, and
                    # replace one it keeps refusing by a dead verdict that says why.
                    lost = await self._apply_one_by_one(batch)
                    break
                delay = _RETRY.delay(failures)
                self._logger.warning(
                    "could not save %d task result(s) (%s: %s); retrying in %.2f s",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=failures == 1,
                )
                await anyio.sleep(delay)
                continue
            break
        self._done(batch, lost, failures)

    def _done(self, batch: list[Settlement], lost: set[str], failures: int) -> None:
        held = self._held
        for settlement in batch:
            if held.get(settlement.task_id) == settlement.token:
                del held[settlement.task_id]
        self.applied += len(batch) - len(lost)
        if self._on_saved is not None:
            self._on_saved(batch, lost)
        for task_id in sorted(lost):
            self._logger.warning(
                "the result of task %s was not saved: its lease was lost (another worker took it over after "
                "the lease expired%s), so it may run again",
                task_id,
                "; the backend failed while saving, so it may have been saved before" if failures else "",
            )
        self._on_applied()

    async def _apply_one_by_one(self, batch: list[Settlement]) -> set[str]:
        """Save each verdict alone. One the store still refuses while it takes the others is replaced by a
        ``DEAD`` verdict that says why (no result, no follow-up), so that task is visible, not stuck; when the
        store takes none (it is down), the rest are retried together with backoff."""
        lost: set[str] = set()
        for index, settlement in enumerate(batch):
            try:
                lost |= await self._backend.settle([settlement])
                continue
            except Exception as exc:
                refused = exc
            fallback = Settlement(
                task_id=settlement.task_id,
                token=settlement.token,
                state=TaskState.DEAD,
                at=settlement.at,
                error=storable(
                    f"the task's verdict ({settlement.state.value}) could not be saved: "
                    f"{type(refused).__name__}: {refused}; requeue the task to run it again"
                ),
            )
            try:
                lost |= await self._backend.settle([fallback])
            except Exception:
                return lost | await self._retry_all(batch[index:])
            self._logger.error(
                "could not save the verdict of task %s (%s: %s); it is dead with that reason instead",
                settlement.task_id,
                type(refused).__name__,
                refused,
                exc_info=refused,
            )
        return lost

    async def _retry_all(self, batch: list[Settlement]) -> set[str]:
        failures = 0
        while True:
            try:
                return await self._backend.settle(batch)
            except Exception as exc:
                failures += 1
                delay = _RETRY.delay(failures)
                self._logger.warning(
                    "could not save %d task result(s) (%s: %s); retrying in %.2f s",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=failures == 1,
                )
                await anyio.sleep(delay)
