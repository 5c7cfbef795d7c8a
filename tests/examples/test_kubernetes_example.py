"""examples/kubernetes_service.py as a real process: probes over HTTP, a restart, SIGTERM and the drain.

The test follows the service's log lines (stderr) and never sleeps: each step waits for the line that says
the service got there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

EXAMPLE = Path(__file__).parents[2] / "examples" / "kubernetes_service.py"


class Log:
    """The service's stderr, line by line, awaitable."""

    def __init__(self, process: Process) -> None:
        assert process.stderr is not None
        self._stream = TextReceiveStream(process.stderr)
        self._buffer = ""
        self.lines: list[str] = []

    async def until(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (regex); at most 20 s."""
        regex = re.compile(pattern)
        with anyio.fail_after(20):
            while True:
                while "\n" in self._buffer:
                    line, self._buffer = self._buffer.split("\n", 1)
                    self.lines.append(line)
                    found = regex.search(line)
                    if found:
                        return found
                try:
                    self._buffer += await self._stream.receive()
                except anyio.EndOfStream:
                    pytest.fail(f"the service ended before logging {pattern!r}:\n" + "\n".join(self.lines))

    async def rest(self) -> None:
        async for chunk in self._stream:
            self._buffer += chunk
        self.lines.extend(self._buffer.splitlines())


async def get(port: int, path: str) -> tuple[int, str]:
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            data = b""
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


async def test_probes_restart_and_drain_of_the_kubernetes_example(anyio_backend: str) -> None:
    backend = anyio_backend  # the service runs on the same backend as the test
    command = [
        sys.executable,
        str(EXAMPLE),
        "--health-port",
        "0",
        "--drain-delay",
        "3",
        "--simulate-crash",
        "--backend",
        backend,
    ]
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    async with await anyio.open_process(command, env=env) as process:
        log = Log(process)
        try:
            port = int((await log.until(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
            await log.until(r"task 'consumer' failed: restarting in")
            await log.until(r"orders: ready: every task is initialized")  # back after the restart
            assert await get(port, "/readyz") == (200, "ready\n")
            assert await get(port, "/livez") == (200, "ok\n")
            status, body = await get(port, "/status")
            document = json.loads(body)
            rows = {row["name"]: row for row in document["tasks"]}
            assert list(rows) == ["health", "database", "consumer"]
            assert rows["consumer"]["restarts"] == 1
            assert rows["consumer"]["last_error"] == "ConnectionError: message broker connection reset"
            status, body = await get(port, "/metrics")
            assert status == 200
            assert 'lifecycle_task_restarts_total{manager="orders",task="consumer"} 1.0' in body

            process.send_signal(signal.SIGTERM)
            await log.until(r"orders: draining: ")
            assert await get(port, "/readyz") == (503, "not ready: draining (shutting down)\n")
            assert (await get(port, "/livez"))[0] == 200
            with anyio.fail_after(30):
                await log.rest()
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    assert returncode == 0, "\n".join(log.lines)
    text = "\n".join(log.lines)
    order = [
        "orders: draining:",
        "orders: drained:",
        "task 'database' cleaning up",
        "database connection closed",
        "task 'health' cleaning up",
        "orders: stopped",
    ]
    positions = [text.index(step) for step in order]
    assert positions == sorted(positions), text
