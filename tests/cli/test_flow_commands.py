"""``lifecycle tasks pause/resume QUEUE`` and what ``stats``, ``watch`` and ``--json`` show of flow control
(paused queues; per task name the limits, the running count and the tasks waiting on each), in-process on a
SQLite file."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from lifecycle.asynctask import AsyncTasks, FlowLimits, NewTask, backend_from_url
from lifecycle.cli import main
from lifecycle.cli._tasks._watch import Dashboard
from tests.cli.cli_support import ENCODING

Run = Callable[..., tuple[int, str, str]]
NAME = "flowapp.sync_account"
NOW = time.time()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv)``: (exit status, stdout, stderr) of the CLI run in-process."""
    monkeypatch.delenv("LIFECYCLE_TASKS_BACKEND", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("COLUMNS", "160")

    def call(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call


def task(number: int, key: str) -> NewTask:
    return NewTask(
        id=f"t{number}",
        name=NAME,
        queue="accounts",
        payload=ENCODING.encode((key,)),
        max_retries=3,
        timeout=None,
        enqueued_at=NOW - 100 + number,
        run_at=NOW - 100,
        concurrency_key=key,
    )


async def _seed(url: str) -> None:
    """Four due tasks of NAME (keys a, a, b, c); a worker with max_running=2, max_running_per_key=1 started
    t0 (key a) and t2 (key b), so t1 waits on its key and t3 on max_running."""
    backend = backend_from_url(url)
    await backend.open()
    try:
        await backend.enqueue_many([task(0, "a"), task(1, "a"), task(2, "b"), task(3, "c")])
        limits = {NAME: FlowLimits(max_running=2, max_running_per_key=1)}
        claimed = await backend.claim(["accounts"], 10, now=NOW, lease_until=NOW + 3600, limits=limits)
        assert [c.record.id for c in claimed] == ["t0", "t2"]
    finally:
        await backend.close()


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    anyio.run(_seed, url)
    return url


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str) -> Iterator[str]:
    """An importable module registering NAME with the limits the seeded worker used."""
    (tmp_path / "flowapp.py").write_text(
        textwrap.dedent(
            f"""
            from lifecycle.asynctask import AsyncTasks, backend_from_url

            tasks = AsyncTasks(backend_from_url({store!r}), execution=False)

            @tasks.register(name={NAME!r}, queue="accounts", max_running=2, max_running_per_key=1,
                            rate_limit="100/m")
            async def sync_account(account: str) -> None: ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flowapp", None)  # each test's module names its own store
    yield "flowapp:tasks"
    sys.modules.pop("flowapp", None)


def test_pause_and_resume_are_stored_and_reported(store: str, run: Run) -> None:
    status, out, err = run("tasks", "--backend", store, "pause", "accounts")
    assert (status, err) == (0, "")
    assert "paused queue 'accounts'" in out
    assert "4 pending task(s)" not in out  # two of the four run
    assert "2 pending task(s) in queue 'accounts'" in out
    status, out, _ = run("tasks", "--backend", store, "pause", "accounts")
    assert "it was paused already" in out

    status, out, _ = run("tasks", "--backend", store, "stats", "--json")
    assert json.loads(out)["paused"] == ["accounts"]
    status, out, _ = run("tasks", "--backend", store, "stats")
    assert "paused queues: accounts" in out
    assert "pass --app MODULE:ATTR" in out, "without the app the limits are unknown, and it says so"

    async def seen_by_a_worker() -> set[str]:
        backend = backend_from_url(store)
        await backend.open()
        try:
            return await backend.paused()
        finally:
            await backend.close()

    assert anyio.run(seen_by_a_worker) == {"accounts"}

    status, out, _ = run("tasks", "--backend", store, "resume", "accounts", "--json")
    assert status == 0
    assert json.loads(out) == {
        "queue": "accounts",
        "paused": False,
        "changed": True,
        "paused_queues": [],
        "pending": 2,
    }
    assert anyio.run(seen_by_a_worker) == set()
    status, out, _ = run("tasks", "--backend", store, "resume", "accounts")
    assert "it was not paused" in out


def test_pausing_a_queue_without_tasks_warns_of_a_typo(store: str, run: Run) -> None:
    status, out, _ = run("tasks", "--backend", store, "pause", "acounts")
    assert status == 0
    assert "no tasks are stored in queue 'acounts'" in out
    status, _, err = run("tasks", "--backend", store, "pause", "")
    assert status == 2
    assert "queue name" in err


def test_stats_with_the_app_shows_the_limits_and_what_each_waiting_task_waits_on(
    store: str, app: str, run: Run
) -> None:
    status, out, err = run("tasks", "--app", app, "stats", "--json")
    assert (status, err) == (0, "")
    shown = json.loads(out)
    assert shown["paused"] == []
    assert shown["flow"] == {
        NAME: {
            "rate_limit": "100/m",
            "max_running": 2,
            "max_running_per_key": 1,
            "running": 2,
            "tokens": 100.0,  # the seeding worker's claim had no rate limit: the bucket was never used
            "refused_by_rate_limit": 0,
            "waiting": {"paused": 0, "rate_limit": 0, "max_running": 2, "max_running_per_key": 0},
        }
    }
    assert shown["flow_read"] == {"pending_tasks": 2, "complete": True, "limits_known": True}

    status, out, _ = run("tasks", "--app", app, "stats")
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith(f"│ {NAME}") or NAME in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells == [NAME, "100/m", "2", "1", "2", "100.0", "max_running 2"]

    run("tasks", "--app", app, "pause", "accounts")
    status, out, _ = run("tasks", "--app", app, "stats", "--json")
    assert json.loads(out)["flow"][NAME]["waiting"]["paused"] == 2, "a paused queue holds them first"


def test_watch_shows_the_flow_too(store: str, app: str) -> None:
    async def look() -> dict[str, object]:
        tasks = AsyncTasks(backend_from_url(store), execution=False)
        import flowapp  # type: ignore[import-not-found]

        async with tasks:
            dashboard = Dashboard(tasks, app=flowapp.tasks)
            await dashboard.refresh()
            rendered = dashboard.render()
            assert rendered is not None
            return dashboard.to_json()

    shown = anyio.run(look)
    assert shown["paused"] == []
    flow = shown["flow"]
    assert isinstance(flow, dict)
    assert flow[NAME]["waiting"]["max_running"] == 2
