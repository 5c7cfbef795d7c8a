"""``MemoryBackend``: the in-process reference implementation of the :class:`Backend` protocol.

Everything lives in dictionaries of the process that created it: it is fast and needs no setup, so it suits
tests and examples, but it is not durable (a crash or a restart loses every task) and cannot be shared between
processes. It follows the protocol's semantics exactly, so code tested on it behaves the same on SQLite,
Redis or PostgreSQL.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import anyio
import anyio.lowlevel

from ..._errors import DuplicateTaskError
from ..._records import ClaimedTask, NewTask, Settlement, TaskRecord, TaskState

__all__ = ["MemoryBackend"]

_PENDING = TaskState.PENDING
_ACTIVE = TaskState.ACTIVE

# A ready-queue entry: (run_at, enqueue sequence, task id). An entry is current only while the row is
# PENDING and still points at this very tuple, so stale entries are skipped instead of removed.
_Entry = tuple[float, int, str]


class _Row:
    """The mutable stored form of one task (records handed out are immutable snapshots)."""

    __slots__ = (
        "attempts",
        "enqueued_at",
        "entry",
        "finished_at",
        "id",
        "last_error",
        "lease_until",
        "max_retries",
        "meta",
        "name",
        "payload",
        "queue",
        "result",
        "run_at",
        "seq",
        "started_at",
        "state",
        "timeout",
        "token",
    )

    def __init__(self, task: NewTask, seq: int) -> None:
        self.id = task.id
        self.name = task.name
        self.queue = task.queue
        self.payload = task.payload
        self.max_retries = task.max_retries
        self.timeout = task.timeout
        self.enqueued_at = task.enqueued_at
        self.run_at = task.run_at
        self.meta = task.meta
        self.seq = seq
        self.state = _PENDING
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.lease_until: float | None = None
        self.last_error: str | None = None
        self.result: bytes | None = None
        self.token: str | None = None
        self.entry: _Entry | None = None

    def record(self) -> TaskRecord:
        return TaskRecord(
            id=self.id,
            name=self.name,
            queue=self.queue,
            payload=self.payload,
            state=self.state,
            attempts=self.attempts,
            max_retries=self.max_retries,
            timeout=self.timeout,
            enqueued_at=self.enqueued_at,
            run_at=self.run_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            lease_until=self.lease_until,
            last_error=self.last_error,
            result=self.result,
            meta=self.meta,
        )


class MemoryBackend:
    """An in-process, non-durable :class:`~lifecycle.asynctask.Backend` for tests and examples.

    Each object is its own private storage: two ``MemoryBackend()`` objects share nothing, and one object must
    be used from one event loop at a time. Tasks are lost when the process ends.

    ``clock`` is only used by :meth:`wait_for_work` to tell when a delayed task becomes due (every state
    change takes its time from the caller, as the protocol requires); pass the same clock you give
    ``AsyncTasks`` when you drive time by hand in tests.

    Example::

        tasks = AsyncTasks(MemoryBackend())
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._ready: dict[str, list[_Entry]] = {}
        self._active: dict[str, _Row] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._token_prefix = f"{id(self):x}-"
        self._changed: anyio.Event | None = None
        self._version = 0
        self._reported: tuple[tuple[str, ...], int] | None = None

    def __repr__(self) -> str:
        return f"MemoryBackend(<{len(self._rows)} tasks>)"

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect: a MemoryBackend is usable from its creation (and after :meth:`close`)."""
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Wake any waiter; the stored tasks are kept while the object lives (several ``AsyncTasks`` may share
        one MemoryBackend, and closing it for one must not break the others). Idempotent."""
        self._notify()
        await anyio.lowlevel.checkpoint()

    # -- internals ------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._version += 1
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    def _push(self, row: _Row) -> None:
        entry = (row.run_at, row.seq, row.id)
        row.entry = entry
        heap = self._ready.get(row.queue)
        if heap is None:
            heap = self._ready[row.queue] = []
        heapq.heappush(heap, entry)

    def _insert(self, task: NewTask) -> None:
        row = self._rows[task.id] = _Row(task, next(self._seq))
        self._push(row)

    def _head(self, queue: str) -> _Entry | None:
        """The current earliest entry of ``queue``, dropping stale entries on the way."""
        heap = self._ready.get(queue)
        if not heap:
            return None
        rows = self._rows
        while heap:
            entry = heap[0]
            row = rows.get(entry[2])
            if row is not None and row.entry is entry and row.state is _PENDING:
                return entry
            heapq.heappop(heap)
        return None

    def _take_token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens)}"

    def _lease(self, row: _Row, lease_until: float) -> ClaimedTask:
        token = self._take_token()
        row.token = token
        row.lease_until = lease_until
        self._active[row.id] = row
        return ClaimedTask(token=token, record=row.record())

    def _leave_active(self, row: _Row) -> None:
        row.token = None
        row.lease_until = None
        self._active.pop(row.id, None)

    def _holds(self, task_id: str, token: str) -> _Row | None:
        row = self._rows.get(task_id)
        if row is None or row.state is not _ACTIVE or row.token != token:
            return None
        return row

    # -- the Backend protocol -------------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip"] = "error"
    ) -> list[str]:
        """Store ``tasks`` and wake waiting workers; see :meth:`Backend.enqueue_many`."""
        if if_exists not in ("error", "skip"):
            raise ValueError(f"if_exists must be 'error' or 'skip', got {if_exists!r}")
        await anyio.lowlevel.checkpoint()
        if not tasks:
            return []
        rows = self._rows
        accepted: list[NewTask] = []
        if if_exists == "error":
            seen: set[str] = set()
            conflicts: list[str] = []
            for task in tasks:
                existing = rows.get(task.id)
                live = existing is not None and existing.state.is_live
                if (task.id in seen or live) and task.id not in conflicts:
                    conflicts.append(task.id)
                seen.add(task.id)
            if conflicts:
                raise DuplicateTaskError(conflicts[0], conflicts)
            accepted = list(tasks)
        else:
            seen = set()
            for task in tasks:
                if task.id in seen or task.id in rows:
                    continue
                seen.add(task.id)
                accepted.append(task)
        for task in accepted:
            self._insert(task)  # replaces a finished record with this id (a live one was refused above)
        if accepted:
            self._notify()
        return [task.id for task in accepted]

    async def claim(
        self, queues: Sequence[str], limit: int, *, now: float, lease_until: float
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks, ``queues`` in priority order; see :meth:`Backend.claim`."""
        await anyio.lowlevel.checkpoint()
        claimed: list[ClaimedTask] = []
        if limit <= 0:
            return claimed
        rows = self._rows
        for queue in dict.fromkeys(queues):
            heap = self._ready.get(queue)
            while heap and len(claimed) < limit:
                entry = self._head(queue)
                if entry is None or entry[0] > now:
                    break
                heapq.heappop(heap)
                row = rows[entry[2]]
                row.entry = None
                row.state = _ACTIVE
                row.attempts += 1
                row.started_at = now
                claimed.append(self._lease(row, lease_until))
            if len(claimed) >= limit:
                break
        return claimed

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Renew each held lease; return the ids whose lease was lost."""
        await anyio.lowlevel.checkpoint()
        lost: set[str] = set()
        for task_id, token in leases:
            row = self._holds(task_id, token)
            if row is None:
                lost.add(task_id)
            else:
                row.lease_until = lease_until
        return lost

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply each settlement whose lease is held (with its ``then`` tasks); return the ids not applied."""
        await anyio.lowlevel.checkpoint()
        lost: set[str] = set()
        wake = False
        for settlement in settlements:
            row = self._holds(settlement.task_id, settlement.token)
            if row is None:
                lost.add(settlement.task_id)
                continue
            self._leave_active(row)
            state = TaskState(settlement.state)
            if settlement.error is not None:
                row.last_error = settlement.error
            if state is _PENDING:
                row.state = _PENDING
                row.run_at = settlement.run_at if settlement.run_at is not None else settlement.at
                row.finished_at = None
                if settlement.refund_attempt and row.attempts > 0:
                    row.attempts -= 1
                self._push(row)
                wake = True
            elif state in (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED):
                row.state = state
                row.finished_at = settlement.at
                if state is TaskState.SUCCEEDED:
                    row.result = settlement.result
            else:
                raise ValueError(f"cannot settle task {settlement.task_id!r} as {state.value!r}")
            for follow_up in settlement.then:
                if follow_up.id not in self._rows:
                    self._insert(follow_up)
                    wake = True
        if wake:
            self._notify()
        return lost

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over active tasks whose lease ended before ``now`` with a fresh token, attempts unchanged."""
        await anyio.lowlevel.checkpoint()
        taken: list[ClaimedTask] = []
        if limit <= 0:
            return taken
        expired = [
            row for row in self._active.values() if row.lease_until is not None and row.lease_until < now
        ]
        expired.sort(key=lambda row: (row.lease_until or 0.0, row.seq))
        for row in expired[:limit]:
            taken.append(self._lease(row, lease_until))
        return taken

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Return when a task in ``queues`` was enqueued or released, when the earliest delayed one becomes
        due (by ``clock``), or after ``timeout`` seconds.

        Work that is already due is reported once per change of the storage, so a caller that cannot claim
        it (its clock disagrees with this backend's) waits instead of spinning.
        """
        deadline = anyio.current_time() + max(0.0, timeout)
        key = tuple(dict.fromkeys(queues))
        while True:
            due: float | None = None
            for queue in key:
                entry = self._head(queue)
                if entry is not None and (due is None or entry[0] < due):
                    due = entry[0]
            now = self._clock()
            if due is not None and due <= now:
                snapshot = (key, self._version)
                if snapshot != self._reported:
                    self._reported = snapshot
                    await anyio.lowlevel.checkpoint()
                    return
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                await anyio.lowlevel.checkpoint()
                return
            pause = remaining
            if due is not None and due > now:
                pause = min(pause, due - now)
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            with anyio.move_on_after(pause):
                await changed.wait()
                return

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None``."""
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(task_id)
        return None if row is None else row.record()

    async def list_records(
        self,
        *,
        states: Collection[TaskState] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Records matching the filters, newest ``enqueued_at`` first (then newest stored first)."""
        await anyio.lowlevel.checkpoint()
        wanted = None if states is None else {TaskState(state) for state in states}
        rows = [
            row
            for row in self._rows.values()
            if (wanted is None or row.state in wanted) and (queue is None or row.queue == queue)
        ]
        rows.sort(key=lambda row: (row.enqueued_at, row.seq), reverse=True)
        return [row.record() for row in rows[max(0, offset) : max(0, offset) + max(0, limit)]]

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """Counts per queue and state (states with no record are left out)."""
        await anyio.lowlevel.checkpoint()
        counts: dict[str, dict[TaskState, int]] = {}
        for row in self._rows.values():
            per_queue = counts.setdefault(row.queue, {})
            per_queue[row.state] = per_queue.get(row.state, 0) + 1
        return counts

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Cancel the pending tasks among ``task_ids``; return those cancelled."""
        await anyio.lowlevel.checkpoint()
        cancelled: list[str] = []
        for task_id in dict.fromkeys(task_ids):
            row = self._rows.get(task_id)
            if row is not None and row.state is _PENDING:
                row.state = TaskState.CANCELLED
                row.finished_at = now
                row.entry = None
                cancelled.append(task_id)
        return cancelled

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move dead (or, by id, cancelled) tasks back to pending with ``attempts = 0``."""
        await anyio.lowlevel.checkpoint()
        if task_ids is None:
            candidates = [
                row
                for row in self._rows.values()
                if row.state is TaskState.DEAD and (queue is None or row.queue == queue)
            ]
        else:
            candidates = []
            for task_id in dict.fromkeys(task_ids):
                row = self._rows.get(task_id)
                if (
                    row is not None
                    and row.state in (TaskState.DEAD, TaskState.CANCELLED)
                    and (queue is None or row.queue == queue)
                ):
                    candidates.append(row)
        for row in candidates:
            row.state = _PENDING
            row.attempts = 0
            row.run_at = now
            row.finished_at = None
            self._push(row)
        if candidates:
            self._notify()
        return len(candidates)

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete matching records (oldest first when ``limit`` cuts); return how many were deleted."""
        await anyio.lowlevel.checkpoint()
        wanted = {TaskState(state) for state in states}
        if not wanted or (limit is not None and limit <= 0):
            return 0

        def age(row: _Row) -> float:
            return row.finished_at if row.finished_at is not None else row.enqueued_at

        victims = [
            row
            for row in self._rows.values()
            if row.state in wanted
            and (queue is None or row.queue == queue)
            and (before is None or age(row) < before)
        ]
        if limit is not None and len(victims) > limit:
            victims.sort(key=lambda row: (age(row), row.seq))
            victims = victims[:limit]
        for row in victims:
            del self._rows[row.id]
            self._active.pop(row.id, None)
            row.entry = None
        return len(victims)
