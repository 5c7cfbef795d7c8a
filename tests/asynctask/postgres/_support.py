"""Small helpers shared by the PostgresBackend tests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from lifecycle.asynctask import NewTask
from lifecycle.asynctask.postgres import PostgresBackend

OpenPostgres = Callable[..., Awaitable[PostgresBackend]]
"""The ``open_pg`` fixture: opens a PostgresBackend over the test's schema (keyword options pass through)."""


def make_task(
    task_id: str, *, queue: str = "default", delay: float = 0.0, at: float | None = None
) -> NewTask:
    """A task enqueued now (or at ``at``), due ``delay`` seconds later."""
    now = time.time() if at is None else at
    return NewTask(
        id=task_id,
        name="tests.job",
        queue=queue,
        payload=f"payload of {task_id}".encode(),
        max_retries=3,
        timeout=None,
        enqueued_at=now,
        run_at=now + delay,
    )
