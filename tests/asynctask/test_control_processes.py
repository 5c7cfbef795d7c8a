"""Control of running work across processes: real worker processes (``procs/worker.py --control``) on one
store, driven from this process.

- a task running in another worker process is cancelled: it stops within 1 s (the latency is measured from
  the ``cancel()`` call to the task's own ``stopped`` line, and printed), ends ``cancelled`` and never runs
  again; for an ``async def`` task and a plain ``def`` one;
- a 200-member group with a ``then``, run by 3 worker processes, one of them ``kill -9``-ed twice during the
  run (and started again): ``then`` runs exactly once, with the 200 results in call order;
- ``wait()`` in this process wakes after a worker process saved the verdict: within ``poll_interval`` on a
  backend that polls (SQLite), within milliseconds on one that pushes notices (p50/p99 printed).

Parametrised by backend URL as ``test_processes.py`` is; a backend without control of running work yet is
skipped. Run with ``-s`` to see the measured latencies.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from lifecycle.asynctask import AsyncTasks, Call, NotifyingBackend, TaskState, backend_from_url
from lifecycle.asynctask._backend import supports_control
from tests.asynctask.procs import Event, Workers, read_runs
from tests.asynctask.test_processes import BACKENDS, WORKER_LIBRARIES

pytestmark = pytest.mark.slow

POLL = 0.25
"""The waiter's poll interval in the wait() test (what bounds a polling backend's wake-up)."""


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def backend_url(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to fresh, empty storage of the backend under test; skipped without control of running work."""
    for url in BACKENDS[backend_name](request, tmp_path):
        if not supports_control(backend_from_url(url)):
            pytest.skip(f"{type(backend_from_url(url)).__name__} has no control of running work yet")
        yield url


def members_ran(workers: Workers, count: int) -> Callable[[list[Event]], bool]:
    """A condition for ``Workers.wait_until``: ``count`` different keys ran."""
    return lambda seen: len(workers.keys_ran()) >= count


def pushes(url: str) -> bool:
    """Whether the backend pushes notices (the 50 ms promises apply) or polls."""
    return isinstance(backend_from_url(url), NotifyingBackend)


@pytest.mark.parametrize("function", ["procs.endless", "procs.endless_def"])
def test_a_task_running_in_another_process_is_cancelled_within_a_second_and_never_retried(
    backend_name: str, backend_url: str, tmp_path: Path, function: str
) -> None:
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        # The default poll interval of a worker (1 s): the cancel requests are read every 0.5 s.
        worker = workers.start(extra=["--control"], poll_interval=1.0, concurrency=2, lease=10.0)
        workers.wait_for("ready", worker=worker.name)

        async def scenario() -> tuple[float, float, int, TaskState]:
            tasks = AsyncTasks(backend_from_url(backend_url), execution=False)
            async with tasks:
                task_id = await tasks.enqueue(function, "victim")
                await anyio.to_thread.run_sync(lambda: workers.wait_for("started", key="victim"))
                asked = time.time()
                assert await tasks.cancel(task_id) is True
                stopped = await anyio.to_thread.run_sync(lambda: workers.wait_for("stopped", key="victim"))
                await tasks.wait(task_id, timeout=30)
                marker = await tasks.enqueue("procs.record", "after")
                await tasks.wait(marker, timeout=30)
                again = await tasks.info(task_id)
                assert again is not None
                return asked, float(stopped["at"]), again.attempts, again.state

        asked, stopped_at, attempts, state = anyio.run(scenario)
        assert workers.stop_all() == {worker.name: 0}
    latency = stopped_at - asked
    print(
        f"\n[{backend_name}] cancel of a running {function}: stopped {latency * 1000:.0f} ms after cancel()"
    )
    assert state is TaskState.CANCELLED
    assert attempts == 1, "a cancelled task is never retried"
    assert latency < 1.0, f"the task stopped {latency:.3f} s after cancel(): the promise is 1 s"
    if pushes(backend_url):
        assert latency < 0.25, f"a backend that pushes notices stopped the task only after {latency:.3f} s"
    started = [
        event for event in workers.seen if event["event"] == "started" and event.get("key") == "victim"
    ]
    assert len(started) == 1, f"the cancelled task ran again: {started}"


def test_a_group_of_200_fans_in_once_while_a_worker_is_killed_twice(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    count = 200
    out = tmp_path / "out"
    libraries = list(WORKER_LIBRARIES.get(backend_name, ("asyncio",) * 3))
    # A 0.1 s first retry backoff (AsyncTasks' default is 1 s): the members the kills cut short are retried
    # sooner, the test proves the same.
    extra = ["--control", "--retry-backoff", "0.1"]
    with Workers(backend_url, out) as workers:
        workers.wait_ready(
            [
                workers.start(f"w{index}", backend=library, extra=extra, concurrency=4, lease=2.0)
                for index, library in enumerate(libraries)
            ]
        )

        async def enqueue() -> str:
            tasks = AsyncTasks(backend_from_url(backend_url), execution=False)
            async with tasks:
                members = [Call("procs.part", f"m{n}", n, 0.25) for n in range(count)]
                return await tasks.enqueue_group(members, then=Call("procs.join", "join"))

        group_id = anyio.run(enqueue)
        victim = workers.workers[0]
        for round_, ran in enumerate((30, 110)):
            workers.wait_until(members_ran(workers, ran), what=f"{ran} members ran")
            victim.kill()  # kill -9, with members running (and perhaps verdicts not saved)
            victim = workers.start(f"w0-again-{round_}", backend=libraries[0], extra=extra, lease=2.0)
            workers.wait_for("ready", worker=victim.name)
        workers.wait_for("ran", key="join", timeout=120)

        async def final() -> tuple[TaskState, int, object]:
            tasks = AsyncTasks(backend_from_url(backend_url), execution=False)
            async with tasks:
                group = await tasks.wait_group(group_id, timeout=60)
                assert group.then_id is not None
                then = await tasks.wait(group.then_id, timeout=60)
                return group.state, group.counts[TaskState.SUCCEEDED], then.result

        state, succeeded, received = anyio.run(final)
        workers.stop_all()
    assert (state, succeeded) == (TaskState.SUCCEEDED, count)
    joins = [run for run in read_runs(out) if run[0] == "join"]
    assert len(joins) == 1, f"then ran {len(joins)} times: {joins}"
    assert received == count
    (written,) = out.glob("join-join-*.json")
    assert json.loads(written.read_text()) == list(range(count)), "the 200 results, in call order"
    assert [w.name for w in workers.workers if w.process.returncode == -9] == ["w0", "w0-again-0"]
    reruns = len([run for run in read_runs(out) if run[0] != "join"]) - count
    print(f"\n[{backend_name}] 200-member group, 2 kills: then ran once; {reruns} member run(s) repeated")


def test_wait_in_another_process_wakes_when_the_verdict_is_saved(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    samples = 30
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        worker = workers.start(extra=["--control"], concurrency=2)
        workers.wait_for("ready", worker=worker.name)

        async def measure() -> list[float]:
            tasks = AsyncTasks(backend_from_url(backend_url), execution=False, poll_interval=POLL)
            latencies: list[float] = []
            async with tasks:
                for n in range(samples):
                    task_id = await tasks.enqueue("procs.slow", f"s{n}", 0.1)
                    info = await tasks.wait(task_id, timeout=30)
                    woke = time.time()
                    assert info.state is TaskState.SUCCEEDED
                    assert info.finished_at is not None
                    latencies.append(woke - info.finished_at)
            return latencies

        latencies = anyio.run(measure)
        workers.stop_all()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    kind = "notices" if pushes(backend_url) else f"polling every {POLL:g} s"
    woken = f"{p50 * 1000:.1f} ms (p50), {p99 * 1000:.1f} ms (p99)"
    print(f"\n[{backend_name}] wait() woken {woken} after the verdict ({kind})")
    if pushes(backend_url):
        assert p50 < 0.05, f"p50 {p50:.3f} s: a backend that pushes wakes waiters within 50 ms"
    else:
        assert p99 < POLL + 0.2, f"p99 {p99:.3f} s: a polling backend wakes waiters within the poll interval"
