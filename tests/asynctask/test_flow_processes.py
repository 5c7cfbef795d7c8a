"""Flow limits across worker processes: three real workers (``procs/worker.py --flow``) on one store, checked
from the start and end times the tasks write (``spans.log``).

- ``rate_limit="20/s"``: the starts of a backlog drained by 3 workers run at 20/s (within 10 %) over 5 s;
- ``max_running_per_key=1``: no two tasks of one key ever overlap, while tasks of different keys do;
- ``max_running=2``: never more than 2 run at once across the 3 processes;
- a worker killed (``kill -9``) while it holds the one slot of ``max_running=1`` gives it back once its
  lease expired and recovery settled its task: the other tasks then run.

Parametrised by backend URL as ``test_processes.py`` is; a backend without flow control yet is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from lifecycle.asynctask import AsyncTasks, Call, backend_from_url
from lifecycle.asynctask._backend import supports_flow_control
from tests.asynctask.procs import Workers
from tests.asynctask.procs.jobs import read_spans
from tests.asynctask.test_processes import BACKENDS, WORKER_LIBRARIES

pytestmark = pytest.mark.slow

Span = tuple[str, str, float, float, int]


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def backend_url(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to fresh, empty storage of the backend under test; skipped when it has no flow control."""
    for url in BACKENDS[backend_name](request, tmp_path):
        backend = backend_from_url(url)
        if not supports_flow_control(backend):
            pytest.skip(f"{type(backend).__name__} does not implement flow control yet")
        yield url


def enqueue(url: str, calls: Sequence[Call]) -> list[str]:
    """Store ``calls`` through an enqueue-only AsyncTasks."""

    async def main() -> list[str]:
        tasks = AsyncTasks(backend_from_url(url), execution=False)
        async with tasks:
            return await tasks.enqueue_many(calls)

    return anyio.run(main)


def start_workers(workers: Workers, backend_name: str, **options: Any) -> None:
    """Start the three workers together (they start up side by side) and return once each is ready."""
    libraries = WORKER_LIBRARIES.get(backend_name, ("asyncio",) * 3)
    workers.wait_ready([workers.start(backend=library, extra=["--flow"], **options) for library in libraries])


def most_at_once(spans: Sequence[Span]) -> int:
    """The largest number of spans running at one instant (an end and a start at the same instant do not
    overlap: the next start follows the settlement of the previous run)."""
    edges = sorted([(start, 1) for _, _, start, _, _ in spans] + [(end, -1) for _, _, _, end, _ in spans])
    running = most = 0
    for _, change in edges:  # at equal times -1 sorts first
        running += change
        most = max(most, running)
    return most


def test_a_rate_limit_holds_across_three_worker_processes(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    # 20 at once (the bucket starts full), then 20/s: about 6 s of work. The window below ends 5.5 s after the
    # first start, when at most 20 + 20 * 5.5 = 130 can have started: 10 are still waiting, so the backlog
    # lasts through the window, however late the workers are.
    count = 140
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        start_workers(workers, backend_name, concurrency=8)
        enqueue(backend_url, [Call("procs.rated", f"r{n}") for n in range(count)])
        workers.wait_until(lambda seen: len(workers.keys_ran()) == count, what=f"all {count} tasks ran")
        assert workers.stop_all() == {w.name: 0 for w in workers.workers}
    starts = sorted(start for kind, _, start, _, _ in read_spans(out) if kind == "rated")
    assert len(starts) == count
    first = starts[0]
    assert sum(1 for start in starts if start < first + 0.5) <= 20 + 10 + 2, "the burst is the bucket"
    window = [start for start in starts if first + 0.5 <= start < first + 5.5]
    assert 90 <= len(window) <= 110, f"{len(window)} starts in 5 s: expected 20/s +- 10 %"
    pids = {pid for kind, _, _, _, pid in read_spans(out) if kind == "rated"}
    assert len(pids) >= 2, "the limit held while several processes shared the work"


def test_one_task_per_key_at_a_time_while_keys_run_in_parallel(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    keys, per_key = 4, 5
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        start_workers(workers, backend_name, concurrency=4)
        calls = [
            Call("procs.keyed", f"n{n}", f"acct{k}", 0.15, concurrency_key=f"acct{k}")
            for n in range(per_key)
            for k in range(keys)
        ]
        enqueue(backend_url, calls)
        total = keys * per_key
        workers.wait_until(lambda seen: len(workers.keys_ran()) == total, what=f"all {total} tasks ran")
        assert workers.stop_all() == {w.name: 0 for w in workers.workers}
    spans = [span for span in read_spans(out) if span[0] == "keyed"]
    assert len(spans) == keys * per_key
    for k in range(keys):
        mine = [span for span in spans if span[1].startswith(f"acct{k}/")]
        assert len(mine) == per_key
        assert most_at_once(mine) == 1, f"two tasks of acct{k} overlapped: {sorted(s[2:4] for s in mine)}"
    assert most_at_once(spans) >= 2, "tasks of different keys must run at the same time"


def test_max_running_is_never_exceeded_across_three_worker_processes(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    count = 12
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        start_workers(workers, backend_name, concurrency=4)
        enqueue(backend_url, [Call("procs.capped", f"c{n}", 0.15) for n in range(count)])
        workers.wait_until(lambda seen: len(workers.keys_ran()) == count, what=f"all {count} tasks ran")
        assert workers.stop_all() == {w.name: 0 for w in workers.workers}
    spans = [span for span in read_spans(out) if span[0] == "capped"]
    assert len(spans) == count
    assert most_at_once(spans) == 2, "max_running=2: two at once at most, and two did run together"


def test_a_killed_worker_gives_its_slot_back_after_recovery(backend_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Workers(backend_url, out) as workers:
        # A 0.1 s first retry backoff (AsyncTasks' default is 1 s): the retry of the task the victim held
        # waits less, the test proves the same.
        extra = ["--flow", "--retry-backoff", "0.1"]
        victim = workers.start("victim", lease=1.0, extra=extra)
        workers.wait_for("ready", worker="victim")
        enqueue(backend_url, [Call("procs.solo", key) for key in ("doomed", "next-1", "next-2")])
        workers.wait_for("started", key="doomed", worker="victim")
        victim.kill()  # kill -9 while it holds the only slot of procs.solo

        rescuer = workers.start("rescuer", lease=1.0, extra=extra)
        workers.wait_for("ready", worker="rescuer")
        expected = {"doomed", "next-1", "next-2"}
        workers.wait_until(lambda seen: workers.keys_ran() >= expected, what="the slot came back: all ran")
        assert workers.stop_all()["rescuer"] == 0
    spans = [span for span in read_spans(out) if span[0] == "solo"]
    assert sorted(span[1] for span in spans) == sorted(expected)
    assert {span[4] for span in spans} == {rescuer.pid}
    assert most_at_once(spans) == 1
