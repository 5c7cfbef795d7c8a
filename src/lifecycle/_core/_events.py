"""Lifecycle events: what the manager reports to ``on_event`` and to the ``lifecycle`` logger."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._redact import library_logger
from ._task import ManagerState, Stage, TaskType

__all__ = ["EventKind", "LifecycleEvent"]

logger = library_logger("lifecycle")


class EventKind(str, enum.Enum):
    """What a :class:`LifecycleEvent` reports. The values are stable strings, handy in logs and metrics."""

    #: The manager moved to a new :class:`~lifecycle.ManagerState` (``event.state``).
    STATE_CHANGED = "state_changed"
    #: Shutdown began; ``event.detail`` says why (``shutdown()`` called, a task failed, STOP_GROUP done...).
    SHUTDOWN_REQUESTED = "shutdown_requested"
    #: ``shutdown_timeout`` passed with tasks still running; ``event.detail`` is the stuck-shutdown report.
    SHUTDOWN_STUCK = "shutdown_stuck"
    TASK_INITIALIZING = "task_initializing"
    TASK_INITIALIZED = "task_initialized"
    TASK_EXECUTING = "task_executing"
    #: ``execute`` returned (on its own or after shutdown was requested).
    TASK_RETURNED = "task_returned"
    #: ``execute`` was cancelled (shutdown, or its handle's ``cancel()``); not an error.
    TASK_CANCELLED = "task_cancelled"
    TASK_CLEANING_UP = "task_cleaning_up"
    TASK_CLEANED_UP = "task_cleaned_up"
    #: A stage failed; ``event.error`` is the :class:`~lifecycle.TaskError`.
    TASK_FAILED = "task_failed"
    #: A task's execute ended (``event.error``: the failure as a :class:`~lifecycle.TaskError`, or ``None``
    #: for a return under ``Restart(mode="always")``) and its restart policy runs it again after a backoff;
    #: ``event.duration`` is that backoff, ``event.detail`` says which restart it is. Logged at WARNING.
    TASK_RESTARTING = "task_restarting"
    #: The manager became ready: every task initialized and every execute started (again, after a restart).
    READY = "ready"
    #: The manager stopped being ready while running (a task is restarting); ``event.detail`` says why.
    NOT_READY = "not_ready"
    #: Shutdown began with a ``drain_delay``: readiness is false, executes keep running until ``DRAINED``.
    DRAINING = "draining"
    #: The drain delay is over: the executes are cancelled next, then the cleanups run.
    DRAINED = "drained"


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One step in the life of a manager or of one of its tasks.

    Attributes:
        kind: what happened (:class:`EventKind`).
        manager: the manager's name.
        time: wall-clock time of the event (``time.time()``), for display.
        task_name: the task it is about, or ``None`` for manager-level events.
        task_type: that task's type, or ``None``.
        stage: the stage it is about, or ``None``.
        duration: for the end of a stage, how long the stage took in seconds (monotonic clock).
        error: for ``TASK_FAILED``, the :class:`~lifecycle.TaskError` (its ``__cause__`` is the original).
        state: for ``STATE_CHANGED``, the new state.
        detail: a human-readable detail (shutdown reason, stuck-shutdown report).
    """

    kind: EventKind
    manager: str
    time: float
    task_name: str | None = None
    task_type: TaskType | None = None
    stage: Stage | None = None
    duration: float | None = None
    error: BaseException | None = None
    state: ManagerState | None = None
    detail: str | None = None


_VERBS = {
    EventKind.TASK_INITIALIZING: "initializing",
    EventKind.TASK_INITIALIZED: "initialized",
    EventKind.TASK_EXECUTING: "executing",
    EventKind.TASK_RETURNED: "returned",
    EventKind.TASK_CANCELLED: "cancelled",
    EventKind.TASK_CLEANING_UP: "cleaning up",
    EventKind.TASK_CLEANED_UP: "cleaned up",
    EventKind.TASK_FAILED: "failed",
}

_READINESS = frozenset({EventKind.READY, EventKind.NOT_READY, EventKind.DRAINING, EventKind.DRAINED})

Listener = Callable[[LifecycleEvent], None]


class EventSink:
    """Delivers events to ``on_event``, internal listeners and the logger, cheaply when nobody listens.

    When there is no callback and the logger is not enabled for the event's level, no event object and no
    log record is built: hot-added execute tasks cost nothing extra in the default configuration.
    """

    __slots__ = ("_callbacks", "_manager", "_watchers")

    def __init__(self, manager: str, on_event: Listener | None) -> None:
        self._manager = manager
        self._callbacks: tuple[Listener, ...] = () if on_event is None else (on_event,)
        # Listeners that skip the per-stage step events (systemd notifications): they cost nothing per
        # hot-added execute task.
        self._watchers: tuple[Listener, ...] = ()

    def add_listener(self, listener: Listener, *, steps: bool = True) -> None:
        """Also deliver every event to ``listener`` (used by :func:`lifecycle.run`). With ``steps=False`` no
        event is built just for it for the per-stage steps (guarded by :meth:`wants`): it surely gets the
        manager-level events, failures and restarts, and the steps only when somebody else wants them."""
        if steps:
            self._callbacks = (*self._callbacks, listener)
        else:
            self._watchers = (*self._watchers, listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop delivering events to ``listener`` (no-op when it is not registered)."""
        self._callbacks = tuple(c for c in self._callbacks if c is not listener)
        self._watchers = tuple(c for c in self._watchers if c is not listener)

    def wants(self, level: int) -> bool:
        """Whether a stage-step event at ``level`` would reach anybody."""
        return bool(self._callbacks) or logger.isEnabledFor(level)

    def emit(
        self,
        kind: EventKind,
        level: int = logging.INFO,
        *,
        task_name: str | None = None,
        task_type: TaskType | None = None,
        stage: Stage | None = None,
        duration: float | None = None,
        error: BaseException | None = None,
        state: ManagerState | None = None,
        detail: str | None = None,
    ) -> None:
        """Build the event and deliver it; a callback that raises is logged, never propagated."""
        logged = logger.isEnabledFor(level)
        if not logged and not self._callbacks and not self._watchers:
            return
        event = LifecycleEvent(
            kind, self._manager, time.time(), task_name, task_type, stage, duration, error, state, detail
        )
        if logged:
            _log(event, level)
        for callback in (*self._callbacks, *self._watchers) if self._watchers else self._callbacks:
            try:
                callback(event)
            except Exception:
                logger.exception(
                    "%s: the on_event callback %r raised while handling %s; the manager goes on",
                    self._manager,
                    callback,
                    event.kind.value,
                )


def _log(event: LifecycleEvent, level: int) -> None:
    if event.task_name is None:
        if event.kind is EventKind.SHUTDOWN_STUCK:  # the report names the manager itself
            logger.log(level, "%s", event.detail)
            return
        text = event.state.value if event.state is not None else (event.detail or event.kind.value)
        if event.kind in _READINESS and event.detail:
            text = f"{event.kind.value.replace('_', ' ')}: {event.detail}"
        logger.log(level, "%s: %s", event.manager, text)
        return
    if event.kind is EventKind.TASK_RESTARTING:
        cause = None if event.error is None else (event.error.__cause__ or event.error)
        logger.log(
            level,
            "%s: task %r %s: %s",
            event.manager,
            event.task_name,
            "failed" if cause is not None else "returned",
            event.detail,
            exc_info=None if cause is None else (type(cause), cause, cause.__traceback__),
        )
        return
    timing = "" if event.duration is None else f" after {event.duration:.3f} s"
    if event.kind is EventKind.TASK_FAILED and event.error is not None:
        cause = event.error.__cause__ or event.error
        stage = event.stage.value if event.stage is not None else "?"
        logger.log(
            level,
            "%s: task %r failed in %s%s: %r",
            event.manager,
            event.task_name,
            stage,
            timing,
            cause,
            exc_info=(type(cause), cause, cause.__traceback__),
        )
        return
    timing = "" if event.duration is None else f" in {event.duration:.3f} s"
    if event.detail:
        logger.log(level, "%s: task %r %s", event.manager, event.task_name, event.detail)
        return
    logger.log(level, "%s: task %r %s%s", event.manager, event.task_name, _VERBS[event.kind], timing)
