"""`lifecycle tasks --backend URL ...`: every command run (in-process, through ``lifecycle.cli.main``)
against SQLite, Redis and PostgreSQL (each test on its own file, key prefix or schema), checked against
what the backend stores."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from lifecycle.asynctask import TaskState
from lifecycle.cli._tasks._format import error_summary, parse_duration
from tests.cli.cli_support import in_directory, lifecycle, lifecycle_json, seed, state_of


def test_stats_and_list_show_the_stored_tasks(url: str) -> None:
    seeded = seed(url, succeeded=3, dead=["disk full", "bad input"], pending=1)

    stats = lifecycle_json("tasks", "--backend", url, "stats")
    assert stats["queues"]["default"] == {
        "pending": 1,
        "active": 0,
        "succeeded": 3,
        "dead": 2,
        "cancelled": 0,
    }
    assert stats["total"]["dead"] == 2

    dead = lifecycle_json("tasks", "--backend", url, "list", "--state", "dead")
    assert sorted(row["id"] for row in dead) == sorted(seeded.dead)
    assert {row["error_summary"] for row in dead} == {"ValueError: disk full", "ValueError: bad input"}

    table = lifecycle("tasks", "--backend", url, "list", "--state", "dead")
    assert table.returncode == 0, table.stderr
    for task_id in seeded.dead:
        assert task_id in table.stdout
    assert "ValueError: disk full" in table.stdout
    assert "t-ok-0" not in table.stdout

    human = lifecycle("tasks", "--backend", url, "stats")
    assert human.returncode == 0, human.stderr
    header, row = (line for line in human.stdout.splitlines() if "queue" in line or "default" in line)
    assert "succeeded" in header
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["default", "1", "0", "3", "2", "0", "6"]


def test_show_prints_every_field_with_arguments_result_and_traceback(url: str) -> None:
    seeded = seed(url, succeeded=1, dead=["disk full"])

    shown = lifecycle_json("tasks", "--backend", url, "show", seeded.succeeded[0])
    assert shown["state"] == "succeeded"
    assert shown["arguments"] == [0]
    assert shown["result"] == 0
    assert shown["attempts"] == 1

    human = lifecycle("tasks", "--backend", url, "show", seeded.dead[0])
    assert human.returncode == 0, human.stderr
    assert "app.boom" in human.stdout
    assert "dead" in human.stdout
    assert "last error" in human.stdout
    assert 'raise ValueError("disk full")' in human.stdout  # the whole traceback, not only its summary

    missing = lifecycle("tasks", "--backend", url, "show", "no-such-task")
    assert missing.returncode == 3
    assert missing.stderr.strip().splitlines() == [
        "error: there is no task with id 'no-such-task' (never stored, or removed by retention or purge)"
    ]


def test_requeue_cancel_and_purge_change_the_store(url: str) -> None:
    seeded = seed(url, succeeded=3, dead=["one", "two", "three"], pending=2)

    one = lifecycle("tasks", "--backend", url, "requeue", seeded.dead[0])
    assert one.returncode == 0, one.stderr
    assert state_of(url, seeded.dead[0]) is TaskState.PENDING

    refused = lifecycle("tasks", "--backend", url, "requeue", seeded.succeeded[0])
    assert refused.returncode == 4
    assert "only dead or cancelled tasks can be requeued" in refused.stderr

    rest = lifecycle_json("tasks", "--backend", url, "requeue", "--dead", "--batch-size", "1")
    assert rest == {"requeued": 2}
    assert {state_of(url, task_id) for task_id in seeded.dead} == {TaskState.PENDING}

    cancelled = lifecycle("tasks", "--backend", url, "cancel", seeded.pending[0], "unknown-id", "--json")
    assert cancelled.returncode == 3  # one id was not found
    assert json.loads(cancelled.stdout) == {
        "cancelled": [seeded.pending[0]],
        "cancel_requested": [],
        "failed": {"unknown-id": "there is no task with this id"},
    }
    assert state_of(url, seeded.pending[0]) is TaskState.CANCELLED
    not_pending = lifecycle("tasks", "--backend", url, "cancel", seeded.succeeded[0])
    assert not_pending.returncode == 4
    assert "only pending or running tasks can be cancelled" in not_pending.stderr

    too_recent = lifecycle_json(
        "tasks", "--backend", url, "purge", "--state", "succeeded", "--older-than", "1h"
    )
    assert too_recent == {"purged": 0}
    purged = lifecycle_json(
        "tasks",
        "--backend",
        url,
        "purge",
        "--state",
        "succeeded",
        "--state",
        "cancelled",
        "--batch-size",
        "2",
    )
    assert purged == {"purged": 4}
    stats = lifecycle_json("tasks", "--backend", url, "stats")
    assert stats["total"] == {"pending": 4, "active": 0, "succeeded": 0, "dead": 0, "cancelled": 0}


def test_purge_older_than_keeps_recent_tasks(url: str) -> None:
    import time

    old = seed(url, succeeded=2, prefix="old", finished_at=time.time() - 8 * 86400)
    new = seed(url, succeeded=1, prefix="new")
    result = lifecycle("tasks", "--backend", url, "purge", "--state", "succeeded", "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "purged 2 succeeded task(s)"
    assert state_of(url, old.succeeded[0]) is None
    assert state_of(url, new.succeeded[0]) is TaskState.SUCCEEDED


# -- errors and options (SQLite only: they do not depend on the backend) ---------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    seed(url)
    return url


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--backend", "tasks.db", "stats"), 'for a SQLite file write "sqlite:///tasks.db"'),
        (("--backend", "sqlite:///missing.db", "stats"), "there is no SQLite database at 'missing.db'"),
        (("stats",), "no task backend given: pass --backend URL"),
        (("--app", "nowhere_module:tasks", "stats"), "there is no module named 'nowhere_module'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = lifecycle("tasks", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "missing.db").exists()


def test_bad_option_values_are_usage_errors(sqlite_url: str) -> None:
    duration = lifecycle("tasks", "--backend", sqlite_url, "purge", "--state", "dead", "--older-than", "7x")
    assert duration.returncode == 2
    assert "'7x' is not a duration" in duration.stderr
    active = lifecycle("tasks", "--backend", sqlite_url, "purge", "--state", "active")
    assert active.returncode == 2
    assert "cannot delete active tasks" in active.stderr
    both = lifecycle("tasks", "--backend", sqlite_url, "requeue")
    assert both.returncode == 2
    assert "give the task IDs to requeue, or --dead" in both.stderr


INTERVAL = "--interval must be a finite number of seconds greater than zero"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("watch", "--interval", "0"), f"{INTERVAL}, got 0.0"),
        (("watch", "--interval", "inf"), f"{INTERVAL}, got inf"),
        (("watch", "--interval", "nan"), f"{INTERVAL}, got nan"),
        (("purge", "--state", "dead", "--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (("requeue", "--dead", "--batch-size", "-5"), "--batch-size must be at least 1, got -5"),
        (("list", "--limit", "0"), "--limit must be at least 1, got 0"),
        (("list", "--offset", "-1"), "--offset must be at least 0, got -1"),
    ],
)
def test_numbers_follow_the_librarys_one_rule(sqlite_url: str, args: tuple[str, ...], message: str) -> None:
    result = lifecycle("tasks", "--backend", sqlite_url, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_broken_backend_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a SQLite database" * 100)
    url = f"sqlite:///{corrupt}"
    plain = lifecycle("tasks", "--backend", url, "stats")
    assert plain.returncode == 1
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1, plain.stderr
    assert lines[0].startswith("error: ")
    assert "(run with --debug for the traceback)" in lines[0]

    debug = lifecycle("tasks", "--backend", url, "--debug", "stats")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


def test_app_supplies_the_backend_and_the_encoding(tmp_path: Path) -> None:
    (tmp_path / "shop_app.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from lifecycle.asynctask import AsyncTasks, SQLiteBackend

            @dataclass
            class Order:
                number: int

            tasks = AsyncTasks(SQLiteBackend("shop.db"))
            tasks.encoding.register(Order)

            @tasks.register(name="shop.ship")
            async def ship(order: Order) -> None: ...

            async def enqueue() -> str:
                async with tasks:
                    return await tasks.enqueue(ship, Order(7))
            """
        )
    )
    with in_directory(tmp_path):
        sys.path.insert(0, str(tmp_path))
        import shop_app  # type: ignore[import-not-found]

        task_id = anyio.run(shop_app.enqueue)
    shown = lifecycle("tasks", "--app", "shop_app:tasks", "show", task_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "[Order(number=7)]" in shown.stdout
    stats = lifecycle_json("tasks", "--app", "shop_app:tasks", "stats", cwd=tmp_path)
    assert stats["total"]["pending"] == 1


def test_global_json_flag_and_help(sqlite_url: str) -> None:
    seed(sqlite_url, succeeded=1)
    result = lifecycle("tasks", "--backend", sqlite_url, "--json", "list")
    assert result.returncode == 0, result.stderr
    assert '"state": "succeeded"' in result.stdout
    bare = lifecycle("tasks", "--backend", sqlite_url)
    assert bare.returncode == 2
    assert "stats" in bare.stderr
    assert "purge" in bare.stderr


def test_duration_and_error_summary_parsing() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    for bad in ("", "7x", "h", "-5", "1h 30m", "inf"):
        with pytest.raises(Exception, match="is not a duration"):
            parse_duration(bad)
    assert (
        error_summary("Traceback (most recent call last):\n  File 'x'\n    y()\nKeyError: 'k'")
        == "KeyError: 'k'"
    )
    assert (
        error_summary("aborted by the task: no such order\nTraceback ...")
        == "aborted by the task: no such order"
    )
    assert error_summary(None) == ""


def test_schedules_lists_the_apps_schedules_with_next_fire_times(tmp_path: Path) -> None:
    (tmp_path / "cron_app.py").write_text(
        textwrap.dedent(
            """
            from lifecycle.asynctask import AsyncTasks, SQLiteBackend

            tasks = AsyncTasks(SQLiteBackend("cron.db"))

            @tasks.register(name="reports.send")
            async def send(kind: str) -> None: ...

            tasks.schedule(send, "0 7 * * *", "daily", name="daily-report", timezone="Europe/Paris")
            tasks.every(send, 300, "often", name="often", queue="low")
            """
        )
    )
    import time

    before = time.time()
    found = lifecycle_json("tasks", "--app", "cron_app:tasks", "schedules", cwd=tmp_path)
    assert [row["name"] for row in found] == ["daily-report", "often"]
    daily, often = found
    assert (daily["kind"], daily["spec"], daily["timezone"], daily["task"]) == (
        "cron",
        "0 7 * * *",
        "Europe/Paris",
        "reports.send",
    )
    assert before < daily["next_fire"] <= before + 86400 + 5
    assert often["queue"] == "low"
    assert before < often["next_fire"] <= before + 300 + 5
    assert daily["next_task_id"].startswith("schedule:daily-report:")

    table = lifecycle("tasks", "--app", "cron_app:tasks", "schedules", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "cron 0 7 * * * (Europe/Paris)" in table.stdout
    assert "every 300" in table.stdout

    without_app = lifecycle("tasks", "--backend", f"sqlite:///{tmp_path / 'cron.db'}", "schedules")
    assert without_app.returncode == 2
    assert "pass --app MODULE:ATTR" in without_app.stderr
