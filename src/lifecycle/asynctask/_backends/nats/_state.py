"""The replica: the store's whole state as of one log sequence, kept in the memory of every process, and the
indexes claims and waits read (due tasks by queue and priority, leases, running counts, counts for stats).

It changes only by applying the ops of a committed transaction (:meth:`State.feed` for log messages in
sequence order, :meth:`State.apply` for a transaction this process committed itself), so every process that
read the log up to the same sequence holds the same state. Planning a change (``_tx``, ``_ops``) reads it
without changing what it holds: it may reorganise the heaps (drop stale entries, move due tasks from the
``later`` heap to the ``due`` heap), which never changes what a claim would take.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Any, Literal

from ..._records import Notice, TaskState, stored_state, stored_text
from ._codec import (
    CANCEL_REQUESTED,
    CONCURRENCY_KEY,
    ENQUEUED_AT,
    EXPIRES_AT,
    FINISHED_AT,
    G_ENDED,
    G_FINISHED_AT,
    G_ID,
    G_OUTCOME,
    G_RESULTS,
    G_TASK_IDS,
    G_THEN_ID,
    ID,
    LEASE_UNTIL,
    NAME,
    ORDER,
    PRIORITY,
    QUEUE,
    RUN_AT,
    STATE,
    Group,
    Op,
    Row,
    copy_group,
    decode_message,
)

__all__ = ["Entry", "Feed", "State", "clean_text", "number", "refill"]

Entry = tuple[float, float, int, str]
"""A heap entry: (sort key, run_at, order, task id). In a queue's ``later`` heap the sort key is run_at; in
its ``due`` heap it is minus the priority. An entry is current while ``State.entry[id]`` is this very
tuple."""

Feed = Literal["applied", "buffered", "skipped", "old", "gap"]
"""What :meth:`State.feed` did with a message: applied a transaction, kept a part of one, skipped a message
it does not read, ignored one it had read already, or found messages missing before it (``gap``)."""

_STATES: dict[str, TaskState] = {state.value: state for state in TaskState}
_FINAL = frozenset(state.value for state in TaskState if state.is_final)
_PENDING = TaskState.PENDING.value
_ACTIVE = TaskState.ACTIVE.value
_SUCCEEDED = TaskState.SUCCEEDED.value
_NOTICES_KEPT = 4096  # notices kept for a listener that fell behind (notices are best effort)
_PRIORITY_BOUND = 10**15


def clean_text(value: object) -> bool:
    """Whether ``value`` is text that every reader takes as it is (a ``str`` that is valid UTF-8)."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def number(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite number."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _text(value: object) -> str:
    """A stored queue name as the stats show it (see ``stored_text``), fast for plain text."""
    if type(value) is str and value.isascii():
        return value
    return stored_text(value)


def _selection(row: Row) -> tuple[float, int] | None:
    """``(run_at, priority)`` of a pending row a claim can select, or ``None`` when a field that decides the
    selection cannot be read (the row is then handed out by recovery; see ``Backend.reclaim_expired``)."""
    run_at = number(row[RUN_AT])
    if run_at is None or not clean_text(row[QUEUE]):
        return None
    priority = row[PRIORITY]
    if priority is None:
        priority = 0
    elif type(priority) is not int or abs(priority) >= _PRIORITY_BOUND:
        return None
    expires = row[EXPIRES_AT]
    if expires is not None and number(expires) is None:
        return None
    key = row[CONCURRENCY_KEY]
    if key is not None and not clean_text(key):
        return None
    return run_at, priority


class _Partial:
    """The pieces read so far of a transaction written as several messages."""

    __slots__ = ("next", "parts", "pieces", "txn")

    def __init__(self, txn: str, parts: int, pieces: list[bytes]) -> None:
        self.txn = txn
        self.parts = parts
        self.next = 1
        self.pieces = pieces


class State:
    """The store as of log sequence :attr:`seq` (see the module docstring)."""

    def __init__(self) -> None:
        self.seq = 0
        self.rows: dict[str, Row] = {}
        self.windows: dict[str, float] = {}
        self.buckets: dict[str, tuple[float | None, float | None, int]] = {}
        self.paused: set[str] = set()
        self.later: dict[str, list[Entry]] = {}
        self.due: dict[str, list[Entry]] = {}
        self.entry: dict[str, Entry] = {}
        self.active: dict[str, float | None] = {}  # id -> lease_until (None: cannot be read)
        self.unselectable: dict[str, None] = {}  # ids no claim selects and no lease ends: recovery's
        self.running: dict[str, int] = {}
        self.running_keys: dict[tuple[str, str], int] = {}
        self.counts: dict[tuple[str, TaskState], int] = {}
        self.partial: _Partial | None = None
        self.groups: dict[str, Group] = {}
        self.members: dict[str, dict[str, int]] = {}  # group id -> {member id: its place in the group}
        self.notices: list[Notice] | None = None  # set while a listener wants them (see State.apply)
        self.version = 0  # bumped by every applied transaction
        self.windows_kept = 0  # uniqueness windows left after ended ones were last dropped (a local hint)

    def __repr__(self) -> str:
        return f"<State seq={self.seq} tasks={len(self.rows)}>"

    # -- reading the log -------------------------------------------------------------------------------------

    def feed(self, seq: int, expected: int | None, part: tuple[str, int, int], data: bytes) -> Feed:
        """Read log message ``seq``, written with ``Nats-Expected-Last-Sequence: expected``, piece ``part``
        (``(transaction, index, pieces)``) of a transaction. Only a message written right after the one before
        it (``expected == seq - 1``: the server checked that its writer had read the whole log) is read; any
        other is skipped. A transaction is applied once its last piece is read, if every piece came in order
        (a writer interrupted between pieces leaves a transaction that is never applied)."""
        if seq <= self.seq:
            return "old"
        if seq != self.seq + 1:
            return "gap"
        self.seq = seq
        if expected != seq - 1:
            return "skipped"
        txn, index, count = part
        partial = self.partial
        if count == 0:
            return "skipped"
        if count == 1:
            self.partial = None
            document = data
        elif index == 0:
            self.partial = _Partial(txn, count, [data])
            return "buffered"
        elif partial is None or partial.txn != txn or partial.next != index or partial.parts != count:
            self.partial = None
            return "skipped"
        else:
            partial.pieces.append(data)
            partial.next += 1
            if partial.next < count:
                return "buffered"
            self.partial = None
            document = b"".join(partial.pieces)
        ops = decode_message(document)
        if ops is None:
            return "skipped"
        self.apply(ops)
        return "applied"

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply the ops of one committed transaction. While :attr:`notices` is a list, what a listener is
        told is appended to it: ``"settled"`` for a task that became final or went from active back to
        pending, ``"cancel"`` for an active task whose cancellation was asked."""
        notices = self.notices
        for op in ops:
            kind = op[0]
            if kind == "u":
                old = self.rows.get(op[1])
                if old is not None:
                    row = list(old)
                    changes = op[2]
                    for index, value in changes.items():
                        row[index] = value
                    self._put(op[1], tuple(row))
                    if notices is not None and (STATE in changes or CANCEL_REQUESTED in changes):
                        self._notice(notices, op[1], old, row)
            elif kind == "n":
                self._put(op[1], tuple(op[2]))
            elif kind == "d":
                self._put(op[1], None)
            elif kind == "w":
                if op[2] is None:
                    self.windows.pop(op[1], None)
                else:
                    self.windows[op[1]] = op[2]
            elif kind == "b":
                self.buckets[op[1]] = (op[2], op[3], op[4])
            elif kind == "p":
                if op[2]:
                    self.paused.add(op[1])
                else:
                    self.paused.discard(op[1])
            elif kind == "g":
                self._put_group(op[2])
            elif kind == "gd":
                self.groups.pop(op[1], None)
                self.members.pop(op[1], None)
            elif kind == "gm":
                group = self.groups.get(op[1])
                if group is not None and op[2] < len(group[G_ENDED]):
                    group[G_ENDED][op[2]] = op[3]
                    if op[3] == _SUCCEEDED:
                        group[G_RESULTS][op[2]] = op[4]
            elif kind == "go":
                group = self.groups.get(op[1])
                if group is not None:
                    group[G_OUTCOME], group[G_FINISHED_AT], group[G_THEN_ID] = op[2], op[3], op[4]
        self.version += 1

    @staticmethod
    def _notice(notices: list[Notice], task_id: str, old: Row, row: list[Any]) -> None:
        state, before = row[STATE], old[STATE]
        if state != before:
            if (state in _FINAL and before not in _FINAL) or (state == _PENDING and before == _ACTIVE):
                notices.append(Notice("settled", task_id))
        elif state == _ACTIVE and row[CANCEL_REQUESTED] is True and old[CANCEL_REQUESTED] is not True:
            notices.append(Notice("cancel", task_id))
        else:
            return
        if len(notices) > 2 * _NOTICES_KEPT:
            del notices[:-_NOTICES_KEPT]

    def _put_group(self, group: Group) -> None:
        stored = list(group)
        stored[G_RESULTS] = list(group[G_RESULTS])
        stored[G_ENDED] = list(group[G_ENDED])
        self.groups[stored[G_ID]] = stored
        self.members[stored[G_ID]] = {task_id: n for n, task_id in enumerate(stored[G_TASK_IDS])}

    def load(
        self,
        seq: int,
        rows: Iterable[Row],
        windows: dict[str, float],
        buckets: dict[str, tuple[float | None, float | None, int]],
        paused: set[str],
        groups: Iterable[Group] = (),
    ) -> None:
        """Fill an empty state from a snapshot taken at ``seq``."""
        self.seq = seq
        for row in rows:
            self._put(row[ID], row)
        self.windows = windows
        self.buckets = buckets
        self.paused = paused
        for group in groups:
            self._put_group(group)
        self.version += 1

    # -- indexes ---------------------------------------------------------------------------------------------

    def _put(self, task_id: str, row: Row | None) -> None:
        old = self.rows.get(task_id)
        if old is not None:
            self._unindex(task_id, old)
        if row is None:
            self.rows.pop(task_id, None)
            return
        self.rows[task_id] = row
        self._index(task_id, row)

    def _index(self, task_id: str, row: Row) -> None:
        value = row[STATE]
        state = _STATES.get(value) if type(value) is str else None
        count = (_text(row[QUEUE]), state if state is not None else stored_state(value))
        self.counts[count] = self.counts.get(count, 0) + 1
        if state is TaskState.PENDING:
            selection = _selection(row)
            if selection is None:
                self.unselectable[task_id] = None
            else:
                self._push(task_id, row, selection[0])
        elif state is TaskState.ACTIVE:
            self.active[task_id] = number(row[LEASE_UNTIL])
            self._count_running(row, 1)
        elif state is None:
            self.unselectable[task_id] = None

    def _unindex(self, task_id: str, row: Row) -> None:
        value = row[STATE]
        state = _STATES.get(value) if type(value) is str else None
        count = (_text(row[QUEUE]), state if state is not None else stored_state(value))
        left = self.counts.get(count, 0) - 1
        if left > 0:
            self.counts[count] = left
        else:
            self.counts.pop(count, None)
        self.entry.pop(task_id, None)
        self.unselectable.pop(task_id, None)
        if self.active.pop(task_id, _MISSING) is not _MISSING:
            self._count_running(row, -1)

    def _count_running(self, row: Row, change: int) -> None:
        name = row[NAME]
        if type(name) is not str:
            return
        self.running[name] = self.running.get(name, 0) + change
        key = row[CONCURRENCY_KEY]
        if type(key) is str:
            pair = (name, key)
            self.running_keys[pair] = self.running_keys.get(pair, 0) + change

    def _push(self, task_id: str, row: Row, run_at: float) -> None:
        entry = (run_at, run_at, row[ORDER], task_id)
        self.entry[task_id] = entry
        queue = row[QUEUE]
        heap = self.later.get(queue)
        if heap is None:
            heap = self.later[queue] = []
        heapq.heappush(heap, entry)

    def top(self, heap: list[Entry] | None) -> Entry | None:
        """The current first entry of ``heap``, dropping stale entries on the way."""
        entries = self.entry
        while heap:
            entry = heap[0]
            if entries.get(entry[3]) is entry:
                return entry
            heapq.heappop(heap)
        return None

    def promote(self, queue: str, now: float) -> list[Entry] | None:
        """Move the tasks of ``queue`` due at ``now`` into its due heap (by priority); return that heap."""
        later = self.later.get(queue)
        due = self.due.get(queue)
        while later:
            entry = self.top(later)
            if entry is None or entry[1] > now:
                break
            heapq.heappop(later)
            task_id = entry[3]
            priority = self.rows[task_id][PRIORITY] or 0
            promoted = (-priority, entry[1], entry[2], task_id)
            self.entry[task_id] = promoted
            if due is None:
                due = self.due[queue] = []
            heapq.heappush(due, promoted)
        return due

    def earliest(self, queues: Iterable[str]) -> float | None:
        """The earliest ``run_at`` of a pending task in ``queues`` (paused ones left out), or ``None``."""
        due: float | None = None
        for queue in queues:
            if queue in self.paused:
                continue
            for heap in (self.due.get(queue), self.later.get(queue)):
                entry = self.top(heap)
                if entry is not None and (due is None or entry[1] < due):
                    due = entry[1]
        return due

    # -- reading ---------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[TaskState, int]]:
        """The number of records per queue and state."""
        counts: dict[str, dict[TaskState, int]] = {}
        for (queue, state), count in self.counts.items():
            counts.setdefault(queue, {})[state] = count
        return counts

    def bucket(self, name: str, rate: int, per: float | None, now: float) -> tuple[float, float]:
        """The rate bucket of ``name`` refilled to ``now``: ``(tokens, as of)``; full when never used."""
        return refill(self.buckets.get(name), rate, per, now)

    def refused(self, name: str) -> int:
        """Claims that held a due task of ``name`` back for want of a token."""
        stored = self.buckets.get(name)
        return 0 if stored is None else stored[2]

    def snapshot_parts(
        self,
    ) -> tuple[
        int,
        list[Row],
        dict[str, float],
        dict[str, tuple[float | None, float | None, int]],
        set[str],
        list[Group],
    ]:
        """What a snapshot holds, copied (rows are immutable; groups are copied), so it can be encoded while
        this state moves on."""
        groups = [copy_group(group) for group in self.groups.values()]
        return (
            self.seq,
            list(self.rows.values()),
            dict(self.windows),
            dict(self.buckets),
            set(self.paused),
            groups,
        )

    def age(self, row: Row) -> float:
        """``finished_at``, else ``enqueued_at`` (0 when neither can be read): what ``purge(before=)``
        compares."""
        finished = number(row[FINISHED_AT])
        if finished is not None:
            return finished
        enqueued = number(row[ENQUEUED_AT])
        return 0.0 if enqueued is None else enqueued


_MISSING: Any = object()


def refill(
    stored: tuple[float | None, float | None, int] | None, rate: int, per: float | None, now: float
) -> tuple[float, float]:
    """A bucket as stored, refilled to ``now`` at ``rate`` tokens per ``per`` seconds, at most ``rate``."""
    capacity = float(rate)
    if stored is None or stored[0] is None or stored[1] is None:
        return capacity, now
    tokens, at = float(stored[0]), float(stored[1])
    if now > at and per:
        tokens += (now - at) * capacity / per
        at = now
    return min(capacity, tokens), at
