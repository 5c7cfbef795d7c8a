"""What ``AsyncTasks`` offers to look at and act on stored tasks: info, list, stats, wait, cancel, requeue,
purge, and the upkeep (retention, recovery) on demand."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Collection
from dataclasses import replace
from datetime import timedelta

import anyio

from ._backend import Backend
from ._chain import CHAIN_PREFIX, chain_fields, chain_progress
from ._clock import Clock, as_seconds
from ._encoding import Encoding
from ._engine._options import check_states
from ._engine._upkeep import purge_expired, recover_expired
from ._engine._worker import EngineOptions, Worker
from ._model import QueueStats, TaskInfo
from ._observer import TaskObserver, observe_enqueued
from ._records import NewTask, TaskRecord, TaskState
from ._registry import check_no_nul

__all__ = ["TaskOperations"]


class TaskOperations:
    """The inspection and operation methods of :class:`~lifecycle.asynctask.AsyncTasks` (a base class, so
    each module stays small); see that class."""

    _backend: Backend
    _encoding: Encoding
    _clock: Clock
    _options: EngineOptions
    _logger: logging.Logger
    _open: bool
    _worker: Worker | None
    _changed: anyio.Event | None
    _observer: TaskObserver | None

    async def info(self, task_id: str) -> TaskInfo | None:
        """The task with this id, or ``None`` (never stored, or removed by retention or :meth:`purge`).

        A chain id (from :meth:`enqueue_chain`) gives the step the chain is at (the running or waiting step,
        the step that stopped it, or the last step once done) with the whole chain's progress in
        ``info.chain`` (a :class:`ChainInfo`); so does the id of any step. A chain is ``None`` once its
        first step's record is removed.
        """
        self._check_open("info")
        _check_id(task_id, "info")
        record = await self._backend.get(task_id)
        chain_id = task_id if record is None and task_id.startswith(CHAIN_PREFIX) else None
        if record is not None:
            chain_id = chain_fields(record)[0]
            if chain_id is None:
                return self._info(record)
        if chain_id is None:
            return None
        progress = await chain_progress(self._backend, chain_id, self._encoding.decode)
        if progress is None:
            return None if record is None else self._info(record)
        chain, current = progress
        return replace(self._info(current if record is None else record), chain=chain)

    async def list(
        self,
        *,
        state: TaskState | str | Collection[TaskState | str] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[TaskInfo]:
        """Tasks, newest first, optionally of one or several states and of one queue."""
        self._check_open("list")
        states = None if state is None else check_states(state)
        _check_queue(queue, "list")
        records = await self._backend.list_records(states=states, queue=queue, limit=limit, offset=offset)
        return [self._info(record) for record in records]

    async def stats(self) -> dict[str, QueueStats]:
        """The number of tasks per queue and state, by queue name."""
        self._check_open("stats")
        counts = await self._backend.stats()
        return {
            queue: QueueStats(**{TaskState(state).value: count for state, count in per_state.items()})
            for queue, per_state in sorted(counts.items())
        }

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending task (it will not run); ``False`` when it is not pending (running, finished,
        unknown). A running task cannot be cancelled."""
        self._check_open("cancel")
        _check_id(task_id, "cancel")
        cancelled = bool(await self._backend.cancel([task_id], now=self._clock()))
        self._notify_changed()
        return cancelled

    async def requeue(self, task_id: str) -> bool:
        """Move a dead or cancelled task back to pending, attempts reset; ``False`` when it is in another
        state or unknown."""
        self._check_open("requeue")
        _check_id(task_id, "requeue")
        moved = await self._backend.requeue([task_id], now=self._clock()) > 0
        if moved and self._worker is not None:
            self._worker.wake()
        return moved

    async def requeue_dead(self, queue: str | None = None) -> int:
        """Move every dead task (of ``queue`` when given) back to pending; returns how many moved."""
        self._check_open("requeue_dead")
        _check_queue(queue, "requeue_dead")
        moved = await self._backend.requeue(None, queue=queue, now=self._clock())
        if moved and self._worker is not None:
            self._worker.wake()
        return moved

    async def purge(
        self,
        state: TaskState | str | Collection[TaskState | str],
        *,
        queue: str | None = None,
        older_than: float | timedelta | None = None,
    ) -> int:
        """Delete tasks in ``state`` (one or several; not ``active``), of ``queue`` when given, finished
        (or, if pending, enqueued) more than ``older_than`` seconds ago when given. Returns how many."""
        self._check_open("purge")
        states = check_states(state)
        _check_queue(queue, "purge")
        if TaskState.ACTIVE in states:
            raise ValueError("purge() cannot delete active tasks: a worker owns them; wait until they finish")
        before = None if older_than is None else self._clock() - as_seconds(older_than, "purge() older_than")
        return await self._backend.purge(states=states, queue=queue, before=before)

    async def purge_expired(self) -> int:
        """Apply the retention now (executing workers do it every ``retention_interval``); returns how many
        tasks were deleted."""
        self._check_open("purge_expired")
        return await purge_expired(self._backend, self._options)

    async def recover_expired(self) -> int:
        """Recover now the tasks whose worker died (lease expired): each is retried, or dead when out of
        retries (executing workers do it every ``recovery_interval``). Returns how many were recovered."""
        self._check_open("recover_expired")
        worker = self._worker
        if worker is not None:
            return await worker.recover_expired()
        recovered = await recover_expired(self._backend, self._options, None, self._logger)
        self._notify_changed()
        return recovered

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        states: Collection[TaskState | str] | None = None,
    ) -> TaskInfo:
        """Wait until the task is in one of ``states`` (default: finished: succeeded, dead or cancelled) and
        return it.

        A worker in this process wakes the waiter as soon as it saves a verdict; changes made by other
        processes are seen by polling every ``poll_interval``. Raises ``TimeoutError`` after ``timeout``
        seconds (its message names the task, the timeout and the task's state then), ``LookupError`` when
        there is no task with this id (never stored, or purged).

        Example::

            task_id = await tasks.enqueue(resize, "photo.png")
            info = await tasks.wait(task_id, timeout=30)
            print(info.state, info.result)
        """
        self._check_open("wait")
        _check_id(task_id, "wait")
        wanted = check_states(states) if states is not None else {s for s in TaskState if s.is_final}
        return await self._wait_for(task_id, lambda info: info.state in wanted, timeout)

    async def _wait_for(
        self, task_id: str, predicate: Callable[[TaskInfo], bool], timeout: float | None
    ) -> TaskInfo:
        last: TaskInfo | None = None
        with anyio.move_on_after(timeout) as deadline:
            while True:
                changed = self._changed = self._changed or anyio.Event()
                info = await self.info(task_id)
                if info is None:
                    raise LookupError(f"there is no task with id {task_id!r} (never stored, or purged)")
                if predicate(info):
                    return info
                last = info
                with anyio.move_on_after(self._options.poll_interval):
                    await changed.wait()
        # Only the deadline ends the loop this way (timeout=None never does).
        assert deadline.cancelled_caught
        raise TimeoutError(f"tasks.wait({task_id!r}, timeout={timeout}) timed out: {_state_of(last)}")

    def _stored(self, tasks: builtins.list[NewTask], now: float) -> None:
        """``tasks`` were stored (committed): count them, wake this process's worker if one is due, and wake
        the waiters."""
        if self._observer is not None:
            observe_enqueued(self._observer, tasks)
        worker = self._worker
        if worker is not None and any(task.run_at <= now for task in tasks):
            worker.wake()
        self._notify_changed()

    def _notify_changed(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _info(self, record: TaskRecord) -> TaskInfo:
        result = None
        if record.result is not None:
            try:
                result = self._encoding.decode(record.result)
            except Exception as exc:  # any exception: a third-party Encoding may raise anything
                self._logger.warning(
                    "cannot decode the result of task %s, shown as None: %s: %s",
                    record.id,
                    type(exc).__name__,
                    exc,
                )
        chain_id, chain_step, schedule = chain_fields(record)
        return TaskInfo(
            id=record.id,
            name=record.name,
            queue=record.queue,
            state=record.state,
            attempts=record.attempts,
            max_retries=record.max_retries,
            enqueued_at=record.enqueued_at,
            run_at=record.run_at,
            last_error=record.last_error,
            result=result,
            timeout=record.timeout,
            started_at=record.started_at,
            finished_at=record.finished_at,
            chain_id=chain_id,
            chain_step=chain_step,
            schedule=schedule,
            damaged=record.fault,
        )

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(
                f"AsyncTasks.{what}() before the backend is open: add the AsyncTasks to a TaskManager (its "
                "initialize opens the backend), or use `async with tasks:`"
            )


def _check_id(task_id: object, what: str) -> None:
    if isinstance(task_id, str):
        check_no_nul(task_id, "the task id", f"AsyncTasks.{what}()")


def _check_queue(queue: object, what: str) -> None:
    if isinstance(queue, str):
        check_no_nul(queue, "the queue name", f"AsyncTasks.{what}()")


def _state_of(info: TaskInfo | None) -> str:
    """The state of a task a wait gave up on, for the ``TimeoutError``."""
    if info is None:  # the deadline passed during the first look
        return "the task's state was not read yet"
    text = f"the task is still {info.state.value} (attempt {info.attempts} of {info.max_retries + 1}"
    if info.state is TaskState.PENDING and info.attempts:
        text += ", waiting for a retry"
    return f"{text})"
