"""Health: what :meth:`TaskManager.health` returns, for probes, the systemd watchdog and dashboards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._status import TaskKind, TaskRunState
from ._task import ManagerState, Stage

__all__ = ["Health", "TaskHealth"]


@dataclass(frozen=True, slots=True)
class TaskHealth:
    """The health of one task, a row of :attr:`Health.tasks`.

    Attributes:
        name: the name the task was added under.
        kind: ``"task"`` or ``"execute"``.
        stage: the stage it is in, or last was in (``None`` before it started).
        state: where it is within that stage (``"running"``, ``"restarting"``, ``"failed"``...).
        live: ``False`` once the task has failed for good, or is stuck in a shutdown past
            ``shutdown_timeout``; a task that ended normally, or restarts within its policy, is live.
        restarts: how many times its restart policy restarted it.
        restarting: ``True`` from a failure its policy restarts until its execute runs again (the backoff,
            and for a Task its cleanup and initialize): the manager is not ready meanwhile.
        added_while_running: ``True`` for an execute task added while the manager was running (often one
            per request): it is forgotten once it ends without error, and :class:`~lifecycle.Metrics` counts
            such tasks instead of labelling each.
    """

    name: str
    kind: TaskKind
    stage: Stage | None
    state: TaskRunState
    live: bool
    restarts: int
    restarting: bool = False
    added_while_running: bool = False


@dataclass(frozen=True, slots=True)
class Health:
    """A typed snapshot of a manager's health (:meth:`TaskManager.health`).

    Attributes:
        manager: the manager's name.
        state: the :class:`~lifecycle.ManagerState`.
        ready: ``True`` while the manager is RUNNING, every task was initialized and every execute that was
            added before the execute stage has started, no task is restarting, and shutdown has not begun.
            This is what a readiness probe (``/readyz``) reports.
        live: ``True`` unless a task has failed for good, a shutdown is stuck past ``shutdown_timeout``, or
            the manager has stopped. This is what a liveness probe (``/livez``) and the systemd watchdog
            report: not live means "restart this process".
        draining: ``True`` from the shutdown request until the manager has stopped (readiness is false the
            whole time; with ``drain_delay`` the executes keep running for that long first).
        tasks: one :class:`TaskHealth` per task, in add order.

    Example::

        health = manager.health()
        if not health.ready:
            print([t.name for t in health.tasks if t.state != "running"])
    """

    manager: str
    state: ManagerState
    ready: bool
    live: bool
    draining: bool
    tasks: tuple[TaskHealth, ...]

    def to_dict(self) -> dict[str, Any]:
        """This snapshot as JSON-ready data."""
        return {
            "manager": self.manager,
            "state": self.state.value,
            "ready": self.ready,
            "live": self.live,
            "draining": self.draining,
            "tasks": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "stage": None if t.stage is None else t.stage.value,
                    "state": t.state,
                    "live": t.live,
                    "restarts": t.restarts,
                    "restarting": t.restarting,
                    "added_while_running": t.added_while_running,
                }
                for t in self.tasks
            ],
        }
