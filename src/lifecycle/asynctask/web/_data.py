"""What the dashboard shows, read through the public API of :mod:`lifecycle.asynctask` only.

Every read is bounded: counts come from ``stats()`` (one query), lists from ``list()`` pages (the backend's
``enqueued_at`` index, newest first, ``limit``/``offset``), a task from ``info()`` and ``backend.get()``.
What the backends cannot count directly (pending tasks that are scheduled or waiting for a retry, the tasks
finished in the last hour) is counted in a bounded window of the newest records, and the page says when a
count is only a lower bound.
"""

from __future__ import annotations

import pprint
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...asynctask import AsyncTasks, GroupInfo, QueueStats, ScheduleInfo, TaskInfo, TaskRecord, TaskState
from .._backend import supports_flow_control

__all__ = [
    "BREAKDOWN_WINDOW",
    "CHART_BUCKETS",
    "CHART_SPAN",
    "FINAL_STATES",
    "NAME_SCAN_LIMIT",
    "PAGE_SIZE",
    "Decoded",
    "Overview",
    "QueueRow",
    "TaskDetail",
    "TaskPage",
    "Throughput",
    "decode_value",
    "paused_queues",
    "read_overview",
    "read_task",
    "read_tasks",
    "read_throughput",
]

#: Tasks per list page.
PAGE_SIZE = 50
#: How many of the newest pending tasks are read to count the scheduled and retrying ones.
BREAKDOWN_WINDOW = 1000
#: A name filter reads at most this many records for one page, then offers to read on.
NAME_SCAN_LIMIT = 2000
#: The chart covers this many seconds, in this many bars.
CHART_SPAN = 3600.0
CHART_BUCKETS = 12
#: The chart reads at most this many finished records (newest enqueued first), in pages of _CHART_PAGE.
CHART_RECORD_LIMIT = 5000
_CHART_PAGE = 500
#: Finished tasks enqueued longer than this before the window started are not looked for.
_CHART_LOOKBACK = 3600.0
#: Arguments and results longer than this (as text) are cut.
VALUE_LIMIT = 20_000
#: Tasks in the "running now" table.
ACTIVE_ROWS = 20
#: Dead tasks in the "recent failures" table.
FAILURE_ROWS = 10

FINAL_STATES = (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue on the overview: the counts of ``stats()``, the pending tasks that wait for a time
    (``scheduled``: delayed, ``retrying``: after a failed attempt), and whether the queue is paused.

    ``breakdown_exact`` is false when the queue has more pending tasks than the window read: ``scheduled``
    and ``retrying`` are then lower bounds. ``paused`` is ``None`` when the store cannot say (no pause
    API)."""

    name: str
    counts: QueueStats
    scheduled: int
    retrying: int
    breakdown_exact: bool
    paused: bool | None


@dataclass(frozen=True, slots=True)
class Throughput:
    """Tasks finished per bucket over the last :data:`CHART_SPAN` seconds (oldest bucket first)."""

    start: float
    bucket: float
    succeeded: tuple[int, ...]
    dead: tuple[int, ...]
    read: int
    complete: bool

    @property
    def finished(self) -> int:
        """Tasks that finished (succeeded or dead) in the whole span."""
        return sum(self.succeeded) + sum(self.dead)

    @property
    def failure_rate(self) -> float | None:
        """The share of finished tasks that died, or ``None`` when none finished."""
        finished = self.finished
        return sum(self.dead) / finished if finished else None


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything on the overview page."""

    queues: list[QueueRow]
    active: list[TaskRecord]
    failures: list[TaskInfo]
    schedules: list[ScheduleInfo]
    throughput: Throughput
    now: float

    @property
    def totals(self) -> QueueStats:
        """The counts of every queue added up."""
        fields = ("pending", "active", "succeeded", "dead", "cancelled")
        return QueueStats(**{name: sum(getattr(row.counts, name) for row in self.queues) for name in fields})


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task list: the rows, and where the next page starts (``None``: no more)."""

    rows: list[TaskInfo]
    offset: int
    next_offset: int | None
    scanned: int


@dataclass(frozen=True, slots=True)
class Decoded:
    """A stored value (arguments or result) for display: ``text`` is the decoded value pretty-printed, or,
    when the encoding could not decode it, the raw bytes made readable (``error`` then says why)."""

    text: str
    error: str | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class TaskDetail:
    """Everything on a task page."""

    info: TaskInfo
    record: TaskRecord | None
    arguments: Decoded | None
    result: Decoded | None
    group: GroupInfo | None = None
    """The group the task is a member of, when it is one (and the group is still stored)."""


async def paused_queues(tasks: AsyncTasks) -> frozenset[str] | None:
    """The paused queues, or ``None`` when the store cannot pause queues (a backend without flow control).

    The one place the overview learns about pauses: the rows show the flag and the pause/resume actions
    when this is not ``None``.
    """
    if not supports_flow_control(tasks.backend):
        return None
    return frozenset(await tasks.paused())


async def read_overview(tasks: AsyncTasks, throughput: Throughput, now: float) -> Overview:
    """The overview's data: counts per queue, the breakdown of pending tasks, the running tasks with
    their leases, the newest dead tasks and the declared schedules."""
    stats = await tasks.stats()
    pending = await tasks.list(state=TaskState.PENDING, limit=BREAKDOWN_WINDOW)
    seen: dict[str, int] = {}
    scheduled: dict[str, int] = {}
    retrying: dict[str, int] = {}
    for info in pending:
        seen[info.queue] = seen.get(info.queue, 0) + 1
        if info.attempts > 0:
            retrying[info.queue] = retrying.get(info.queue, 0) + 1
        elif info.run_at > now:
            scheduled[info.queue] = scheduled.get(info.queue, 0) + 1
    paused = await paused_queues(tasks)
    rows = [
        QueueRow(
            name=queue,
            counts=counts,
            scheduled=scheduled.get(queue, 0),
            retrying=retrying.get(queue, 0),
            breakdown_exact=seen.get(queue, 0) >= counts.pending,
            paused=None if paused is None else queue in paused,
        )
        for queue, counts in stats.items()
    ]
    if paused:  # a paused queue without tasks still shows, so it can be resumed
        rows += [
            QueueRow(queue, QueueStats(), 0, 0, True, True) for queue in sorted(paused) if queue not in stats
        ]
        rows.sort(key=lambda row: row.name)
    active = await tasks.backend.list_records(states=[TaskState.ACTIVE], limit=ACTIVE_ROWS)
    failures = await tasks.list(state=TaskState.DEAD, limit=FAILURE_ROWS)
    return Overview(
        queues=rows,
        active=active,
        failures=failures,
        schedules=tasks.schedules(),
        throughput=throughput,
        now=now,
    )


async def read_throughput(tasks: AsyncTasks, now: float) -> Throughput:
    """Succeeded and dead tasks per bucket of the last hour, by ``finished_at``.

    Read from the newest finished records (newest enqueued first), page by page, until the records were
    enqueued more than an hour before the window began or :data:`CHART_RECORD_LIMIT` records were read
    (then ``complete`` is false and the counts are lower bounds)."""
    bucket = CHART_SPAN / CHART_BUCKETS
    start = now - CHART_SPAN
    succeeded = [0] * CHART_BUCKETS
    dead = [0] * CHART_BUCKETS
    horizon = start - _CHART_LOOKBACK
    read = 0
    complete = False
    states = [TaskState.SUCCEEDED, TaskState.DEAD]
    while read < CHART_RECORD_LIMIT:
        page = await tasks.list(state=states, limit=_CHART_PAGE, offset=read)
        read += len(page)
        for info in page:
            finished = info.finished_at
            if finished is None or not start <= finished <= now:
                continue
            index = min(CHART_BUCKETS - 1, int((finished - start) // bucket))
            (dead if info.state is TaskState.DEAD else succeeded)[index] += 1
        if len(page) < _CHART_PAGE or page[-1].enqueued_at < horizon:
            complete = True
            break
    return Throughput(start, bucket, tuple(succeeded), tuple(dead), read, complete)


async def read_tasks(
    tasks: AsyncTasks,
    *,
    queue: str | None,
    states: list[TaskState] | None,
    name: str | None,
    offset: int,
    page_size: int = PAGE_SIZE,
) -> TaskPage:
    """One page of tasks, newest first, from ``offset`` in the backend's order.

    Without a name filter a page is one ``list()`` call. With one (a case-insensitive substring of the
    task name) the backend's pages are read from ``offset`` until ``page_size`` tasks match or
    :data:`NAME_SCAN_LIMIT` records were read: ``next_offset`` then continues where the reading stopped."""
    if not name:
        rows = await tasks.list(state=states, queue=queue, limit=page_size + 1, offset=offset)
        more = len(rows) > page_size
        return TaskPage(rows[:page_size], offset, offset + page_size if more else None, len(rows))
    wanted = name.casefold()
    matches: list[TaskInfo] = []
    position = offset
    chunk = 200
    while position - offset < NAME_SCAN_LIMIT:
        rows = await tasks.list(state=states, queue=queue, limit=chunk, offset=position)
        for index, info in enumerate(rows):
            if wanted in info.name.casefold():
                matches.append(info)
                if len(matches) == page_size:
                    # The next page starts after this match (whether more rows follow is unknown).
                    return TaskPage(matches, offset, position + index + 1, position + index + 1 - offset)
        position += len(rows)
        if len(rows) < chunk:
            return TaskPage(matches, offset, None, position - offset)
    return TaskPage(matches, offset, position, position - offset)


async def read_task(tasks: AsyncTasks, task_id: str) -> TaskDetail | None:
    """The task page's data, or ``None`` when there is no such task (a chain id gives the step the chain
    is at, as ``info()`` does)."""
    info = await tasks.info(task_id)
    if info is None:
        return None
    record = await tasks.backend.get(info.id)
    arguments = result = None
    if record is not None:
        arguments = decode_value(record.payload, tasks.encoding.decode, arguments=True)
        if record.result is not None:
            result = decode_value(record.result, tasks.encoding.decode, arguments=False)
    group = None if info.group_id is None else await tasks.group_info(info.group_id)
    return TaskDetail(info, record, arguments, result, group)


def decode_value(data: bytes, decode: Callable[[bytes], Any], *, arguments: bool) -> Decoded:
    """``data`` decoded and pretty-printed (arguments one per line, numbered), or its raw bytes made
    readable when ``decode`` raises: UTF-8 text as it is, other bytes as a Python bytes literal."""
    try:
        value = decode(data)
    except Exception as exc:  # any exception: a third-party Encoding may raise anything
        error = f"{type(exc).__name__}: {exc}"
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            raw = repr(data)
        text, cut = _cut(raw)
        return Decoded(text, error=error, truncated=cut)
    if arguments and isinstance(value, list | tuple):
        if not value:
            return Decoded("(no arguments)")
        lines = [f"[{index}] {_pretty(item)}" for index, item in enumerate(value)]
        text, cut = _cut("\n".join(lines))
        return Decoded(text, truncated=cut)
    text, cut = _cut(_pretty(value))
    return Decoded(text, truncated=cut)


def _pretty(value: Any) -> str:
    try:
        return pprint.pformat(value, width=100, sort_dicts=False)
    except Exception:  # a value whose repr raises
        return f"<{type(value).__name__} whose repr() fails>"


def _cut(text: str) -> tuple[str, bool]:
    if len(text) <= VALUE_LIMIT:
        return text, False
    return text[:VALUE_LIMIT], True
