"""The shapes of work a :class:`~lifecycle.TaskManager` runs, and the enums that describe them."""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

__all__ = ["ExecuteTask", "ManagerState", "Stage", "Task", "TaskType"]


@runtime_checkable
class Task(Protocol):
    """A long-lived part of a service with three stages.

    ``initialize`` acquires what the task needs (connections, files, ports). Tasks are initialized one at a
    time, in the order they were added. ``execute`` does the work; every task executes concurrently with
    the others until the manager shuts down (which cancels ``execute``). ``cleanup`` releases what
    ``initialize`` took; cleanups run in reverse order, each shielded from the cancellation that stopped
    ``execute``.

    A failing ``initialize`` must release what it already took before raising: ``cleanup`` only runs for
    tasks whose ``initialize`` completed.

    Example::

        class Database:
            async def initialize(self) -> None:
                self.pool = await connect()

            async def execute(self) -> None:
                await anyio.sleep_forever()

            async def cleanup(self) -> None:
                await self.pool.close()
    """

    async def initialize(self) -> None:
        """Acquire what the task needs; a failure must release what was already taken before raising."""
        ...

    async def execute(self) -> None:
        """Do the work until cancelled (shutdown), or return; what returning means is the task's type."""
        ...

    async def cleanup(self) -> None:
        """Release what ``initialize`` took; runs shielded from the cancellation that stopped ``execute``."""
        ...


@runtime_checkable
class ExecuteTask(Protocol):
    """Work that has only an execute stage; it can be added before or while the manager runs.

    A plain ``async def`` function taking no arguments is accepted wherever an ``ExecuteTask`` is.
    """

    async def execute(self) -> None:
        """Do the work until cancelled (shutdown, or the task's handle), or return."""
        ...


class TaskType(enum.Enum):
    """What the end of a task's ``execute`` means to the manager.

    - ``STRICT``: returning before shutdown is an error (:class:`~lifecycle.UnexpectedStopError`) and stops
      everything; raising stops everything.
    - ``ERROR``: returning early is fine; raising stops everything.
    - ``STOP_GROUP``: when every STOP_GROUP task has returned, the manager shuts down gracefully with no
      error; raising stops everything.
    """

    STRICT = "strict"
    ERROR = "error"
    STOP_GROUP = "stop_group"


class Stage(enum.Enum):
    """The stage of a task's life in which something happened."""

    INITIALIZE = "initialize"
    EXECUTE = "execute"
    CLEANUP = "cleanup"


class ManagerState(enum.Enum):
    """The states of a :class:`~lifecycle.TaskManager`, in the only order it moves through them."""

    NEW = "new"
    INITIALIZING = "initializing"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
