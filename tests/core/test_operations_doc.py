"""The examples of docs/operations.md, run as written.

The restart-policy example: a change follower restarted whenever its stream ends and a poller on a schedule
keep the service running and ready. The restart backoff runs on the manager's fake clock (``fake_timing``),
so twenty restarts take no real time. The logging recipe: a service under lifecycle.run writes one JSON
object per line, a traceback and a multi-line message included, passwords masked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

import lifecycle
from tests.core.fake_timing import FakeTiming

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
STREAMS = 20


def restart_example() -> str:
    """The first Python block of the "Restart policies" section."""
    section = OPERATIONS.read_text().split("## Restart policies", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S)
    assert code is not None, "docs/operations.md has no example under 'Restart policies'"
    return code.group(1)


class Consumer:
    async def initialize(self) -> None:
        pass

    async def execute(self) -> None:
        await anyio.sleep_forever()

    async def cleanup(self) -> None:
        pass


async def test_the_documented_restart_example_keeps_the_service_running_and_ready() -> None:
    timing = FakeTiming()  # backoff sleeps return at once and move the fake clock
    manager = lifecycle.TaskManager(name="docs", **timing.seams())
    streams = 0
    polls = 0
    streaming = anyio.Event()

    async def follow_changes() -> None:
        nonlocal streams
        streams += 1
        if streams == STREAMS:
            streaming.set()
            await anyio.sleep_forever()  # the last stream stays open until the shutdown
        timing.now += 600  # each stream lasts ten minutes before the server closes it
        await anyio.lowlevel.checkpoint()

    async def poll() -> None:
        nonlocal polls
        polls += 1

    namespace: dict[str, Any] = {
        "manager": manager,
        "Consumer": Consumer,
        "follow_changes": follow_changes,
        "poll": poll,
    }
    exec(compile(restart_example(), str(OPERATIONS), "exec"), namespace)

    health: list[lifecycle.Health] = []

    async def stop_when_streaming() -> None:
        await streaming.wait()
        health.append(manager.health())
        manager.shutdown()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_streaming)
            await manager.run()  # raises TaskManagerError if the example stops the service
    assert (health[0].ready, health[0].live) == (True, True), health
    assert streams == STREAMS
    assert polls >= 1
    [row] = [row for row in manager.status() if row.name == "changes"]
    assert row.restarts == STREAMS - 1
    assert row.error is None


def logging_recipe() -> str:
    """The Python block of the "Logging in containers" section."""
    section = OPERATIONS.read_text().split("## Logging in containers", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S)
    assert code is not None, "docs/operations.md has no example under 'Logging in containers'"
    return code.group(1)


SERVICE_AFTER_THE_RECIPE = """
import lifecycle

async def fails() -> None:
    logging.getLogger("lifecycle").warning("connecting to postgresql://app:hunter2@db/shop\\nsecond line")
    raise ValueError("kaboom")

manager = lifecycle.TaskManager(name="docs")
manager.add_execute_task("bad", fails, lifecycle.TaskType.ERROR)
raise SystemExit(lifecycle.run(manager))
"""


def test_the_documented_logging_recipe_writes_one_json_object_per_line() -> None:
    script = logging_recipe() + "\n" + SERVICE_AFTER_THE_RECIPE
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    [warning] = [r for r in records if r["message"].startswith("connecting to")]
    assert warning["message"] == "connecting to postgresql://app:***@db/shop\nsecond line"
    [failure] = [r for r in records if r["message"].startswith("docs: task 'bad' failed in execute")]
    assert failure["level"] == "ERROR"
    assert "ValueError: kaboom" in failure["exception"]
    assert records[-1]["message"].endswith("1 task error: bad in execute (ValueError)")
