"""Looking at tasks never creates storage (SQLite here; Redis and PostgreSQL in their own directories).

``open(create=False)`` refuses a missing store with a message naming it; ``open(create="on_enqueue")`` (what
``AsyncTasks(..., execution=False)`` uses) sees no tasks and creates nothing until the first enqueue; a
backend whose ``open`` takes no ``create`` is opened as before.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from lifecycle.asynctask import AsyncTasks, BackendError, MemoryBackend, NewTask, SQLiteBackend, TaskState
from lifecycle.asynctask._backend import open_backend, opens_without_creating

pytestmark = pytest.mark.anyio


def _task(task_id: str) -> NewTask:
    now = time.time()
    return NewTask(
        id=task_id,
        name="tests.job",
        queue="default",
        payload=b"[]",
        max_retries=0,
        timeout=None,
        enqueued_at=now,
        run_at=now + 3600,
    )


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def _read_everything(backend: SQLiteBackend) -> None:
    """Every inspection and operator call, on a store that does not exist: nothing found, nothing changed."""
    assert await backend.get("nope") is None
    assert await backend.list_records() == []
    assert await backend.stats() == {}
    assert await backend.cancel(["nope"], now=time.time()) == []
    assert await backend.requeue(["nope"], now=time.time()) == 0
    assert await backend.requeue(None, now=time.time()) == 0
    assert await backend.purge(states=[TaskState.DEAD]) == 0


async def test_open_without_create_refuses_a_missing_file_and_creates_nothing(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "typo.db")
    with pytest.raises(BackendError, match=r"no SQLite task database at .*typo\.db.*no such file"):
        await backend.open(create=False)
    assert _files(tmp_path) == []
    await backend.close()


async def test_open_without_create_refuses_a_database_without_task_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE mine (a)")
    connection.close()
    backend = SQLiteBackend(path)
    with pytest.raises(BackendError, match=r"other\.db' holds no task tables"):
        await backend.open(create=False)
    with sqlite3.connect(path) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    connection.close()
    assert tables == ["mine"]


async def test_open_without_create_uses_an_existing_store(tmp_path: Path) -> None:
    writer = SQLiteBackend(tmp_path / "tasks.db")
    await writer.open()
    await writer.enqueue_many([_task("a")])
    await writer.close()
    reader = SQLiteBackend(tmp_path / "tasks.db")
    await reader.open(create=False)
    try:
        assert await reader.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await reader.close()


async def test_on_enqueue_sees_no_tasks_and_creates_the_store_at_the_first_enqueue(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "tasks.db")
    await backend.open(create="on_enqueue")
    await backend.open(create="on_enqueue")  # idempotent, as open() is
    try:
        await _read_everything(backend)
        assert _files(tmp_path) == []
        assert await backend.enqueue_many([_task("a")]) == ["a"]
        assert "tasks.db" in _files(tmp_path)
        assert await backend.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await backend.close()


async def test_on_enqueue_refuses_a_directory_that_does_not_exist_at_open(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"its directory .* does not exist"):
        await SQLiteBackend(tmp_path / "no-such-dir" / "tasks.db").open(create="on_enqueue")
    assert _files(tmp_path) == []


async def test_on_enqueue_finds_a_store_another_process_created_meanwhile(tmp_path: Path) -> None:
    producer = SQLiteBackend(tmp_path / "tasks.db")
    await producer.open(create="on_enqueue")
    try:
        assert await producer.stats() == {}
        worker = SQLiteBackend(tmp_path / "tasks.db")
        await worker.open()
        await worker.enqueue_many([_task("from-worker")])
        await worker.close()
        record = await producer.get("from-worker")
        assert record is not None
        assert record.state is TaskState.PENDING
        assert await producer.cancel(["from-worker"], now=time.time()) == ["from-worker"]
    finally:
        await producer.close()


async def test_create_must_be_true_false_or_on_enqueue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='create must be True, False or "on_enqueue"'):
        await SQLiteBackend(tmp_path / "tasks.db").open(create="lazily")  # type: ignore[arg-type]
    assert _files(tmp_path) == []


async def test_memory_path_is_always_created(tmp_path: Path) -> None:
    backend = SQLiteBackend(":memory:")
    await backend.open(create=False)
    try:
        assert await backend.stats() == {}
    finally:
        await backend.close()


async def test_an_enqueue_only_asynctasks_inspects_without_creating_and_creates_on_enqueue(
    tmp_path: Path,
) -> None:
    tasks = AsyncTasks(SQLiteBackend(tmp_path / "tasks.db"), execution=False)

    @tasks.register(name="tests.job")
    async def job() -> None: ...

    async with tasks:
        assert await tasks.stats() == {}
        assert await tasks.list() == []
        assert await tasks.info("nope") is None
        assert await tasks.cancel("nope") is False
        assert await tasks.requeue_dead() == 0
        assert await tasks.purge("dead") == 0
        assert _files(tmp_path) == []
        task_id = await tasks.enqueue(job)
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.PENDING
    # A worker started later finds the task the producer stored.
    worker = SQLiteBackend(tmp_path / "tasks.db")
    await worker.open(create=False)
    try:
        assert await worker.get(task_id) is not None
    finally:
        await worker.close()


async def test_an_executing_asynctasks_creates_its_store_at_start(tmp_path: Path) -> None:
    async with AsyncTasks(SQLiteBackend(tmp_path / "tasks.db")):
        assert "tasks.db" in _files(tmp_path)


class _PlainOpen(MemoryBackend):
    """A third-party backend whose open() takes no argument."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    async def open(self) -> None:
        self.opened += 1
        await super().open()


async def test_a_backend_whose_open_takes_no_create_is_opened_as_before() -> None:
    backend = _PlainOpen()
    assert not opens_without_creating(backend)
    assert opens_without_creating(SQLiteBackend(":memory:"))
    await open_backend(backend, create=False)
    assert backend.opened == 1
    plain = _PlainOpen()
    async with AsyncTasks(plain, execution=False) as tasks:
        assert await tasks.stats() == {}
    assert plain.opened == 1
