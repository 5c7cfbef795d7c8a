"""`lifecycle.asynctask.__all__` is exactly the documented public API, and each name has a docstring."""

from __future__ import annotations

import inspect
import pickle
import traceback

import anyio

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


def test_public_exceptions_name_their_public_module() -> None:
    errors = [
        getattr(lifecycle.asynctask, name)
        for name in lifecycle.asynctask.__all__
        if isinstance(getattr(lifecycle.asynctask, name), type)
        and issubclass(getattr(lifecycle.asynctask, name), BaseException)
    ]
    assert {error.__name__ for error in errors} == {
        "Abort",
        "BackendError",
        "DuplicateTaskError",
        "Retry",
        "WorkerLostError",
    }
    for error in errors:
        assert error.__module__ == "lifecycle.asynctask", error
        instance = error(reason="x") if error is lifecycle.asynctask.Retry else error("x")
        text = "".join(traceback.format_exception_only(instance))
        assert text.startswith(f"lifecycle.asynctask.{error.__name__}: "), text
        assert pickle.loads(pickle.dumps(error)) is error, "pickled by its public path"


async def test_a_dead_tasks_error_names_the_public_exception_path() -> None:
    tasks = lifecycle.asynctask.AsyncTasks(lifecycle.asynctask.MemoryBackend(), poll_interval=0.05)

    @tasks.register(name="aborts")
    async def aborts() -> None:
        raise lifecycle.asynctask.Abort("order 7 does not exist")

    async with tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.execute)
        info = await tasks.wait(await tasks.enqueue(aborts), timeout=10)
        group.cancel_scope.cancel()
    assert info.last_error is not None
    assert "lifecycle.asynctask.Abort: order 7 does not exist" in info.last_error
    assert "_model" not in info.last_error
