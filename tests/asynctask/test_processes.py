"""Worker processes on one shared backend: exactly-once without crashes, kill -9, SIGTERM, corrupt rows.

Each test starts real worker processes (``procs/worker.py``) and synchronises only on the JSON lines they
print. The backend is a parameter (``backend_url``): SQLite here; server backends add their URL to
``BACKENDS``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import AsyncTasks, Call, TaskRecord, TaskState, backend_from_url
from tests.asynctask.postgres.procs_url import postgres_url
from tests.asynctask.procs import Workers, read_runs

pytestmark = pytest.mark.slow


def _sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'tasks.db'}"


def _redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    base = str(request.getfixturevalue("redis_url"))  # skips (or fails when required) if Redis is down
    url = f"{base}?prefix=procs-{uuid.uuid4().hex[:12]}"
    yield url

    async def clear() -> None:
        backend = backend_from_url(url)
        await backend.open()
        try:
            await backend.clear()  # type: ignore[attr-defined]  # RedisBackend only
        finally:
            await backend.close()

    anyio.run(clear)


def _nats_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    base = str(request.getfixturevalue("nats_url"))  # skips (or fails when required) if NATS is down
    prefix = f"procs-{uuid.uuid4().hex[:12]}"
    yield f"{base}?prefix={prefix}"
    from tests.asynctask.nats.nats_servers import delete_streams

    anyio.run(delete_streams, base, prefix)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Iterator[str]]] = {
    "sqlite": _sqlite_url,
    "postgres": postgres_url,
    "redis": _redis_url,
    "nats": _nats_url,
}
"""Backend name -> generator fixture body yielding a fresh, empty URL (and cleaning up after the test)."""

# Which async library each worker of a multi-worker test runs on, per backend (server backends: asyncio).
WORKER_LIBRARIES: dict[str, Sequence[str]] = {
    "sqlite": ("asyncio", "trio", "asyncio"),
    "postgres": ("asyncio",) * 3,  # the server backends are asyncio-only
    "redis": ("asyncio",) * 3,
    "nats": ("asyncio",) * 3,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def backend_url(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to fresh, empty storage of the backend under test."""
    yield from BACKENDS[backend_name](request, tmp_path)


def enqueue(url: str, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[str]:
    """Enqueue ``(registered name, args)`` calls by name through an enqueue-only AsyncTasks."""

    async def main() -> list[str]:
        tasks = AsyncTasks(backend_from_url(url), execution=False)
        await tasks.initialize()
        try:
            return await tasks.enqueue_many([Call(name, *args) for name, args in calls])
        finally:
            await tasks.cleanup()

    return anyio.run(main)


def records(url: str) -> dict[str, TaskRecord]:
    """Every stored record by id, read straight from the backend."""

    async def main() -> dict[str, TaskRecord]:
        backend = backend_from_url(url)
        await backend.open()
        try:
            return {record.id: record for record in await backend.list_records(limit=100_000)}
        finally:
            await backend.close()

    return anyio.run(main)


def wait_for_records(
    url: str, condition: Callable[[list[TaskRecord]], bool], *, timeout: float = 60.0
) -> list[TaskRecord]:
    """Poll the durable store until ``condition`` holds for its records (the store is the truth here)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = list(records(url).values())
        if condition(stored):
            return stored
        if time.monotonic() > deadline:
            states = Counter(record.state.value for record in stored)
            raise AssertionError(f"timed out after {timeout}s; states: {dict(states)}")
        time.sleep(0.05)


def test_several_workers_run_every_task_exactly_once(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    count = 300
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        libraries = WORKER_LIBRARIES.get(backend_name, ("asyncio",) * 3)
        workers.wait_ready([workers.start(concurrency=8, backend=library) for library in libraries])
        ids = enqueue(backend_url, [("procs.slow", (f"k{i}", 0.005)) for i in range(count)])
        workers.wait_until(lambda seen: len(workers.keys_ran()) == count, what=f"all {count} tasks ran")
        assert workers.stop_all() == {w.name: 0 for w in workers.workers}

    runs = read_runs(out)
    counts = Counter(key for key, _, _ in runs)
    assert counts == Counter({f"k{i}": 1 for i in range(count)}), "every task must run exactly once"
    assert len({pid for _, _, pid in runs}) >= 2, "the work should have been shared between processes"
    stored = records(backend_url)
    assert {stored[i].state for i in ids} == {TaskState.SUCCEEDED}
    assert {stored[i].attempts for i in ids} == {1}


def test_a_killed_worker_loses_nothing_and_its_attempt_counts(backend_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        # A 0.1 s first retry backoff (AsyncTasks' default is 1 s): the retries wait less, the test proves
        # the same.
        quick_retry = ["--retry-backoff", "0.1"]
        victim = workers.start("victim", lease=1.0, concurrency=4, extra=quick_retry)
        workers.wait_for("ready", worker="victim")
        [doomed_id, *other_ids] = enqueue(
            backend_url,
            [("procs.hang_first", ("doomed",)), *(("procs.record", (f"k{i}",)) for i in range(40))],
        )
        workers.wait_for("started", key="doomed", worker="victim")
        victim.kill()  # kill -9 while "doomed" runs (and perhaps with unsettled results of others)

        workers.start("rescuer", lease=1.0, extra=quick_retry)
        expected = {"doomed", *(f"k{i}" for i in range(40))}
        workers.wait_until(lambda seen: workers.keys_ran() >= expected, what="every task ran")
        # Tasks the victim ran but never settled are run again by the rescuer after a retry backoff.
        wait_for_records(backend_url, lambda stored: all(r.state is TaskState.SUCCEEDED for r in stored))
        assert workers.stop_all()["rescuer"] == 0

    stored = records(backend_url)
    doomed = stored[doomed_id]
    assert doomed.state is TaskState.SUCCEEDED
    assert doomed.attempts == 2, "the attempt of the killed worker must be counted"
    assert doomed.last_error is not None, "the lost attempt should leave its reason"
    assert {stored[i].state for i in other_ids} == {TaskState.SUCCEEDED}

    runs = read_runs(out)
    counts = Counter(key for key, _, _ in runs)
    assert counts["doomed"] == 1
    assert [pid for key, _, pid in runs if key == "doomed"] == [workers.workers[1].pid]
    for key, runs_of_key in counts.items():
        if runs_of_key > 1:  # at-least-once: only a task whose result died with the victim runs again
            pids = [pid for k, _, pid in runs if k == key]
            assert victim.pid in pids, f"{key} ran {runs_of_key} times without a killed worker"
            assert runs_of_key == 2


def test_sigterm_returns_in_flight_tasks_to_pending_without_an_attempt(
    backend_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        victim = workers.start("victim", shutdown_grace=0.2)
        workers.wait_for("ready", worker="victim")
        [stuck_id] = enqueue(backend_url, [("procs.hang_first", ("stuck",))])
        workers.wait_for("started", key="stuck", worker="victim")
        victim.terminate()
        assert victim.wait() == 0

        stuck = records(backend_url)[stuck_id]
        assert stuck.state is TaskState.PENDING, "a task cancelled at shutdown must go back to pending"
        assert stuck.attempts == 0, "an attempt cut short by shutdown must not count"

        workers.start("next")
        workers.wait_for("ran", key="stuck", worker="next")
        assert workers.stop_all()["next"] == 0

    stuck = records(backend_url)[stuck_id]
    assert (stuck.state, stuck.attempts) == (TaskState.SUCCEEDED, 1)
    assert [key for key, _, _ in read_runs(out)] == ["stuck"]


def test_sigterm_lets_in_flight_tasks_finish_within_the_grace_period(
    backend_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        worker = workers.start(shutdown_grace=30.0)
        workers.wait_for("ready", worker=worker.name)
        [task_id] = enqueue(backend_url, [("procs.slow", ("quick", 0.5))])
        workers.wait_for("started", key="quick")
        worker.terminate()
        workers.wait_for("ran", key="quick")
        assert worker.wait() == 0

    task = records(backend_url)[task_id]
    assert (task.state, task.attempts) == (TaskState.SUCCEEDED, 1)
    assert [key for key, _, _ in read_runs(out)] == ["quick"]


@pytest.mark.parametrize("backend_name", ["sqlite"])  # writes into the SQLite file itself
def test_a_corrupt_payload_row_goes_dead_and_nothing_else_is_lost(backend_url: str, tmp_path: Path) -> None:
    db = backend_url.removeprefix("sqlite:///")
    records(backend_url)  # opening the backend creates the schema (an enqueue-only AsyncTasks would not)
    now = time.time()
    # written by hand, claimed first (earliest run_at)
    with closing(sqlite3.connect(db, isolation_level=None)) as raw:
        raw.execute(
            "INSERT INTO lifecycle_tasks (id, name, queue, payload, state, max_retries, enqueued_at, run_at) "
            "VALUES ('corrupt', 'procs.record', 'default', ?, 'pending', 5, ?, ?)",
            (b"\xff\xfe{not an encoded argument list", now - 10, now - 10),
        )
    ids = enqueue(backend_url, [("procs.record", (f"k{i}",)) for i in range(10)])
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        worker = workers.start(concurrency=1)
        expected = {f"k{i}" for i in range(10)}
        workers.wait_until(lambda seen: workers.keys_ran() >= expected, what="the good tasks ran")
        assert workers.stop_all() == {worker.name: 0}

    stored = records(backend_url)
    corrupt = stored["corrupt"]
    assert corrupt.state is TaskState.DEAD, "an undecodable payload must go dead at once"
    assert corrupt.attempts == 1
    assert corrupt.last_error
    assert "decode" in corrupt.last_error.lower()
    assert {stored[i].state for i in ids} == {TaskState.SUCCEEDED}
    assert Counter(key for key, _, _ in read_runs(out)) == Counter({f"k{i}": 1 for i in range(10)})


_OPEN_AND_COUNT = """
import sys, anyio
from lifecycle.asynctask import backend_from_url

async def main():
    backend = backend_from_url(sys.argv[1])
    await backend.open()
    print(sum(sum(states.values()) for states in (await backend.stats()).values()))
    await backend.close()

anyio.run(main)
"""


@pytest.mark.parametrize("backend_name", ["sqlite"])  # creating the file's schema is SQLite's own business
def test_processes_opening_a_fresh_file_at_once_all_succeed(backend_url: str) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_COUNT, backend_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["0"] * 6


def test_a_schedule_run_by_several_processes_fires_once_per_fire_time(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    # Fire times that pass while every process is held up coalesce by design, so the interval leaves room
    # for a loaded machine (two test runs on 2 cores): 0.1 s once lost a fire time on PostgreSQL.
    interval, wanted = 0.3, 8
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        for library in WORKER_LIBRARIES.get(backend_name, ("asyncio",) * 3):
            # Every process declares and drives the same schedule: there is no leader.
            worker = workers.start(backend=library, extra=("--every", str(interval)))
            workers.wait_for("ready", worker=worker.name)
        workers.wait_until(
            lambda seen: sum(key.startswith("schedule:tick:") for key in workers.keys_ran()) >= wanted,
            what=f"{wanted} fire times ran",
        )
        assert workers.stop_all() == {w.name: 0 for w in workers.workers}

    runs = Counter(key for key, _, _ in read_runs(out))
    assert len(runs) >= wanted
    assert set(runs.values()) == {1}, f"a fire time ran more than once: {runs.most_common(3)}"
    fires = sorted(  # the fire time is in the deterministic id: schedule:<name>:<UTC ISO time>Z
        datetime.fromisoformat(record.id.removeprefix("schedule:tick:").replace("Z", "+00:00")).timestamp()
        for record in records(backend_url).values()
        if record.id.startswith("schedule:tick:")
    )
    steps = [round((later - earlier) / interval, 3) for earlier, later in pairwise(fires)]
    assert set(steps) == {1.0}, "every fire time between the first and the last is stored exactly once"
