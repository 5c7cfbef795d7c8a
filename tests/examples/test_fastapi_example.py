"""examples/fastapi_service.py as a real process against the machine's PostgreSQL (a schema of its own):
requests with httpx, the welcome tasks enqueued in each request's transaction and run by the worker, then a
SIGTERM in the middle of a request: the request completes, the exit status is 0 and the parts stop in
reverse (the HTTP server, then the worker, then the pool, then the probes).

The test follows the service's log lines (stderr) and never sleeps: each step waits for the line that says
the service got there.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from psycopg import sql

from lifecycle.asynctask import AsyncTasks, TaskState
from lifecycle.asynctask.postgres import PostgresBackend

EXAMPLE = Path(__file__).parents[2] / "examples" / "fastapi_service.py"
README = Path(__file__).parents[2] / "README.md"
WAIT = 30.0

pytestmark = pytest.mark.postgres


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # PostgreSQL (the example's and the test's checks) is asyncio-only


@pytest.fixture
async def schema(postgres_dsn: str, unique_name: str) -> AsyncIterator[str]:
    """A schema for this test only, dropped at the end (with the example's tables and tasks in it)."""
    yield unique_name
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique_name)))


class Log:
    """The service's stderr, line by line, awaitable."""

    def __init__(self, process: Process) -> None:
        assert process.stderr is not None
        self._stream = TextReceiveStream(process.stderr)
        self._buffer = ""
        self.lines: list[str] = []

    async def until(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (regex)."""
        regex = re.compile(pattern)
        with anyio.fail_after(WAIT):
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

    def index(self, text: str) -> int:
        found = [i for i, line in enumerate(self.lines) if text in line]
        assert found, f"the service never logged {text!r}:\n" + "\n".join(self.lines)
        return found[0]


async def test_the_fastapi_example_serves_runs_its_tasks_and_stops_cleanly_mid_request(
    postgres_dsn: str, schema: str
) -> None:
    command = [
        sys.executable,
        str(EXAMPLE),
        "--dsn",
        postgres_dsn,
        "--schema",
        schema,
        "--port",
        "0",
        "--health-port",
        "0",
        "--drain-delay",
        "0.5",
    ]
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    async with await anyio.open_process(command, env=env) as process:
        log = Log(process)
        try:
            health = int((await log.until(r"health server listening on http://127\.0\.0\.1:(\d+)")).group(1))
            api = int(
                (await log.until(r"ASGI server \(hypercorn\) listening on http://127\.0\.0\.1:(\d+)")).group(
                    1
                )
            )
            await log.until(r"shop: ready: every task is initialized")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=WAIT) as client:
                users = []
                for n in range(3):
                    response = await client.post("/users", json={"email": f"user{n}@example.com"})
                    assert response.status_code == 200, response.text
                    users.append(response.json()["id"])
                duplicate = await client.post("/users", json={"email": "user0@example.com"})
                assert duplicate.status_code == 409, "the transaction is rolled back, its task with it"

                welcomed: set[int] = set()
                while welcomed != set(users):  # the worker runs them in any order
                    welcomed.add(int((await log.until(r"welcomed user (\d+) \(attempt 1\)")).group(1)))
                for user_id in users:
                    assert (await client.get(f"/users/{user_id}")).json()["welcomed"] is True

                async with anyio.create_task_group() as group:
                    reports: list[httpx.Response] = []

                    async def slow_report() -> None:
                        reports.append(await client.get("/report", params={"seconds": 1.5}))

                    group.start_soon(slow_report)
                    await log.until(r"report: started")
                    process.send_signal(signal.SIGTERM)
                    await log.until(r"shop: draining: ")
                    async with httpx.AsyncClient() as probe:
                        readyz = await probe.get(f"http://127.0.0.1:{health}/readyz")
                    assert (readyz.status_code, readyz.text) == (503, "not ready: draining (shutting down)\n")
                [report] = reports
                assert (report.status_code, report.json()) == (200, {"users": 3}), (
                    "the request in flight completes"
                )
            with anyio.fail_after(WAIT):
                await log.rest()
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    text = "\n".join(log.lines)
    assert returncode == 0, text
    order = [
        log.index("received SIGTERM"),
        log.index("shop: draining:"),
        log.index("report: done"),
        log.index(f"ASGI server http://127.0.0.1:{api} stopped"),
        log.index("task 'tasks' cleaning up"),
        log.index("database: pool closed"),
        log.index("task 'health' cleaning up"),
        log.index("shop: stopped"),
    ]
    assert order == sorted(order), text
    assert "Traceback" not in text, text

    tasks = AsyncTasks(PostgresBackend(postgres_dsn, schema=schema), execution=False)
    async with tasks:
        stats = await tasks.stats()
    assert stats["default"].succeeded == 3
    assert sum(getattr(stats["default"], state.value) for state in TaskState) == 3, (
        "no task for the duplicate"
    )


def test_the_readme_shows_this_example_verbatim_with_its_command() -> None:
    readme = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert any("examples/fastapi_service.py" in command for command in commands[2:])
    blocks = re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "the second example of the README is the FastAPI service"
    source = EXAMPLE.read_text()
    position = 0
    for line in blocks[1].splitlines():
        if not line.strip() or line.strip() == "...":
            continue
        found = source.find(line, position)
        assert found >= 0, f"README line not in examples/fastapi_service.py (in this order): {line!r}"
        position = found + len(line)
