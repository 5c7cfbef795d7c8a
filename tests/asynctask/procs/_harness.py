"""Start worker processes, read their JSON lines, wait for events, kill them: the test side of the harness."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

__all__ = ["Event", "Worker", "Workers", "read_runs"]

Event = dict[str, Any]
"""One JSON line a worker printed, plus ``"worker"``: the name of the worker that printed it."""

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
_REPO_ROOT = Path(__file__).resolve().parents[3]


class Worker:
    """One worker process; a thread reads its stdout into the shared event queue of its :class:`Workers`."""

    def __init__(self, name: str, command: Sequence[str], out_dir: Path, events: queue.Queue[Event]) -> None:
        self.name = name
        self.stderr_path = out_dir / f"{name}.stderr"
        self.other_lines: list[str] = []
        # This checkout's src first: a worktree's own code, not the one its environment has installed.
        path = f"{_REPO_ROOT / 'src'}{os.pathsep}{_REPO_ROOT}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                list(command), stdout=subprocess.PIPE, stderr=stderr, env=env, text=True, bufsize=1
            )
        self._events = events
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        with stdout:
            for line in stdout:
                line = line.rstrip("\n")
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict) and "event" in event:
                    event["worker"] = self.name
                    self._events.put(event)
                else:
                    self.other_lines.append(line)
        self._events.put({"event": "eof", "worker": self.name})

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None

    def kill(self) -> None:
        """``kill -9`` the process and reap it."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown request to ``lifecycle.run``); does not wait."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit and return its exit code (raises ``TimeoutExpired``)."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code

    def diagnostics(self) -> str:
        """The worker's non-JSON output and the tail of its stderr, for assertion messages."""
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        other = "\n".join(self.other_lines[-20:])
        return (
            f"--- worker {self.name} (pid {self.process.pid}, exit {self.process.poll()}) ---\n"
            f"stdout (non-event lines):\n{other}\nstderr (tail):\n{stderr[-4000:]}"
        )


class Workers:
    """A group of worker processes on one backend URL, sharing one output directory and event stream.

    Use as a context manager: processes still running at the end are killed. ``seen`` holds every event
    received so far, in arrival order.
    """

    def __init__(self, url: str, out_dir: Path, *, python: str = sys.executable) -> None:
        self.url = url
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.workers: list[Worker] = []
        self.seen: list[Event] = []
        self._unconsumed: list[Event] = []
        self._queue: queue.Queue[Event] = queue.Queue()

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.kill()

    def start(
        self,
        name: str | None = None,
        *,
        concurrency: int = 4,
        lease: float = 2.0,
        poll_interval: float = 0.05,
        shutdown_grace: float = 5.0,
        backend: str = "asyncio",
        extra: Sequence[str] = (),
    ) -> Worker:
        """Start ``worker.py`` on this group's URL; returns at once (wait for its ``ready`` event)."""
        name = name or f"w{len(self.workers) + 1}"
        command = [
            self.python,
            str(WORKER_SCRIPT),
            "--url",
            self.url,
            "--out-dir",
            str(self.out_dir),
            "--name",
            name,
            "--concurrency",
            str(concurrency),
            "--lease",
            str(lease),
            "--poll-interval",
            str(poll_interval),
            "--shutdown-grace",
            str(shutdown_grace),
            "--backend",
            backend,
            *extra,
        ]
        worker = Worker(name, command, self.out_dir, self._queue)
        self.workers.append(worker)
        return worker

    def wait_ready(self, started: Sequence[Worker]) -> None:
        """Return once each of ``started`` is ready (started side by side, they start up in parallel)."""
        for worker in started:
            self.wait_for("ready", worker=worker.name)

    def _receive(self, deadline: float) -> Event | None:
        try:
            event = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        self.seen.append(event)
        return event

    def wait_for(
        self, event: str, *, key: str | None = None, worker: str | None = None, timeout: float = 60.0
    ) -> Event:
        """Return (and consume) the first not yet consumed event of this kind (and key / worker)."""

        def matches(candidate: Event) -> bool:
            return (
                candidate["event"] == event
                and (key is None or candidate.get("key") == key)
                and (worker is None or candidate["worker"] == worker)
            )

        for candidate in self._unconsumed:
            if matches(candidate):
                self._unconsumed.remove(candidate)
                return candidate
        deadline = time.monotonic() + timeout
        while True:
            received = self._receive(deadline)
            if received is None:
                self._fail(f"no {event!r} event (key={key!r}, worker={worker!r}) within {timeout}s")
            if matches(received):
                return received
            self._unconsumed.append(received)
            if received["event"] == "eof" and not any(w.alive() for w in self.workers):
                self._drain()
                if not any(matches(candidate) for candidate in self.seen):
                    self._fail(f"every worker exited before a {event!r} event (key={key!r})")

    def wait_until(
        self, condition: Callable[[list[Event]], bool], *, what: str, timeout: float = 60.0
    ) -> None:
        """Wait until ``condition(seen)`` holds for the events received so far."""
        deadline = time.monotonic() + timeout
        while not condition(self.seen):
            received = self._receive(deadline)
            if received is None:
                self._fail(f"timed out after {timeout}s waiting until {what}")
            self._unconsumed.append(received)

    def _drain(self) -> None:
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return
            self.seen.append(event)
            self._unconsumed.append(event)

    def keys_ran(self) -> set[str]:
        """The keys of every ``ran`` event received so far."""
        return {event["key"] for event in self.seen if event["event"] == "ran"}

    def stop_all(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM every running worker and wait for all; return the exit code of each by name."""
        for worker in self.workers:
            worker.terminate()
        return {worker.name: worker.wait(timeout) for worker in self.workers}

    def _fail(self, message: str) -> NoReturn:
        events = "\n".join(json.dumps(event) for event in self.seen[-30:])
        details = "\n".join(worker.diagnostics() for worker in self.workers)
        raise AssertionError(f"{message}\nlast events:\n{events}\n{details}")


def read_runs(out_dir: Path) -> list[tuple[str, int, int]]:
    """Every completed run recorded in ``runs.log``: ``(key, attempt, pid)`` in completion order."""
    path = out_dir / "runs.log"
    if not path.exists():
        return []
    return list(_parse_runs(path.read_text().splitlines()))


def _parse_runs(lines: list[str]) -> Iterator[tuple[str, int, int]]:
    for line in lines:
        key, attempt, pid = line.split(" ")
        yield key, int(attempt), int(pid)
