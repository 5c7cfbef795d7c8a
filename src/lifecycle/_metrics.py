"""Prometheus metrics for a TaskManager (and its AsyncTasks), with the optional ``prometheus-client``.

This is the one module below ``lifecycle.tasks`` that knows both the core (it reads a
:class:`~lifecycle.TaskManager` through its public ``health()``, ``restart_totals()`` and ``loop_blocks``) and
``lifecycle.asynctask`` (queue depths per :class:`~lifecycle.asynctask.TaskState`); the core imports neither
it nor asynctask, and asynctask does not import it: ``AsyncTasks(metrics=...)`` takes anything with an
``async_tasks`` attribute (a :class:`Metrics`) or a ``TaskObserver`` such as :class:`AsyncTasksMetrics`.

Nothing here imports ``prometheus_client`` until a :class:`Metrics` is built, so the core runs without it.
Every :class:`Metrics` has a registry of its own unless given one: two managers in one process never share
or clash over metrics.

Manager metrics are read from the manager when scraped (a custom collector, nothing on the hot path):

- ``lifecycle_manager_ready``, ``lifecycle_manager_live``, ``lifecycle_manager_draining`` (0/1)
- ``lifecycle_manager_state{state}`` (1 for the current :class:`~lifecycle.ManagerState`, 0 for the others)
- ``lifecycle_task_state{task,state}`` (1 for each task's current state; tasks added before ``run()``
  only: execute tasks added while running, often one per request, would explode the label set)
- ``lifecycle_task_restarts_total{task}`` (restarts by a :class:`~lifecycle.Restart` policy)
- ``lifecycle_execute_tasks_running`` (execute tasks added while running that are running now)
- ``lifecycle_loop_blocks_total`` (times the event loop was blocked longer than the manager's
  ``loop_block_warning``; 0 when it is not set)

All of them carry a ``manager`` label. The durable-task metrics are in :class:`AsyncTasksMetrics`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from ._core._readiness import Health
from ._core._status import TaskRunState
from ._core._task import ManagerState
from ._redact import library_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from ._core._manager import TaskManager

__all__ = ["AsyncTasksMetrics", "Metrics", "metrics_available"]

logger = library_logger("lifecycle")

_INSTALL = "pip install 'anyio-lifecycle[metrics]'"
_TASK_STATES: tuple[TaskRunState, ...] = get_args(TaskRunState)

#: How one attempt of a durable task ended, for :meth:`AsyncTasksMetrics.finished`.
AttemptOutcome = Literal["succeeded", "retried", "dead", "cancelled"]


def metrics_available() -> bool:
    """Whether ``prometheus-client`` is installed (the ``metrics`` extra)."""
    return importlib.util.find_spec("prometheus_client") is not None


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"lifecycle metrics need prometheus-client: {_INSTALL}") from exc
    return prometheus_client


class _Stats(Protocol):
    async def stats(self) -> Any: ...


#: Why a due task waits, as ``AsyncTasks.flow()`` counts it (the ``reason`` label).
_WAITING_REASONS = ("paused", "rate_limit", "max_running", "max_running_per_key")


class _RateLimited:
    """A collector of ``lifecycle_asynctask_rate_limited_total{task}``: a total the store keeps (every
    worker's claims add to it), read at each scrape, so it is exposed as a counter family directly."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "lifecycle_asynctask_rate_limited",
            "Claims (by every worker of the store) that held back a due task for want of a rate-limit token",
            labels=["task"],
        )
        for task, total in sorted(self.totals.items()):
            family.add_metric([task], float(total))
        yield family


class _Manager(Protocol):
    """What the collector reads from a :class:`~lifecycle.TaskManager`: public methods only."""

    @property
    def name(self) -> str: ...

    def health(self) -> Health: ...

    def restart_totals(self) -> dict[str, int]: ...

    @property
    def loop_blocks(self) -> int: ...


class _ManagerCollector:
    """Reads a manager's health and restart counts at scrape time."""

    def __init__(self, manager: _Manager) -> None:
        self._manager = manager

    def describe(self) -> list[Metric]:
        return []  # collected fresh on every scrape; no up-front description, so no registration clashes

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        manager = self._manager
        name = manager.name
        health = manager.health()
        for metric, value, text in (
            ("ready", health.ready, "1 when the manager is ready (readiness probe)"),
            ("live", health.live, "1 when the manager is live (liveness probe, systemd watchdog)"),
            ("draining", health.draining, "1 from the shutdown request until the manager stopped"),
        ):
            family = GaugeMetricFamily(f"lifecycle_manager_{metric}", text, labels=["manager"])
            family.add_metric([name], 1.0 if value else 0.0)
            yield family
        states = GaugeMetricFamily(
            "lifecycle_manager_state", "1 for the manager's current state", labels=["manager", "state"]
        )
        for manager_state in ManagerState:
            states.add_metric([name, manager_state.value], 1.0 if manager_state is health.state else 0.0)
        yield states

        task_states = GaugeMetricFamily(
            "lifecycle_task_state",
            "1 for each task's current state (tasks added before run())",
            labels=["manager", "task", "state"],
        )
        restarts = CounterMetricFamily(
            "lifecycle_task_restarts",
            "Restarts of a task by its restart policy",
            labels=["manager", "task"],
        )
        running_runtime = 0
        totals = manager.restart_totals()
        for task in health.tasks:
            if task.added_while_running:
                running_runtime += task.state == "running"
                continue
            for state in _TASK_STATES:
                task_states.add_metric([name, task.name, state], 1.0 if task.state == state else 0.0)
            totals.setdefault(task.name, 0)
        for task_name, count in totals.items():
            restarts.add_metric([name, task_name], float(count))
        yield task_states
        yield restarts
        running = GaugeMetricFamily(
            "lifecycle_execute_tasks_running",
            "Execute tasks added while running that are running now",
            labels=["manager"],
        )
        running.add_metric([name], float(running_runtime))
        yield running
        blocks = CounterMetricFamily(
            "lifecycle_loop_blocks",
            "Times the event loop was blocked longer than loop_block_warning",
            labels=["manager"],
        )
        blocks.add_metric([name], float(manager.loop_blocks))
        yield blocks


class AsyncTasksMetrics:
    """Counters, run-time histograms and queue depths of durable tasks (``lifecycle.asynctask``).

    Get it from :attr:`Metrics.async_tasks` (it lives in that registry); ``AsyncTasks(metrics=metrics)``
    feeds it. The counters are fed through the observer methods :meth:`enqueued`, :meth:`started` and
    :meth:`finished` (cheap: a label lookup and an increment each), called by the AsyncTasks engine: it is a
    :class:`~lifecycle.asynctask.TaskObserver`. Queue depths are read from ``AsyncTasks.stats()`` on every
    scrape (:meth:`refresh`) of each AsyncTasks given to :meth:`track`.

    Metrics (labels ``queue`` and ``task``, the registered task name):
    ``lifecycle_asynctask_enqueued_total``, ``_started_total``, ``_succeeded_total``, ``_failed_total``
    (every failed attempt), ``_retried_total`` and ``_dead_total`` (what became of it), ``_cancelled_total``
    (running attempts stopped by ``tasks.cancel()``), the histogram ``lifecycle_asynctask_run_seconds``, and
    the gauge ``lifecycle_asynctask_queue_depth{queue,state}``. Groups: the counter
    ``lifecycle_asynctask_groups_finished_total{outcome}`` (groups that ended ``succeeded``, ``dead`` or
    ``cancelled``, counted by the worker whose verdict ended them, fed through :meth:`group_finished`).
    Flow control (read from ``AsyncTasks.flow()`` at each scrape): the gauge
    ``lifecycle_asynctask_waiting{task,reason}`` (due tasks held back, by ``reason``: ``paused``,
    ``rate_limit``, ``max_running``, ``max_running_per_key``; read from the 1000 newest pending tasks), the
    counter ``lifecycle_asynctask_rate_limited_total{task}`` (claims of every worker that found the task's
    rate limit exhausted: the starts it refused) and the gauge ``lifecycle_asynctask_queue_paused{queue}``.

    Raises ``ImportError`` naming the extra to install when ``prometheus-client`` is missing.

    Example::

        metrics = lifecycle.Metrics(manager)
        tasks = AsyncTasks(backend, metrics=metrics)  # counts into metrics.async_tasks
        metrics.async_tasks.enqueued("default", "send_mail")  # what the engine calls
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        prometheus = _prometheus()
        labels = ["queue", "task"]

        def counter(what: str, text: str) -> Any:
            return prometheus.Counter(f"lifecycle_asynctask_{what}", text, labels, registry=registry)

        self._enqueued = counter("enqueued", "Durable tasks enqueued")
        self._started = counter("started", "Attempts started")
        self._succeeded = counter("succeeded", "Attempts that succeeded")
        self._failed = counter("failed", "Attempts that failed (then retried or dead)")
        self._retried = counter("retried", "Failed attempts scheduled to run again")
        self._dead = counter("dead", "Tasks that failed for good (dead-lettered)")
        self._cancelled = counter("cancelled", "Running attempts stopped by tasks.cancel()")
        self._groups_finished = prometheus.Counter(
            "lifecycle_asynctask_groups_finished",
            "Groups of tasks that ended (succeeded, dead or cancelled)",
            ["outcome"],
            registry=registry,
        )
        self._runtime = prometheus.Histogram(
            "lifecycle_asynctask_run_seconds", "Run time of one attempt", labels, registry=registry
        )
        self._depth = prometheus.Gauge(
            "lifecycle_asynctask_queue_depth",
            "Durable tasks per queue and state (AsyncTasks.stats())",
            ["queue", "state"],
            registry=registry,
        )
        self._waiting = prometheus.Gauge(
            "lifecycle_asynctask_waiting",
            "Due durable tasks held back by flow control, by reason (AsyncTasks.flow())",
            ["task", "reason"],
            registry=registry,
        )
        self._paused = prometheus.Gauge(
            "lifecycle_asynctask_queue_paused",
            "1 for a paused queue (no worker starts its tasks), 0 otherwise",
            ["queue"],
            registry=registry,
        )
        self._rate_limited = _RateLimited()
        registry.register(self._rate_limited)
        self._waiting_names: set[str] = set()
        self._paused_queues: set[str] = set()
        self._sources: list[_Stats] = []

    def enqueued(self, queue: str, task: str, count: int = 1) -> None:
        """``count`` tasks named ``task`` were enqueued on ``queue``."""
        self._enqueued.labels(queue, task).inc(count)

    def started(self, queue: str, task: str) -> None:
        """An attempt of ``task`` started."""
        self._started.labels(queue, task).inc()

    def finished(self, queue: str, task: str, outcome: AttemptOutcome, seconds: float) -> None:
        """An attempt ended after ``seconds``: ``"succeeded"``, or failed and ``"retried"`` or ``"dead"``, or
        was stopped by ``tasks.cancel()`` (``"cancelled"``)."""
        if outcome not in ("succeeded", "retried", "dead", "cancelled"):
            raise ValueError(
                f"outcome must be 'succeeded', 'retried', 'dead' or 'cancelled', got {outcome!r}"
            )
        self._runtime.labels(queue, task).observe(seconds)
        if outcome == "succeeded":
            self._succeeded.labels(queue, task).inc()
            return
        if outcome == "cancelled":
            self._cancelled.labels(queue, task).inc()
            return
        self._failed.labels(queue, task).inc()
        (self._retried if outcome == "retried" else self._dead).labels(queue, task).inc()

    def group_finished(self, outcome: str) -> None:
        """A group of tasks ended: ``outcome`` is ``"succeeded"``, ``"dead"`` or ``"cancelled"``."""
        if outcome not in ("succeeded", "dead", "cancelled"):
            raise ValueError(f"outcome must be 'succeeded', 'dead' or 'cancelled', got {outcome!r}")
        self._groups_finished.labels(outcome).inc()

    def track(self, tasks: _Stats) -> None:
        """Report ``tasks.stats()`` (an :class:`~lifecycle.asynctask.AsyncTasks`) as queue depths."""
        self._sources.append(tasks)

    async def refresh(self) -> None:
        """Read the queue depths of every tracked AsyncTasks (called before each scrape)."""
        from .asynctask import TaskState  # here, not at the top: lifecycle.asynctask is imported on demand

        for source in self._sources:
            try:
                stats = await source.stats()
            except Exception:
                logger.warning("could not read the queue depths of %r for /metrics", source, exc_info=True)
                continue
            for queue, counts in stats.items():
                for state in TaskState:
                    self._depth.labels(queue, state.value).set(counts[state])
            flow = getattr(source, "flow", None)
            if flow is None:
                continue
            try:
                current = await flow()
            except Exception:
                logger.warning("could not read the flow control of %r for /metrics", source, exc_info=True)
                continue
            if current is None:  # the backend is closed
                continue
            self._show_flow(current, set(stats))

    def _show_flow(self, flow: Any, queues: set[str]) -> None:
        """Set the flow gauges from one ``AsyncTasks.flow()`` (names and queues seen before and gone now
        read 0, so a gauge never keeps a stale count)."""
        names = set(flow.tasks)
        for name in names | self._waiting_names:
            each = flow.tasks.get(name)
            for reason in _WAITING_REASONS:
                self._waiting.labels(name, reason).set(0 if each is None else each.waiting.get(reason, 0))
            if each is not None and each.refused is not None:
                self._rate_limited.totals[name] = each.refused
        self._waiting_names |= names
        paused = set(flow.paused)
        for queue in queues | paused | self._paused_queues:
            self._paused.labels(queue).set(1 if queue in paused else 0)
        self._paused_queues |= paused


class Metrics:
    """The Prometheus metrics of one manager, in a registry served by :class:`~lifecycle.tasks.HealthServer`.

    Args:
        manager: the manager whose state, readiness and restarts are reported.
        registry: a ``prometheus_client.CollectorRegistry`` to add them to (the global ``REGISTRY`` to
            serve process metrics too); by default a new registry of its own.

    Raises ``ImportError`` naming the extra to install when ``prometheus-client`` is missing.

    Example::

        metrics = lifecycle.Metrics(manager)
        manager.add_task("health", HealthServer(manager, port=8080, metrics=metrics))
    """

    def __init__(self, manager: TaskManager, *, registry: CollectorRegistry | None = None) -> None:
        prometheus = _prometheus()
        if registry is None:
            registry = prometheus.CollectorRegistry()
        self.registry: CollectorRegistry = registry
        self.registry.register(_ManagerCollector(manager))
        self._async_tasks: AsyncTasksMetrics | None = None

    @property
    def async_tasks(self) -> AsyncTasksMetrics:
        """The durable-task metrics in this registry (created on first use)."""
        if self._async_tasks is None:
            self._async_tasks = AsyncTasksMetrics(self.registry)
        return self._async_tasks

    async def exposition(self) -> tuple[bytes, str]:
        """Refresh what is read asynchronously, then render the registry: ``(body, content_type)``."""
        prometheus = _prometheus()
        if self._async_tasks is not None:
            await self._async_tasks.refresh()
        body: bytes = prometheus.generate_latest(self.registry)
        return body, str(prometheus.CONTENT_TYPE_LATEST)
