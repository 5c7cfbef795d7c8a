"""lifecycle.run's signal policy, with real signals sent to a child process, on asyncio and trio.

The test synchronises on lines the child prints (it reads the child's stdout); it never sleeps.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("signal_child.py")
BACKENDS = ["asyncio", "trio"]
TIMEOUT = 30.0


def _stuck_line(marker: str = "# STUCK-HERE", function: str = "stuck_execute") -> str:
    source = CHILD.read_text().splitlines()
    number = next(i for i, line in enumerate(source, 1) if line.rstrip().endswith(marker))
    return f"{CHILD}:{number} in {function}"


class Child:
    """A running signal_child.py whose stdout lines can be awaited one by one."""

    def __init__(self, backend: str, scenario: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(CHILD), backend, scenario],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    def expect(self, text: str) -> None:
        """Block until a stdout line containing ``text`` arrives (the child printed it)."""
        while True:
            try:
                line = self._queue.get(timeout=TIMEOUT)
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"child never printed {text!r}; stdout so far: {self.lines}")
            if line is None:
                pytest.fail(
                    f"child exited before printing {text!r}; stdout: {self.lines}; stderr: {self.stderr}"
                )
            self.lines.append(line)
            if text in line:
                return

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self) -> int:
        """Wait for the exit; collect the rest of stdout; return the exit status."""
        status = self.process.wait(timeout=TIMEOUT)
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        self.close()
        return status

    def close(self) -> None:
        """Kill the child if it still runs, and release its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=TIMEOUT)
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def ordered(self, *texts: str) -> list[int]:
        return [next(i for i, line in enumerate(self.lines) if text in line) for text in texts]


StartChild = Callable[[str, str], "Child"]


@pytest.fixture
def children() -> Iterator[StartChild]:
    started: list[Child] = []

    def start(backend: str, scenario: str) -> Child:
        child = Child(backend, scenario)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_shuts_down_gracefully_with_cleanup_in_reverse(
    backend: str, signum: int, children: StartChild
) -> None:
    child = children(backend, "graceful")
    child.expect("EVENT running")
    child.send(signum)
    child.expect("EVENT shutdown requested")
    assert child.finish() == 0
    cleanups = child.ordered("cleanup c", "cleanup b", "cleanup a", "EXIT 0")
    assert cleanups == sorted(cleanups)
    # No handler was configured, so lifecycle.run set up rich logging on stderr.
    assert "received" in child.stderr
    assert "shutting down" in child.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_signal_cancels_the_running_cleanup_and_the_rest_still_run(
    backend: str, children: StartChild
) -> None:
    child = children(backend, "second")
    child.expect("EVENT running")
    child.send(signal.SIGINT)
    child.expect("cleanup b waiting")
    child.send(signal.SIGINT)
    child.expect("cleanup b cancelled")
    assert child.finish() == 1  # the interrupted cleanup is reported as a failure
    order = child.ordered("cleanup c", "cleanup b waiting", "cleanup b cancelled", "cleanup a", "EXIT 1")
    assert order == sorted(order)
    assert any("received SIGINT again: cancelled 1 running cleanup" in line for line in child.lines)
    assert any(line.startswith("LOG ERROR child: task 'b' failed in cleanup") for line in child.lines)
    assert child.stderr == "", "the application configured logging: no failure panel besides its log"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_third_signal_prints_the_stuck_report_and_exits_at_once(
    backend: str, signum: int, children: StartChild
) -> None:
    child = children(backend, "third")
    child.expect("EVENT running")
    child.send(signum)
    child.expect("EVENT shutdown requested")
    child.send(signum)
    child.expect("again: no cleanup is running yet")
    child.send(signum)
    assert child.finish() == 128 + signum
    assert not any("cleanup" in line and "LOG" not in line for line in child.lines), "no cleanup ran"
    assert not any(line.startswith("EXIT") for line in child.lines), "os._exit: no normal return"
    name = signal.Signals(signum).name
    assert f"received {name} a third time: exiting at once" in child.stderr
    assert "task 'c' (STRICT) still in execute" in child.stderr
    assert _stuck_line() in child.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_timeout_with_stuck_tasks_exits_with_status_1_and_the_report(
    backend: str, children: StartChild
) -> None:
    child = children(backend, "timeout")
    child.expect("EVENT running")
    child.send(signal.SIGTERM)
    assert child.finish() == 1
    output = "\n".join(child.lines)
    assert "child: shutdown stuck: 1 task(s) still running 0.2 s" in output
    assert _stuck_line() in output
    assert "shutdown stuck" not in child.stderr, "already logged: not printed twice"
    assert not any(line.startswith("EXIT") for line in child.lines)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_failure_returns_1_after_logging_it_and_why_the_process_exits(
    backend: str, children: StartChild
) -> None:
    child = children(backend, "failure")
    assert child.finish() == 1
    assert child.lines[-1] == "EXIT 1"
    order = child.ordered("cleanup c", "cleanup b", "cleanup a")
    assert order == sorted(order)
    report = child.stderr  # a pipe: plain log lines (tests/core/test_run_logging.py has the details)
    assert "child: task 'bad' failed in execute after " in report
    assert "ValueError('kaboom')" in report
    assert "fail_soon" in report  # the traceback
    assert report.count("Traceback (most recent call last)") == 1
    assert report.splitlines()[-1].endswith("task manager 'child': 1 task error: bad in execute (ValueError)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_dump_signal_logs_every_task_stack_and_the_service_goes_on(
    backend: str, children: StartChild
) -> None:
    child = children(backend, "stacks")
    child.expect("EVENT running")
    for _ in range(2):  # as often as asked
        child.send(signal.SIGUSR1)
        child.expect("child: received SIGUSR1: stack report (the service goes on)")
        child.expect("task 'orders' (ERROR) still in execute")
        child.expect(_stuck_line("# ORDERS-WAIT-HERE", "waiting_for_orders"))
        child.expect("every task of the event loop")
    child.send(signal.SIGTERM)
    child.expect("EVENT shutdown requested")
    assert child.finish() == 0
    assert child.lines[-1] == "EXIT 0"
