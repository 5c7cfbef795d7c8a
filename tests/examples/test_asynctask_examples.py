"""The async-task examples, run for real as their README commands run them: each in its own process."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow

_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_example(name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` to completion and return its output."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_ENV,
        check=False,
    )


class Background:
    """An example process left running; its stdout lines are collected by a thread."""

    def __init__(self, name: str, *args: str, log: Path, lines: queue.Queue[str] | None = None) -> None:
        self.log = log  # stderr (the manager's log lines) goes to a file: a full pipe would block the child
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(EXAMPLES / name), *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=_ENV,
            )
        self.lines: queue.Queue[str] = lines if lines is not None else queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Return the next line containing ``text`` (earlier lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; got {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def stop(self) -> tuple[int, str]:
        """SIGTERM (a graceful stop), then return the exit code and stderr."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code, self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Kill it if it still runs (test teardown)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """Started background examples; whatever still runs at the end is killed."""
    started: list[Background] = []
    yield started
    for process in started:
        process.kill()


def states(db: Path) -> dict[str, int]:
    """How many tasks of the example database are in each state."""
    with closing(sqlite3.connect(db, isolation_level=None)) as raw:
        return dict(raw.execute("SELECT state, count(*) FROM lifecycle_tasks GROUP BY state").fetchall())


def test_tasks_sqlite_runs_everything_and_stops_by_itself(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    result = run_example("tasks_sqlite.py", "--db", str(db))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for user in ("ada", "grace", "linus", "guido"):
        assert f"sent a welcome email to {user}" in out
    assert "warehouse busy on attempt 1, will retry" in out
    assert "report for week 42: built on attempt 2" in out
    summary = out.split("what ran:")[1].splitlines()
    assert sum("succeeded" in line for line in summary) == 5, out
    assert "result={'week': 42, 'orders': 1234}" in out
    assert states(db) == {"succeeded": 5}


def test_tasks_sqlite_uses_a_temporary_database_by_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "tasks_sqlite.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "what ran:" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the default run must leave no file behind"


def test_producer_and_workers_share_one_sqlite_file(tmp_path: Path, background: list[Background]) -> None:
    db = tmp_path / "shared.db"
    # Enqueue-only, with no worker running: the tasks wait in the file.
    produced = run_example("producer.py", "--db", str(db), "--count", "6")
    assert produced.returncode == 0, produced.stderr
    assert f"enqueued 6 tasks into {db}" in produced.stdout
    assert states(db) == {"pending": 6}

    shared: queue.Queue[str] = queue.Queue()  # both workers' lines, in arrival order
    for number in range(2):
        log = tmp_path / f"worker{number}.log"
        worker = Background("worker.py", "--db", str(db), "--concurrency", "2", log=log, lines=shared)
        background.append(worker)
        worker.wait_for("serving")
    # The first worker may finish tasks before the second one serves: keep the lines read meanwhile.
    done = {line.split()[1] for worker in background for line in worker.seen if line.startswith("resized ")}
    while len(done) < 6:
        done.add(background[0].wait_for("resized ").split()[1])
    assert done == {f"photo-{n}.png" for n in range(1, 7)}

    # With workers running, a producer can wait for the results.
    waited = run_example("producer.py", "--db", str(db), "--count", "2", "--wait")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.count("succeeded: {'path': 'photo-") == 2, waited.stdout

    for worker in background:
        code, stderr = worker.stop()
        assert code == 0, stderr
    assert states(db) == {"succeeded": 8}
