"""``MemoryBackend``: the in-process reference implementation of the :class:`Backend` protocol.

Everything lives in dictionaries of the process that created it: it is fast and needs no setup, so it suits
tests and examples, but it is not durable (a crash or a restart loses every task) and cannot be shared between
processes. It follows the protocol's semantics exactly, so code tested on it behaves the same on SQLite,
Redis or PostgreSQL. It is a :class:`NotifyingBackend`: cancellations of running tasks and verdicts reach
every ``AsyncTasks`` sharing the object at once.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import anyio
import anyio.lowlevel

from ..._errors import DuplicateTaskError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    Notice,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)

__all__ = ["MemoryBackend"]

_PENDING = TaskState.PENDING
_ACTIVE = TaskState.ACTIVE
_EXPIRED = "expired before it started"
_NOTICE_LOG = 4096  # notices kept for listeners that fell behind (notices are best effort)
_NOTICE_BATCH = 2048  # the most notices one wait_for_notices() call returns
_LISTENERS = 256  # listener cursors kept (the least recently used is dropped beyond)

# A queue entry: (sort key, run_at, enqueue sequence, task id). In a queue's "later" heap the sort key is
# run_at (tasks waiting for their time); in its "due" heap it is minus the priority (tasks a claim found
# due). An entry is current only while the row is PENDING and still points at this very tuple, so stale
# entries are skipped instead of removed.
_Entry = tuple[float, float, int, str]


class _Row:
    """The mutable stored form of one task (records handed out are immutable snapshots)."""

    __slots__ = (
        "attempts",
        "cancel_requested",
        "concurrency_key",
        "enqueued_at",
        "entry",
        "expires_at",
        "finished_at",
        "follow_up",
        "group_id",
        "id",
        "last_error",
        "lease_until",
        "max_retries",
        "meta",
        "name",
        "payload",
        "priority",
        "progress_done",
        "progress_message",
        "progress_total",
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
        self.seq = seq
        self.take_fields(task)
        self.enqueued_at = task.enqueued_at
        self.state = _PENDING
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.lease_until: float | None = None
        self.last_error: str | None = None
        self.result: bytes | None = None
        self.token: str | None = None
        self.entry: _Entry | None = None
        self.follow_up: NewTask | None = None
        self.cancel_requested = False
        self.progress_done: float | None = None
        self.progress_total: float | None = None
        self.progress_message: str | None = None
        self.group_id = task.group_id

    def take_fields(self, task: NewTask) -> None:
        """The fields a debounce replaces (all but the id, the state, attempts and enqueued_at)."""
        self.name = task.name
        self.queue = task.queue
        self.payload = task.payload
        self.max_retries = task.max_retries
        self.timeout = task.timeout
        self.run_at = task.run_at
        self.meta = task.meta
        self.priority = task.priority
        self.concurrency_key = task.concurrency_key
        self.expires_at = task.expires_at

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
            priority=self.priority,
            concurrency_key=self.concurrency_key,
            expires_at=self.expires_at,
            cancel_requested=self.cancel_requested,
            progress_done=self.progress_done,
            progress_total=self.progress_total,
            progress_message=self.progress_message,
            group_id=self.group_id,
        )


class _Group:
    """The mutable stored form of one group."""

    __slots__ = (
        "created_at",
        "ended",
        "finished_at",
        "id",
        "index",
        "meta",
        "outcome",
        "results",
        "task_ids",
        "then",
        "then_id",
    )

    def __init__(self, group: NewGroup) -> None:
        self.id = group.id
        self.task_ids = tuple(member.id for member in group.members)
        self.index = {task_id: n for n, task_id in enumerate(self.task_ids)}
        self.then = group.then
        self.created_at = group.created_at
        self.meta = group.meta
        self.outcome: TaskState | None = None
        self.finished_at: float | None = None
        self.then_id: str | None = None
        self.results: list[bytes | None] = [None] * len(self.task_ids)
        self.ended: list[TaskState | None] = [None] * len(self.task_ids)  # each member's last final state


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
        self._later: dict[str, list[_Entry]] = {}  # per queue: pending tasks by run_at
        self._due: dict[str, list[_Entry]] = {}  # per queue: pending tasks a claim found due, by priority
        self._active: dict[str, _Row] = {}
        self._running: dict[str, int] = {}  # ACTIVE tasks per name
        self._running_keys: dict[tuple[str, str], int] = {}  # ACTIVE tasks per (name, concurrency key)
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, as of this time)
        self._refused: dict[str, int] = {}  # name -> claims that held a task back for want of a token
        self._windows: dict[str, float] = {}  # unique key -> end of its window
        self._windows_pruned = 0
        self._paused: set[str] = set()
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._token_prefix = f"{id(self):x}-"
        self._changed: anyio.Event | None = None
        self._version = 0
        self._reported: tuple[tuple[str, ...], int] | None = None
        self._groups: dict[str, _Group] = {}
        self._notices: list[Notice] = []
        self._notices_base = 0  # the sequence number of self._notices[0]
        self._listeners: OrderedDict[object, int] = OrderedDict()  # listening task -> next sequence number
        self._noticed: anyio.Event | None = None

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
        entry = (row.run_at, row.run_at, row.seq, row.id)
        row.entry = entry
        heap = self._later.get(row.queue)
        if heap is None:
            heap = self._later[row.queue] = []
        heapq.heappush(heap, entry)

    def _insert(self, task: NewTask) -> None:
        old = self._rows.get(task.id)
        if old is not None:
            old.entry = None
        row = self._rows[task.id] = _Row(task, next(self._seq))
        self._push(row)

    def _current(self, entry: _Entry) -> _Row | None:
        row = self._rows.get(entry[3])
        if row is not None and row.entry is entry and row.state is _PENDING:
            return row
        return None

    def _top(self, heap: list[_Entry] | None) -> _Entry | None:
        """The current first entry of ``heap``, dropping stale entries on the way."""
        while heap:
            entry = heap[0]
            if self._current(entry) is not None:
                return entry
            heapq.heappop(heap)
        return None

    def _promote(self, queue: str, now: float) -> list[_Entry] | None:
        """Move the tasks of ``queue`` due at ``now`` into its due heap (by priority); return that heap."""
        later = self._later.get(queue)
        due = self._due.get(queue)
        while later:
            entry = self._top(later)
            if entry is None or entry[1] > now:
                break
            heapq.heappop(later)
            row = self._rows[entry[3]]
            promoted = (-row.priority, row.run_at, row.seq, row.id)
            row.entry = promoted
            if due is None:
                due = self._due[queue] = []
            heapq.heappush(due, promoted)
        return due

    def _take_token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens)}"

    def _lease(self, row: _Row, lease_until: float) -> ClaimedTask:
        token = self._take_token()
        row.token = token
        row.lease_until = lease_until
        self._active[row.id] = row
        return ClaimedTask(token=token, record=row.record())

    def _count_running(self, row: _Row, change: int) -> None:
        self._running[row.name] = self._running.get(row.name, 0) + change
        if row.concurrency_key is not None:
            key = (row.name, row.concurrency_key)
            self._running_keys[key] = self._running_keys.get(key, 0) + change

    def _leave_active(self, row: _Row) -> None:
        row.token = None
        row.lease_until = None
        if self._active.pop(row.id, None) is not None:
            self._count_running(row, -1)

    def _holds(self, task_id: str, token: str) -> _Row | None:
        row = self._rows.get(task_id)
        if row is None or row.state is not _ACTIVE or row.token != token:
            return None
        return row

    def _bucket(self, name: str, limits: FlowLimits, now: float) -> tuple[float, float]:
        """The rate bucket of ``name`` refilled to ``now``: (tokens, as of)."""
        rate = float(limits.rate or 0)
        stored = self._buckets.get(name)
        if stored is None:
            return rate, now
        tokens, at = stored
        if now > at and limits.per:
            tokens += (now - at) * rate / limits.per
            at = now
        return min(rate, tokens), at

    def _admit(self, row: _Row, limits: FlowLimits, now: float, refused: set[str]) -> bool:
        """Whether ``limits`` let ``row`` start now; if so, take its token. A name whose task found no
        token is added to ``refused``."""
        if limits.max_running is not None and self._running.get(row.name, 0) >= limits.max_running:
            return False
        if (
            limits.max_running_per_key is not None
            and row.concurrency_key is not None
            and self._running_keys.get((row.name, row.concurrency_key), 0) >= limits.max_running_per_key
        ):
            return False
        if limits.rate is not None:
            tokens, at = self._bucket(row.name, limits, now)
            if tokens < 1.0:
                refused.add(row.name)
                return False
            self._buckets[row.name] = (tokens - 1.0, at)
        return True

    def _window_refuses(self, task: NewTask, opened: dict[str, float]) -> bool:
        key = task.unique_key
        if key is None:
            return False
        until = opened.get(key, self._windows.get(key))
        return until is not None and until > task.enqueued_at

    def _open_windows(self, opened: dict[str, float], now: float) -> None:
        self._windows.update(opened)
        if len(self._windows) > 2 * self._windows_pruned + 1024:  # drop the windows that ended, now and then
            self._windows = {key: until for key, until in self._windows.items() if until > now}
            self._windows_pruned = len(self._windows)

    def _debounce(self, task: NewTask) -> None:
        row = self._rows.get(task.id)
        if row is None or row.state.is_final:
            self._insert(task)
        elif row.state is _PENDING:
            row.take_fields(task)
            self._push(row)
        else:  # ACTIVE: one more run after the running attempt's settlement
            row.follow_up = task

    def _start_follow_up(self, row: _Row, task: NewTask, retry_at: float | None) -> None:
        row.take_fields(task)
        if retry_at is not None and retry_at > row.run_at:
            row.run_at = retry_at
        row.enqueued_at = task.enqueued_at
        row.state = _PENDING
        row.attempts = 0
        row.started_at = None
        row.finished_at = None
        row.result = None
        row.cancel_requested = False
        self._push(row)

    def _announce(self, kind: Literal["cancel", "settled"], task_id: str) -> None:
        """Push a notice to the listeners (kept only while someone listens)."""
        if not self._listeners:
            return
        self._notices.append(Notice(kind, task_id))
        if len(self._notices) > 2 * _NOTICE_LOG:
            dropped = len(self._notices) - _NOTICE_LOG
            del self._notices[:dropped]
            self._notices_base += dropped
        event, self._noticed = self._noticed, None
        if event is not None:
            event.set()

    def _member_ended(self, row: _Row, state: TaskState, at: float, result: bytes | None = None) -> None:
        """Group bookkeeping for a member that reached the final ``state`` (in the same step)."""
        group = None if row.group_id is None else self._groups.get(row.group_id)
        index = None if group is None else group.index.get(row.id)
        if group is None or index is None:
            return
        group.ended[index] = state
        if state is TaskState.SUCCEEDED:
            group.results[index] = result
            if group.outcome is None and all(ended is TaskState.SUCCEEDED for ended in group.ended):
                group.outcome = TaskState.SUCCEEDED
                group.finished_at = at
                then = group.then
                if then is not None:
                    if then.id not in self._rows:
                        self._insert(then)
                    group.then_id = then.id
        elif group.outcome is None:
            group.outcome = state
            group.finished_at = at

    def _group_conflicts(self, group: NewGroup, opened: dict[str, float]) -> list[str]:
        """The member ids that refuse ``group`` (live, repeated, or in an open uniqueness window)."""
        seen: set[str] = set()
        conflicts: list[str] = []
        for task in group.members:
            existing = self._rows.get(task.id)
            live = task.id in seen or (existing is not None and existing.state.is_live)
            if (live or self._window_refuses(task, opened)) and task.id not in conflicts:
                conflicts.append(task.id)
            seen.add(task.id)
            if task.unique_key is not None and task.unique_until is not None:
                opened[task.unique_key] = task.unique_until
        return conflicts

    def _store_group(self, group: NewGroup, opened: dict[str, float]) -> None:
        if group.members:
            self._open_windows(opened, max(task.enqueued_at for task in group.members))
        self._groups[group.id] = _Group(group)
        for task in group.members:
            self._insert(task)

    # -- the Backend protocol -------------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` and wake waiting workers; see :meth:`Backend.enqueue_many`."""
        if if_exists not in ("error", "skip", "debounce"):
            raise ValueError(f"if_exists must be 'error', 'skip' or 'debounce', got {if_exists!r}")
        await anyio.lowlevel.checkpoint()
        if not tasks:
            return []
        rows = self._rows
        accepted: list[NewTask] = []
        opened: dict[str, float] = {}
        if if_exists == "skip":
            seen: set[str] = set()
            for task in tasks:
                if task.id in seen or task.id in rows or self._window_refuses(task, opened):
                    continue
                seen.add(task.id)
                accepted.append(task)
                if task.unique_key is not None and task.unique_until is not None:
                    opened[task.unique_key] = task.unique_until
        else:
            seen = set()
            conflicts: list[str] = []
            for task in tasks:
                existing = rows.get(task.id)
                live = if_exists == "error" and (
                    task.id in seen or (existing is not None and existing.state.is_live)
                )
                if (live or self._window_refuses(task, opened)) and task.id not in conflicts:
                    conflicts.append(task.id)
                seen.add(task.id)
                if task.unique_key is not None and task.unique_until is not None:
                    opened[task.unique_key] = task.unique_until
            if conflicts:
                raise DuplicateTaskError(conflicts[0], conflicts)
            accepted = list(tasks)
        self._open_windows(opened, max(task.enqueued_at for task in tasks))
        for task in accepted:
            if if_exists == "debounce":
                self._debounce(task)
            else:
                self._insert(task)  # replaces a finished record with this id (a live one was refused above)
        if accepted:
            self._notify()
        return [task.id for task in accepted]

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks, ``queues`` in priority order; see :meth:`Backend.claim`."""
        await anyio.lowlevel.checkpoint()
        claimed: list[ClaimedTask] = []
        if limit <= 0:
            return claimed
        refused: set[str] = set()
        for queue in dict.fromkeys(queues):
            if queue in self._paused:
                continue
            heap = self._promote(queue, now)
            held: list[_Entry] = []
            while heap and len(claimed) < limit:
                entry = heapq.heappop(heap)
                row = self._current(entry)
                if row is None:
                    continue
                if row.run_at > now:  # promoted by a claim with a later clock
                    held.append(entry)
                    continue
                if row.expires_at is not None and row.expires_at <= now:
                    row.entry = None
                    row.state = TaskState.CANCELLED
                    row.finished_at = now
                    row.last_error = _EXPIRED
                    self._member_ended(row, TaskState.CANCELLED, now)
                    self._announce("settled", row.id)
                    continue
                flow = None if limits is None else limits.get(row.name)
                if flow is not None and not self._admit(row, flow, now, refused):
                    held.append(entry)
                    continue
                row.entry = None
                row.state = _ACTIVE
                row.attempts += 1
                row.started_at = now
                self._count_running(row, +1)
                claimed.append(self._lease(row, lease_until))
            if heap is not None:
                for entry in held:
                    heapq.heappush(heap, entry)
            if len(claimed) >= limit:
                break
        for name in refused:
            self._refused[name] = self._refused.get(name, 0) + 1
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
        applied = False
        for settlement in settlements:
            row = self._holds(settlement.task_id, settlement.token)
            if row is None:
                lost.add(settlement.task_id)
                continue
            state = TaskState(settlement.state)
            if state not in (_PENDING, TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED):
                raise ValueError(f"cannot settle task {settlement.task_id!r} as {state.value!r}")
            self._leave_active(row)
            applied = True
            if settlement.error is not None:
                row.last_error = settlement.error
            retry_at: float | None = None
            if state is _PENDING:
                row.state = _PENDING
                row.run_at = retry_at = settlement.run_at if settlement.run_at is not None else settlement.at
                row.finished_at = None
                if settlement.refund_attempt and row.attempts > 0:
                    row.attempts -= 1
                self._push(row)
            else:
                row.state = state
                row.finished_at = settlement.at
                if state is TaskState.SUCCEEDED:
                    row.result = settlement.result
                self._member_ended(row, state, settlement.at, settlement.result)
            follow_up, row.follow_up = row.follow_up, None
            if follow_up is not None:
                self._start_follow_up(row, follow_up, retry_at)
            for then in settlement.then:
                if then.id not in self._rows:
                    self._insert(then)
            for group in settlement.then_groups:
                opened: dict[str, float] = {}
                if group.id not in self._groups and not self._group_conflicts(group, opened):
                    self._store_group(group, opened)
            self._announce("settled", row.id)
        if applied:  # a freed slot of max_running may let a held task start, too
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
        due (by ``clock``), or after ``timeout`` seconds. Paused queues are left out.

        Work that is already due is reported once per change of the storage, so a caller that cannot claim
        it (its clock disagrees with this backend's, or flow limits hold it back) waits instead of spinning.
        """
        deadline = anyio.current_time() + max(0.0, timeout)
        key = tuple(dict.fromkeys(queues))
        while True:
            due: float | None = None
            for queue in key:
                if queue in self._paused:
                    continue
                for heap in (self._due.get(queue), self._later.get(queue)):
                    entry = self._top(heap)
                    if entry is not None and (due is None or entry[1] < due):
                        due = entry[1]
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

    async def pause(self, queue: str) -> None:
        """Stop claims from ``queue`` until :meth:`resume` (kept while this object lives)."""
        await anyio.lowlevel.checkpoint()
        self._paused.add(queue)

    async def resume(self, queue: str) -> None:
        """Let claims take tasks from ``queue`` again."""
        await anyio.lowlevel.checkpoint()
        if queue in self._paused:
            self._paused.discard(queue)
            self._notify()

    async def paused(self) -> set[str]:
        """The paused queues."""
        await anyio.lowlevel.checkpoint()
        return set(self._paused)

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The running counts of ``name`` (and of its ``concurrency_key``) and its bucket at ``now``."""
        await anyio.lowlevel.checkpoint()
        return FlowState(
            running=self._running.get(name, 0),
            running_for_key=0
            if concurrency_key is None
            else self._running_keys.get((name, concurrency_key), 0),
            tokens=None if limits.rate is None else self._bucket(name, limits, now)[0],
            refused=0 if limits.rate is None else self._refused.get(name, 0),
        )

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
        """Cancel the pending tasks among ``task_ids`` and ask the active ones to stop; return both."""
        await anyio.lowlevel.checkpoint()
        cancelled: list[str] = []
        for task_id in dict.fromkeys(task_ids):
            row = self._rows.get(task_id)
            if row is None:
                continue
            if row.state is _PENDING:
                row.state = TaskState.CANCELLED
                row.finished_at = now
                row.entry = None
                self._member_ended(row, TaskState.CANCELLED, now)
                self._announce("settled", task_id)
                cancelled.append(task_id)
            elif row.state is _ACTIVE:
                row.cancel_requested = True
                row.follow_up = None
                self._announce("cancel", task_id)
                cancelled.append(task_id)
        return cancelled

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """The active tasks among ``task_ids`` whose cancellation was asked."""
        await anyio.lowlevel.checkpoint()
        asked: set[str] = set()
        for task_id in task_ids:
            row = self._active.get(task_id)
            if row is not None and row.cancel_requested:
                asked.add(task_id)
        return asked

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store each update whose lease is held; return the ids whose lease was lost."""
        await anyio.lowlevel.checkpoint()
        lost: set[str] = set()
        for update in updates:
            row = self._holds(update.task_id, update.token)
            if row is None:
                lost.add(update.task_id)
                continue
            row.progress_done = update.done
            row.progress_total = update.total
            row.progress_message = update.message
        return lost

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store ``group`` and its members at once, or nothing (``DuplicateTaskError``)."""
        await anyio.lowlevel.checkpoint()
        if group.id in self._groups:
            raise DuplicateTaskError(
                group.id,
                reason=f"a group with id {group.id!r} exists already; pick another group id",
            )
        opened: dict[str, float] = {}
        conflicts = self._group_conflicts(group, opened)
        if conflicts:
            raise DuplicateTaskError(conflicts[0], conflicts)
        self._store_group(group, opened)
        if group.members:
            self._notify()
        return group.id

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id, or ``None``."""
        await anyio.lowlevel.checkpoint()
        group = self._groups.get(group_id)
        if group is None:
            return None
        counts: dict[TaskState, int] = {}
        for index, task_id in enumerate(group.task_ids):
            row = self._rows.get(task_id)
            state = row.state if row is not None and row.group_id == group.id else group.ended[index]
            if state is not None:
                counts[state] = counts.get(state, 0) + 1
        return GroupRecord(
            id=group.id,
            task_ids=group.task_ids,
            outcome=group.outcome,
            results=tuple(group.results),
            counts=counts,
            created_at=group.created_at,
            finished_at=group.finished_at,
            then_id=group.then_id,
            meta=group.meta,
        )

    async def wait_for_notices(self, *, timeout: float) -> list[Notice]:
        """The notices pushed since this listener's last call (each listening task has its own place in
        them), waiting up to ``timeout`` seconds for the first."""
        listener = anyio.get_current_task().id
        end = self._notices_base + len(self._notices)
        cursor = self._listeners.pop(listener, end)
        self._listeners[listener] = cursor
        while len(self._listeners) > _LISTENERS:
            self._listeners.popitem(last=False)
        with anyio.move_on_after(max(0.0, timeout)):
            while self._notices_base + len(self._notices) <= cursor:
                if self._noticed is None:
                    self._noticed = anyio.Event()
                await self._noticed.wait()
        await anyio.lowlevel.checkpoint()
        start = max(0, cursor - self._notices_base)
        batch = self._notices[start : start + _NOTICE_BATCH]
        if listener in self._listeners:
            self._listeners[listener] = self._notices_base + start + len(batch)
        return batch

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
            row.cancel_requested = False
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
        if queue is None:  # groups are removed by their outcome and finish time (not counted)
            for group in list(self._groups.values()):
                if (
                    group.outcome in wanted
                    and group.finished_at is not None
                    and (before is None or group.finished_at < before)
                ):
                    del self._groups[group.id]

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
            self._leave_active(row)
            row.entry = None
            row.follow_up = None
        return len(victims)
