"""The CLI and control of running work: ``cancel`` says whether a task was cancelled or a running one was
asked to stop, ``show`` and ``watch`` show progress, ``show`` shows group membership, and ``group ID`` shows
a group (on every backend that has control of running work; the others skip)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import anyio
import pytest
from rich.console import Console

from lifecycle.asynctask import (
    AsyncTasks,
    NewGroup,
    NewTask,
    ProgressUpdate,
    Settlement,
    TaskState,
    backend_from_url,
)
from lifecycle.asynctask._backend import supports_control
from lifecycle.cli._tasks._watch import Dashboard
from tests.cli.cli_support import ENCODING, lifecycle, lifecycle_json

NOW = time.time()


def task(task_id: str, *, group_id: str | None = None, run_at: float = NOW - 10) -> NewTask:
    return NewTask(
        id=task_id,
        name="tests.part",
        queue="default",
        payload=ENCODING.encode((task_id,)),
        max_retries=3,
        timeout=None,
        enqueued_at=NOW - 10,
        run_at=run_at,
        group_id=group_id,
    )


async def _seed(url: str) -> None:
    """A group of three (one succeeded, one running with progress, one waiting) with a then; a running task
    outside it; a pending task."""
    backend = backend_from_url(url)
    await backend.open()
    try:
        if not supports_control(backend):
            pytest.skip(f"{type(backend).__name__} has no control of running work yet")
        members = (
            task("g.0", group_id="g"),
            task("g.1", group_id="g"),
            task("g.2", group_id="g", run_at=NOW + 3600),
        )
        then = replace(task("g.then"), meta=None)
        await backend.enqueue_group(NewGroup(id="g", members=members, then=then, created_at=NOW - 10))
        await backend.enqueue_many([task("solo"), task("waiting", run_at=NOW + 3600)])
        claimed = {
            c.record.id: c for c in await backend.claim(["default"], 10, now=NOW, lease_until=NOW + 600)
        }
        assert sorted(claimed) == ["g.0", "g.1", "solo"]
        done = Settlement("g.0", claimed["g.0"].token, TaskState.SUCCEEDED, at=NOW, result=ENCODING.encode(5))
        assert await backend.settle([done]) == set()
        progress = [
            ProgressUpdate("g.1", claimed["g.1"].token, 3.0, 10.0, "copying rows"),
            ProgressUpdate("solo", claimed["solo"].token, None, None, "warming up"),
        ]
        assert await backend.save_progress(progress) == set()
    finally:
        await backend.close()


@pytest.fixture
def store(url: str) -> str:
    anyio.run(_seed, url, backend="asyncio")
    return url


def test_show_prints_progress_and_group_membership(store: str) -> None:
    shown = lifecycle("tasks", "--backend", store, "show", "g.1")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
    assert "3 / 10 (30%) copying rows" in lines["progress"]
    assert "g active (member 2 of 3, 1 succeeded)" in " ".join(lines["group"].split())
    data = lifecycle_json("tasks", "--backend", store, "show", "g.1")
    assert data["progress"] == {"done": 3.0, "total": 10.0, "message": "copying rows"}
    assert data["group_id"] == "g"
    assert data["group"]["member"] == 1
    assert data["group"]["counts"]["succeeded"] == 1
    solo = lifecycle_json("tasks", "--backend", store, "show", "solo")
    assert (solo["progress"], solo["group_id"], solo["group"]) == (
        {"done": None, "total": None, "message": "warming up"},
        None,
        None,
    )


def test_group_shows_the_state_counts_and_members(store: str) -> None:
    data = lifecycle_json("tasks", "--backend", store, "group", "g")
    assert (data["id"], data["state"], data["then_id"]) == ("g", "active", None)
    assert data["task_ids"] == ["g.0", "g.1", "g.2"]
    assert data["counts"] == {"pending": 1, "active": 1, "succeeded": 1, "dead": 0, "cancelled": 0}
    assert [member["state"] for member in data["members"]] == ["succeeded", "active", "pending"]
    assert data["members"][1]["progress"]["message"] == "copying rows"
    text = lifecycle("tasks", "--backend", store, "group", "g")
    assert text.returncode == 0, text.stderr
    assert "group g  active  3 members: 1 pending, 1 active, 1 succeeded" in text.stdout
    missing = lifecycle("tasks", "--backend", store, "group", "nope")
    assert missing.returncode == 3
    assert "there is no group with id 'nope'" in missing.stderr


def test_cancel_says_which_tasks_were_cancelled_and_which_were_asked_to_stop(store: str) -> None:
    result = lifecycle("tasks", "--backend", store, "cancel", "solo", "waiting")
    assert result.returncode == 0, result.stderr
    assert "cancellation requested solo (running: its worker stops it, then it is cancelled)" in result.stdout
    assert "cancelled waiting" in result.stdout
    data = json.loads(lifecycle("tasks", "--backend", store, "cancel", "g.2", "g.0", "--json").stdout)
    assert data == {
        "cancelled": ["g.2"],
        "cancel_requested": [],
        "failed": {"g.0": "it is succeeded already; only pending or running tasks can be cancelled"},
    }
    group = lifecycle_json("tasks", "--backend", store, "group", "g")
    assert group["state"] == "cancelled", "a cancelled pending member cancels its group"
    text = lifecycle("tasks", "--backend", store, "group", "g")
    assert "then: never runs (the group is cancelled)" in text.stdout


def test_watch_lists_the_running_tasks_that_report_progress(store: str) -> None:
    async def look() -> dict[str, object]:
        tasks = AsyncTasks(backend_from_url(store), execution=False)
        async with tasks:
            dashboard = Dashboard(tasks)
            await dashboard.refresh()
            console = Console(record=True, width=160, color_system=None)
            console.print(dashboard.render())
            return {**dashboard.to_json(), "screen": console.export_text()}

    data = anyio.run(look, backend="asyncio")
    screen = str(data["screen"])
    assert "running, with progress" in screen
    assert "3 / 10 (30%) copying rows" in screen
    running = data["running_progress"]
    assert isinstance(running, list)
    assert {entry["id"]: entry["progress"]["message"] for entry in running} == {
        "g.1": "copying rows",
        "solo": "warming up",
    }
