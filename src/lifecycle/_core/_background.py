"""The task group that lives as long as ``TaskManager.run()``: for work that must outlast one stage.

A task whose ``initialize`` starts something that has to keep going through ``execute`` and ``cleanup`` (the
:class:`~lifecycle.tasks.HealthServer` answers probes while the other tasks start and while the manager
drains) starts it here. It is reachable through a context variable set by the running ``run()``, so it is
the group of the nearest running manager, a nested manager's tasks included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from anyio.abc import TaskGroup

__all__ = ["background_group", "current_background"]

_CURRENT: ContextVar[TaskGroup | None] = ContextVar("lifecycle_background", default=None)


def current_background() -> TaskGroup | None:
    """The background task group of the ``TaskManager.run()`` running in this context, or ``None``."""
    return _CURRENT.get()


@contextmanager
def background_group(group: TaskGroup) -> Iterator[None]:
    """Make ``group`` the background group of this context until the block ends."""
    token = _CURRENT.set(group)
    try:
        yield
    finally:
        _CURRENT.reset(token)
