"""The CLI run in-process (``lifecycle.cli.main(argv)`` with captured output) on a SQLite file: narrow
terminals, error notes by state, attempt wording, options after the command, ``watch --json``, help texts
and messages (issue 10, "also seen")."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from lifecycle.asynctask import AsyncTasks, NewTask, Settlement, TaskState, backend_from_url
from lifecycle.cli import main
from lifecycle.cli._app import build_parser
from lifecycle.cli._tasks._session import _print_error
from lifecycle.cli._tasks._watch import Dashboard
from tests.cli.cli_support import ENCODING, cli_env, lifecycle_argv

NOW = time.time()
NAME = "myapp.notifications.send_welcome_email"
QUEUE = "emails-high-priority"


def hex_id(number: int) -> str:
    return f"{number:032x}"  # as long as the engine's uuid4().hex ids


Run = Callable[..., tuple[int, str, str]]


def new_task(number: int, *, max_retries: int = 2, run_at: float = NOW - 100) -> NewTask:
    return NewTask(
        id=hex_id(number),
        name=NAME,
        queue=QUEUE,
        payload=ENCODING.encode((number,)),
        max_retries=max_retries,
        timeout=None,
        enqueued_at=NOW - 100 + number,
        run_at=run_at,
    )


async def _seed_histories(url: str) -> None:
    """Tasks 1-5 with the histories the listing must tell apart (claim and settle as a worker would)."""
    backend = backend_from_url(url)
    await backend.open()

    async def settle(task_id: str, state: TaskState, at: float, **fields: object) -> None:
        """Claim what is due, settle ``task_id`` as ``state`` and put the others back untouched."""
        settlements = []
        for item in await backend.claim([QUEUE], 10, now=at, lease_until=at + 60):
            if item.record.id == task_id:
                settlements.append(Settlement(task_id, item.token, state, at=at, **fields))  # type: ignore[arg-type]
            else:
                back = Settlement(item.record.id, item.token, TaskState.PENDING, at=at, refund_attempt=True)
                settlements.append(back)
        assert task_id in {settlement.task_id for settlement in settlements}
        assert not await backend.settle(settlements)

    failure = "Traceback (most recent call last):\n  File 'x', line 1\nValueError: {}"
    try:
        await backend.enqueue_many([new_task(n, max_retries=5 if n == 5 else 2) for n in range(1, 6)])
        # 1: failed once, then succeeded: its old error is no longer the story
        await settle(hex_id(1), TaskState.PENDING, NOW - 50, run_at=NOW - 49, error=failure.format("flaky"))
        await settle(hex_id(1), TaskState.SUCCEEDED, NOW - 40, result=ENCODING.encode(1))
        # 2: dead
        await settle(hex_id(2), TaskState.DEAD, NOW - 30, error=failure.format("disk full"))
        # 3: failed once, waiting for its retry in an hour
        await settle(
            hex_id(3), TaskState.PENDING, NOW - 20, run_at=NOW + 3600, error=failure.format("timeout")
        )
        # 4: dead, then requeued by hand (attempts back at 0, the error kept), due in an hour
        await settle(hex_id(4), TaskState.DEAD, NOW - 10, error=failure.format("bad input"))
        assert await backend.requeue([hex_id(4)], now=NOW - 5) == 1
        await settle(hex_id(4), TaskState.PENDING, NOW - 4, run_at=NOW + 3600, refund_attempt=True)
        # 5: never run (max_retries=5), due in an hour
        await settle(hex_id(5), TaskState.PENDING, NOW - 3, run_at=NOW + 3600, refund_attempt=True)
    finally:
        await backend.close()


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    anyio.run(_seed_histories, url)
    return url


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, columns=...)``: (exit status, stdout, stderr) of the CLI run in-process."""
    monkeypatch.delenv("LIFECYCLE_TASKS_BACKEND", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")

    def call(*argv: str, columns: int = 160) -> tuple[int, str, str]:
        monkeypatch.setenv("COLUMNS", str(columns))
        status = main(list(argv))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call


def test_list_never_cuts_ids_or_states(store: str, run: Run) -> None:
    for columns in (160, 100, 80, 70, 60, 50, 44, 30):
        status, out, err = run("tasks", "--backend", store, "list", columns=columns)
        assert (status, err) == (0, "")
        lines = out.splitlines()
        for number in range(1, 6):
            # one row starts with the whole id and has the whole state
            states = {"pending", "succeeded", "dead"}
            rows = [line for line in lines if line.startswith(hex_id(number)) and states & set(line.split())]
            assert len(rows) == 1, (columns, out)
        if columns >= 80:
            assert "left out" not in out
            assert ("emails-high" if columns >= 100 else "emails") in out
        else:
            assert "(too narrow" in out
        assert "ValueError: disk" in out  # the error notes are never dropped (they may wrap)


def test_list_shows_an_error_only_where_it_tells_the_tasks_story(store: str, run: Run) -> None:
    for columns in (160, 80):
        status, out, _ = run("tasks", "--backend", store, "list", columns=columns)
        assert status == 0
        assert "flaky" not in out  # task 1 succeeded after that error
        notes = {
            line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines() if "ValueError" in line
        }
        assert notes[hex_id(2)].endswith("ValueError: disk full")
        assert "will retry after: ValueError: timeout" in notes[hex_id(3)]
        assert "requeued after: ValueError: bad input" in notes[hex_id(4)]
        assert hex_id(5) not in notes
    # show still has the whole history, labelled
    status, out, _ = run("tasks", "--backend", store, "show", hex_id(1))
    assert status == 0
    assert "last error (of an earlier attempt)" in out
    # JSON keeps the stored data as it is
    status, out, _ = run("tasks", "--backend", store, "list", "--json")
    rows = {row["id"]: row for row in json.loads(out)}
    assert rows[hex_id(1)]["error_summary"] == "ValueError: flaky"


@pytest.mark.parametrize(
    ("number", "attempts", "retries_left"),
    [
        (5, "0 of 6 (5 retries left)", 5),  # never run: the first run and all 5 retries ahead
        (3, "1 of 3 (2 retries left)", 2),  # failed once: both retries still ahead
        (4, "0 of 3 (2 retries left)", 2),  # requeued by hand: starts again
        (2, "1 of 3", 0),  # dead: no "retries left" at all
    ],
)
def test_show_words_attempts_and_retries_right(
    store: str,
    run: Run,
    number: int,
    attempts: str,
    retries_left: int,
) -> None:
    status, out, _ = run("tasks", "--backend", store, "show", hex_id(number))
    assert status == 0
    [line] = [line for line in out.splitlines() if line.startswith("attempts")]
    assert line.split(None, 1)[1].strip() == attempts
    status, out, _ = run("tasks", "--backend", store, "show", hex_id(number), "--json")
    assert json.loads(out)["retries_left"] == retries_left


async def test_watch_labels_requeued_tasks_as_requeued(store: str) -> None:
    tasks = AsyncTasks(backend_from_url(store), execution=False)
    async with tasks:
        dashboard = Dashboard(tasks)
        await dashboard.refresh()
    labels = {row["id"]: row["label"] for row in dashboard.to_json()["recent_failures"]}
    assert labels == {hex_id(2): "dead", hex_id(3): "retrying", hex_id(4): "requeued"}


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["list", "--state", "dead"],
        ["show", hex_id(2)],
        ["requeue", hex_id(2)],
        ["cancel", hex_id(5)],
        ["purge", "--state", "succeeded"],
    ],
)
def test_the_backend_can_follow_the_command(store: str, run: Run, argv: list[str], tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    for args in (
        ["tasks", *argv, "--backend", store],
        ["tasks", "--backend", missing, *argv, "--backend", store],  # after the command wins
        ["tasks", *argv, "--json", "--backend", store, "--debug"],
    ):
        status, _, err = run(*args)
        # 4: a task that the call before already requeued or cancelled (so the store was used)
        assert status == 0 or (status == 4 and argv[0] in ("requeue", "cancel")), (args, err)
    assert not (tmp_path / "missing.db").exists()


def test_every_command_takes_the_shared_options_after_it() -> None:
    parser = build_parser()
    tasks_parser = _subparsers(parser)["tasks"]
    for name in _subparsers(tasks_parser):
        args = parser.parse_args(
            ["tasks", name, *_required(name), "--backend", "sqlite:///x.db", "--app", "m:a"]
        )
        assert (args.backend, args.app, args.debug) == ("sqlite:///x.db", "m:a", False), name
        before = parser.parse_args(
            ["tasks", "--backend", "sqlite:///y.db", "--debug", name, *_required(name)]
        )
        assert (before.backend, before.app, before.debug) == ("sqlite:///y.db", None, True), name


def _required(command: str) -> list[str]:
    return {
        "show": ["ID"],
        "group": ["ID"],
        "cancel": ["ID"],
        "purge": ["--state", "dead"],
        "pause": ["QUEUE"],
        "resume": ["QUEUE"],
    }.get(command, [])


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_help_texts_are_plain_text_and_complete(run: Run) -> None:
    parser = build_parser()
    pending = [("lifecycle", parser)]
    while pending:
        path, current = pending.pop()
        text = current.format_help()
        assert "`" not in text, f"{path} --help shows reStructuredText:\n{text}"
        assert ":class:" not in text, f"{path} --help shows reStructuredText:\n{text}"
        pending += [(f"{path} {name}", sub) for name, sub in _subparsers(current).items()]
    top = parser.format_help()
    for command in (
        "stats",
        "list",
        "show",
        "requeue",
        "cancel",
        "purge",
        "pause",
        "resume",
        "watch",
        "schedules",
    ):
        assert command in top


def test_messages_use_an_before_a_vowel(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "grammar_app.py").write_text("number = 42\ndef make():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    status, _, err = run("worker", "grammar_app:number")
    assert status == 2
    assert "is an int, not a lifecycle.asynctask.AsyncTasks" in " ".join(err.split())
    status, _, err = run("run", "grammar_app:make")
    assert status == 2
    assert "calling it returned an int" in " ".join(err.split())


def test_watch_json_prints_one_json_object_per_refresh(store: str) -> None:
    with subprocess.Popen(
        [*lifecycle_argv(), "tasks", "--json", "--backend", store, "watch", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    ) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(3)]  # each line is written at once (flushed)
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=20)
            assert process.returncode == 0, errors
        finally:
            if process.poll() is None:
                process.kill()
    documents = [json.loads(line) for line in lines]
    first = documents[0]
    assert first["total"] == {"pending": 3, "active": 0, "succeeded": 1, "dead": 1, "cancelled": 0}
    assert first["throughput"] is None  # one sample so far
    assert documents[2]["throughput"] == {"succeeded_per_s": 0.0, "dead_per_s": 0.0, "window_s": 10.0}
    assert [row["label"] for row in first["recent_failures"]].count("requeued") == 1
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)


def test_debug_tracebacks_show_the_event_loops_frames_by_place_only() -> None:
    password = "-".join(["Sw33p", "Mark42"])  # built, so that no code line a frame shows holds it
    url = f"redis://worker:{password}@127.0.0.1:1/0"

    async def open_the_store() -> None:
        raise ConnectionError(f"cannot reach {url}")

    with pytest.raises(ConnectionError) as caught:
        asyncio.run(open_the_store())
    out = io.StringIO()
    _print_error(Console(file=out, width=200, color_system=None), "cannot open", True, caught.value, url)
    text = out.getvalue()
    # One block per frame: its place (file:line in function), then its code unless it is suppressed.
    blocks = re.split(r"(?m)^(?=│ \S+\.py:\d+ in )", text)[1:]
    loop_blocks = [block for block in blocks if "/asyncio/" in block.splitlines()[0]]
    ours = [block for block in blocks if "in open_the_store" in block.splitlines()[0]]
    assert loop_blocks, text  # asyncio.run's frames are listed...
    assert all("❱" not in block for block in loop_blocks), text  # ...without their code
    assert len(ours) == 1, text
    assert "❱" in ours[0], text  # the frame that raised, with its code
    assert "raise ConnectionError" in ours[0], text
    assert password not in text
    assert "***" in text
