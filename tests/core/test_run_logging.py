"""What lifecycle.run writes on stderr when a task fails, read from real child processes: one line per log
event in a container (stderr a pipe), the application's own logging left alone and no rich panel then, a
rich report on a terminal (a pty), and each traceback exactly once in every case."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.core.logging_child import LONG, SECRET

CHILD = Path(__file__).with_name("logging_child.py")
SERVICE = "a-service-with-a-rather-long-name-for-the-logs"
TASK = "a-worker-with-a-long-name-too"
SUMMARY = f"task manager {SERVICE!r}: 1 task error: {TASK} in execute (RuntimeError)"
TRACEBACK = "Traceback (most recent call last)"
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# Variables that would make rich treat a pipe as a terminal (or change its width): the tests set their own.
_RICH_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS", "LINES", "TERM")


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _RICH_VARIABLES}
    env.update(extra)
    return env


def run_piped(backend: str, scenario: str) -> tuple[int, str]:
    """Run the child with stderr a pipe (as in a container); return its exit status and stderr."""
    result = subprocess.run(
        [sys.executable, str(CHILD), backend, scenario],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    return result.returncode, result.stderr


def run_on_a_terminal(backend: str, scenario: str, columns: int = 100) -> tuple[int, str]:
    """Run the child with stderr a pseudo-terminal ``columns`` wide; return its exit status and what it
    wrote there, without the colour codes."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, str(CHILD), backend, scenario],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env=_env(TERM="xterm-256color"),
        )
    finally:
        os.close(terminal)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    status = process.wait(timeout=60)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return status, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _in_traceback(line: str) -> bool:
    return line.startswith((TRACEBACK.split(" (")[0], "  ", "RuntimeError: "))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_in_a_container_each_event_is_one_whole_line_and_the_traceback_follows_once(backend: str) -> None:
    status, stderr = run_piped(backend, "default")
    assert status == 1, stderr
    lines = stderr.splitlines()
    event = re.compile(rf"{TIMESTAMP} (INFO|WARNING|ERROR) lifecycle: ")
    # Every line is a log event or a line of the one traceback: nothing was wrapped or boxed.
    strays = [line for line in lines if not event.match(line) and not _in_traceback(line)]
    assert strays == [], stderr
    [failed] = [line for line in lines if "failed in execute after" in line]
    assert event.match(failed)
    assert f"{SERVICE}: task {TASK!r} failed in execute after " in failed
    assert f"RuntimeError({LONG.strip()!r})" in failed  # the whole message, on the event's own line
    assert len(failed) > 200
    assert stderr.count(TRACEBACK) == 1
    assert lines[lines.index(failed) + 1].startswith(TRACEBACK)  # the traceback follows its event
    assert "╭" not in stderr
    assert "fail_with_a_long_message" in stderr
    # The last line says why the process exits with 1.
    assert event.match(lines[-1])
    assert lines[-1].endswith(SUMMARY)


def test_the_applications_own_logging_gets_every_line_and_no_panel_is_printed() -> None:
    status, stderr = run_piped("asyncio", "own")
    assert status == 1, stderr
    lines = stderr.splitlines()
    strays = [line for line in lines if not line.startswith("APP ") and not _in_traceback(line)]
    assert strays == [], stderr
    assert stderr.count(TRACEBACK) == 1
    assert "╭" not in stderr
    assert "(STRICT)" not in stderr  # the panel's title
    assert any(line.startswith("APP ERROR lifecycle ") and "failed in execute" in line for line in lines)
    assert lines[-1] == f"APP ERROR lifecycle {SUMMARY}"


def test_when_the_lifecycle_logger_is_silenced_the_report_still_shows_the_failure_and_its_traceback() -> None:
    status, stderr = run_piped("asyncio", "silenced")
    assert status == 1, stderr
    lines = stderr.splitlines()
    assert not [line for line in lines if line.startswith("APP ")], stderr
    assert lines[0] == f"task {TASK!r} failed in execute (STRICT):"
    assert stderr.count(TRACEBACK) == 1
    assert f"RuntimeError: {LONG.strip()}" in lines
    assert "╭" not in stderr
    assert lines[-1] == SUMMARY


def test_on_a_terminal_the_rich_report_names_the_failure_and_the_traceback_shows_once() -> None:
    status, output = run_on_a_terminal("asyncio", "default")
    assert status == 1, output
    assert output.count(TRACEBACK) == 1, output  # in the rich log, when the task failed
    assert f"╭─ task {TASK!r} failed in execute (STRICT)" in output
    assert "(its traceback is in the log above)" in output
    assert "fail_with_a_long_message" in output
    assert re.search(rf"{TIMESTAMP} INFO", output) is None  # rich log lines, not the plain format


@pytest.mark.parametrize(
    ("scenario", "stream"),
    [("secret", "pipe"), ("secret-own", "pipe"), ("secret-silenced", "pipe"), ("secret", "terminal")],
)
def test_a_password_in_a_failing_tasks_error_is_masked_in_every_log_line_and_report(
    scenario: str, stream: str
) -> None:
    if stream == "pipe":
        status, output = run_piped("asyncio", scenario)
    else:
        status, output = run_on_a_terminal("asyncio", scenario, columns=200)
    assert status == 1, output
    assert SECRET not in output, output
    assert "redis://:***@cache:6379/0" in output, output
    assert "postgresql://app:***@db.internal/app" in output, output
