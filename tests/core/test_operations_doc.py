"""The restart-policy example of docs/operations.md, run as written: a change follower restarted whenever its
stream ends and a poller on a schedule keep the service running and ready. The restart backoff runs on the
manager's fake clock (``fake_timing``), so twenty restarts take no real time."""

from __future__ import annotations

import re
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
