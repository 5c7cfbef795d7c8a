"""The core examples run as real processes: service.py (by --seconds and by SIGTERM) and batch.py.

Synchronisation is on the lines the examples print (read by a thread into a queue), never on sleeps.
"""

from __future__ import annotations

import http.client
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 60.0


class Example:
    """An example script running as a child process, its output collected line by line."""

    def __init__(self, script: str, *args: str, cwd: Path) -> None:
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, into: list[str], announce: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))
            if announce:
                self._lines.put(line.rstrip("\n"))
        if announce:
            self._lines.put(None)

    def wait_for_line(self, matches: Callable[[str], bool]) -> str:
        """The first new stdout line that ``matches``; fails if the example ends or goes quiet first."""
        while True:
            try:
                line = self._lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no matching line within {TIMEOUT}s; output so far:\n{self.transcript()}")
            if line is None:
                pytest.fail(f"the example ended before printing the line; output:\n{self.transcript()}")
            if matches(line):
                return line

    def finish(self) -> int:
        """Wait for the example to exit on its own; its exit status."""
        try:
            status = self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the example did not exit within {TIMEOUT}s; output:\n{self.transcript()}")
        for reader in self._readers:
            reader.join(timeout=TIMEOUT)
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def transcript(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])


@pytest.fixture
def run_example(tmp_path: Path) -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def start(script: str, *args: str) -> Example:
        example = Example(script, *args, cwd=tmp_path)
        started.append(example)
        return example

    yield start
    for example in started:
        example.kill()


def assert_in_order(lines: list[str], *prefixes: str) -> None:
    """Each prefix starts some line, and those lines come in the given order."""
    positions = []
    for prefix in prefixes:
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert found, f"no line starts with {prefix!r} in:\n" + "\n".join(lines)
        positions.append(found[0])
    assert positions == sorted(positions), "lines out of order:\n" + "\n".join(lines)


SHUTDOWN_ORDER = (
    "database: connected",
    "http: listening on http://127.0.0.1:",
    "health: ok",
    "http: stopped listening",
    "database: disconnected",
    "service: stopped cleanly",
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_service_stops_by_itself_after_seconds(run_example: Callable[..., Example], backend: str) -> None:
    example = run_example("service.py", "--port", "0", "--seconds", "0.5", "--backend", backend)
    assert example.finish() == 0, example.transcript()
    assert_in_order(example.stdout, *SHUTDOWN_ORDER)
    assert example.stdout[-1] == "service: stopped cleanly"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_service_answers_http_and_stops_cleanly_on_sigterm(
    run_example: Callable[..., Example], backend: str
) -> None:
    example = run_example("service.py", "--port", "0", "--backend", backend)
    listening = example.wait_for_line(lambda line: line.startswith("http: listening on"))
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", listening)
    assert match, listening
    port = int(match.group(1))
    assert port != 0  # --port 0 asks for a free port; the chosen one is printed

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/probe")
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200
    assert body == "hello from the example service, visit 1\n"
    # The request was served by an execute task added while the service ran.
    example.wait_for_line(lambda line: line == "http: connection-1: GET /probe -> 200")

    example.process.send_signal(signal.SIGTERM)
    assert example.finish() == 0, example.transcript()
    assert_in_order(example.stdout, *SHUTDOWN_ORDER)
    assert any("received SIGTERM" in line for line in example.stderr), example.transcript()


def test_batch_finishes_by_itself_with_exit_status_zero(run_example: Callable[..., Example]) -> None:
    example = run_example("batch.py")
    assert example.finish() == 0, example.transcript()
    assert_in_order(example.stdout, "database: opened", "import: done", "database: closed with 12 invoice(s)")
    assert_in_order(example.stdout, "invoices: done, 12 invoice(s) written", "database: closed")
    assert example.stdout[-1] == "batch: finished with exit status 0, 12 invoice(s)"
