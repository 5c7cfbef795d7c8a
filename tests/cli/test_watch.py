"""`lifecycle tasks watch` under a pseudo-terminal: the rendered screen shows the counts, the throughput and
the recent failures, follows changes made while it runs, and Ctrl-C (SIGINT) ends it with status 0."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

from tests.cli.cli_support import lifecycle_argv, seed

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\r")


class Screen:
    """The output of a process on a pseudo-terminal, read as it comes, with escape sequences removed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.text = ""

    def wait_for(self, *needles: str, timeout: float = 20.0) -> str:
        """Read until every needle appeared after this call started; return the text read meanwhile."""
        start = len(self.text)
        deadline = time.monotonic() + timeout
        while not all(needle in self.text[start:] for needle in needles):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [needle for needle in needles if needle not in self.text[start:]]
                raise AssertionError(f"{missing} not on screen; it shows:\n{self.text[-3000:]}")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self._fd, 65536)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the process ended; {needles} not on screen:\n{self.text[-3000:]}")
                self.text += _ANSI.sub(b"", chunk).decode("utf-8", errors="replace")
        return self.text[start:]


def test_watch_renders_counts_throughput_and_failures_live(url: str) -> None:
    seed(url, succeeded=2, dead=["disk full"], prefix="a")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [*lifecycle_argv(), "tasks", "--backend", url, "watch", "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    screen = Screen(master)
    try:
        first = screen.wait_for("tasks per queue and state", "recent failures", "ValueError: disk full")
        assert "a-dead-0" in first
        screen.wait_for("/s succeeded")  # two samples: throughput is measured

        seed(url, succeeded=3, dead=["printer on fire"], prefix="b")
        later = screen.wait_for("ValueError: printer on fire", "b-dead-0")
        assert "retrying" not in later
        # the counts row of the default queue now reads 5 succeeded and 2 dead out of 7
        screen.wait_for("│ default │       0 │      0 │         5 │    2 │         0 │     7 │")

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_watch_of_an_empty_store(url: str) -> None:
    seed(url)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen(
        [*lifecycle_argv(), "tasks", "--backend", url, "watch", "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm"},
        close_fds=True,
    )
    os.close(slave)
    screen = Screen(master)
    try:
        screen.wait_for("no tasks are stored yet", "no recent failures")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
