"""`lifecycle.asynctask.__all__` is exactly the documented public API, and each name has a docstring."""

from __future__ import annotations

import inspect

import lifecycle.asynctask

DOCUMENTED = (
    "Abort",
    "AsyncTasks",
    "Backend",
    "BackendError",
    "Call",
    "ChainInfo",
    "ChainStep",
    "ClaimedTask",
    "DuplicateTaskError",
    "Encoding",
    "JSONEncoding",
    "ManualClock",
    "MemoryBackend",
    "NewTask",
    "PickleEncoding",
    "QueueStats",
    "Retry",
    "SQLiteBackend",
    "ScheduleInfo",
    "Settlement",
    "TaskContext",
    "TaskInfo",
    "TaskObserver",
    "TaskRecord",
    "TaskState",
    "TransactionalBackend",
    "WorkerLostError",
    "backend_from_url",
)


def test_all_is_exactly_the_documented_api() -> None:
    assert sorted(lifecycle.asynctask.__all__) == sorted(DOCUMENTED)
    assert isinstance(lifecycle.asynctask.__all__, tuple)


def test_every_public_name_has_a_docstring() -> None:
    for name in lifecycle.asynctask.__all__:
        assert inspect.getdoc(getattr(lifecycle.asynctask, name)), f"{name} has no docstring"


def test_the_issue_api_methods_exist_on_async_tasks() -> None:
    methods = (
        "register", "enqueue", "enqueue_many", "info", "cancel", "stats", "list", "requeue",
        "requeue_dead", "purge", "schedule", "every", "enqueue_chain", "initialize", "execute", "cleanup",
    )  # fmt: skip
    for method in methods:
        assert callable(getattr(lifecycle.asynctask.AsyncTasks, method)), method


def test_server_backends_are_importable_from_their_modules() -> None:
    from lifecycle.asynctask.postgres import PostgresBackend
    from lifecycle.asynctask.redis import RedisBackend

    assert inspect.getdoc(RedisBackend)
    assert inspect.getdoc(PostgresBackend)
