"""Observing the engine: the :class:`TaskObserver` protocol (what Prometheus metrics need) and the calls the
engine makes into it.

An ``AsyncTasks`` built with ``metrics=`` reports every enqueue, every attempt's start, and how each attempt
ended with its run time. Without an observer the engine pays one ``is not None`` test per task, nothing more.
:class:`lifecycle.AsyncTasksMetrics` (``lifecycle.Metrics(manager).async_tasks``) is an observer; anything
with the three methods below is one too (a StatsD or OpenTelemetry bridge, a test double).

This module knows nothing of ``lifecycle.Metrics``: ``metrics=`` takes any object whose ``async_tasks`` is an
observer (:class:`ObserverSource`), so the durable-task layer never imports the metrics layer above it.

An observer that raises never breaks the work: the error is logged on the ``lifecycle.asynctask`` logger and
the engine goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, Protocol, runtime_checkable

from .._redact import library_logger
from ._records import NewTask, Settlement, TaskRecord, TaskState

__all__ = [
    "AttemptOutcome",
    "ObserverSource",
    "TaskObserver",
    "observe_enqueued",
    "observe_finished",
    "observe_started",
    "outcome_of",
    "resolve_observer",
    "track_queue_depths",
]

AttemptOutcome = Literal["succeeded", "retried", "dead", "cancelled"]
"""How one attempt ended: it returned, or it failed and will run again, or it failed for good, or
``tasks.cancel()`` stopped it."""

_logger = library_logger("lifecycle.asynctask")


@runtime_checkable
class TaskObserver(Protocol):
    """Receives what the engine does, to count it: the hooks behind ``AsyncTasks(..., metrics=...)``.

    Every method is called synchronously in the worker's event loop thread, so it must be quick and must not
    block (increment a counter, append to a buffer). ``queue`` and ``task`` are the queue and the registered
    task name. :class:`lifecycle.AsyncTasksMetrics` implements it for Prometheus.

    An observer may also have ``group_finished(outcome: str) -> None`` (optional, found by name): it is
    called once per group of tasks that ended (``"succeeded"``, ``"dead"`` or ``"cancelled"``), by the
    worker whose verdict ended it (or the process whose ``cancel()`` did). Without it, no group is read for
    the metrics.
    """

    def enqueued(self, queue: str, task: str, count: int = 1) -> None:
        """``count`` tasks named ``task`` were stored on ``queue`` (by ``enqueue``/``enqueue_many``, or as the
        next steps of finished tasks)."""
        ...

    def started(self, queue: str, task: str) -> None:
        """A worker of this process started an attempt of ``task``."""
        ...

    def finished(self, queue: str, task: str, outcome: AttemptOutcome, seconds: float) -> None:
        """An attempt ended after ``seconds`` (by the engine's clock) with ``outcome``."""
        ...


class ObserverSource(Protocol):
    """What holds an observer for ``AsyncTasks(metrics=...)``: its ``async_tasks`` is a :class:`TaskObserver`.

    A :class:`lifecycle.Metrics` is one (its ``async_tasks`` is the Prometheus ``AsyncTasksMetrics``).
    """

    @property
    def async_tasks(self) -> TaskObserver:
        """The observer to report to."""
        ...


def resolve_observer(metrics: object) -> TaskObserver | None:
    """The observer an ``AsyncTasks(metrics=...)`` argument stands for: ``None``, an :class:`ObserverSource`
    such as a :class:`lifecycle.Metrics` (its ``async_tasks``), or a :class:`TaskObserver`. Raises
    ``TypeError`` naming what to pass instead."""
    if metrics is None:
        return None
    observer: object = getattr(metrics, "async_tasks", metrics)
    if not isinstance(observer, TaskObserver):
        raise TypeError(
            "metrics must be a lifecycle.Metrics, its .async_tasks, or an object with enqueued(queue, task, "
            f"count), started(queue, task) and finished(queue, task, outcome, seconds); got {metrics!r}"
        )
    return observer


def track_queue_depths(
    observer: TaskObserver,
    stats: Callable[[], Awaitable[Any]],
    is_open: Callable[[], bool],
    flow: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """When ``observer`` reports queue depths (it has ``track()``, like ``AsyncTasksMetrics``), register
    ``stats`` (and ``flow``: ``AsyncTasks.flow``) with it, read only while ``is_open()`` (a scrape before
    ``initialize`` or after ``cleanup`` then neither fails nor logs)."""
    track = getattr(observer, "track", None)
    if callable(track):
        track(_QueueDepths(stats, is_open, flow))


class _QueueDepths:
    """``AsyncTasks.stats()`` and ``AsyncTasks.flow()`` for a metrics scrape: an empty mapping and ``None``
    while the backend is closed."""

    __slots__ = ("_flow", "_is_open", "_stats")

    def __init__(
        self,
        stats: Callable[[], Awaitable[Any]],
        is_open: Callable[[], bool],
        flow: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self._stats = stats
        self._is_open = is_open
        self._flow = flow

    async def stats(self) -> Any:
        if not self._is_open():
            return {}
        return await self._stats()

    async def flow(self) -> Any:
        if not self._is_open() or self._flow is None:
            return None
        return await self._flow()


def observe_enqueued(observer: TaskObserver, tasks: Iterable[NewTask]) -> None:
    """Report stored tasks, one ``enqueued`` call per (queue, task name)."""
    counts = Counter((task.queue, task.name) for task in tasks)
    try:
        for (queue, name), count in counts.items():
            observer.enqueued(queue, name, count)
    except Exception:
        _logger.warning("the task observer %r failed in enqueued(); ignored", observer, exc_info=True)


def observe_started(observer: TaskObserver, record: TaskRecord) -> None:
    """Report the start of an attempt."""
    try:
        observer.started(record.queue, record.name)
    except Exception:
        _logger.warning("the task observer %r failed in started(); ignored", observer, exc_info=True)


def outcome_of(settlement: Settlement) -> AttemptOutcome | None:
    """What an attempt's verdict means for the counters; ``None`` for a release at shutdown (the attempt is
    refunded: it neither succeeded nor failed)."""
    if settlement.state is TaskState.SUCCEEDED:
        return "succeeded"
    if settlement.state is TaskState.DEAD:
        return "dead"
    if settlement.state is TaskState.CANCELLED:
        return "cancelled"
    if settlement.state is TaskState.PENDING and not settlement.refund_attempt:
        return "retried"
    return None


def observe_finished(
    observer: TaskObserver, record: TaskRecord, settlement: Settlement, started_at: float
) -> None:
    """Report how an attempt that started at ``started_at`` ended (its verdict), and the follow-up tasks
    its verdict stores (``settlement.then``) as enqueued."""
    outcome = outcome_of(settlement)
    try:
        if outcome is not None:
            seconds = max(0.0, settlement.at - started_at)  # a wall clock may step back
            observer.finished(record.queue, record.name, outcome, seconds)
    except Exception:
        _logger.warning("the task observer %r failed in finished(); ignored", observer, exc_info=True)
    if settlement.then:
        observe_enqueued(observer, settlement.then)
    for group in settlement.then_groups:
        observe_enqueued(observer, group.members)
