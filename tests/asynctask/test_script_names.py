"""A script run as ``python service.py`` names its tasks as a process importing ``service`` does, so the
README's example works split across a producer (the script) and a worker (``lifecycle worker service:tasks``),
real processes both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio

from lifecycle.asynctask import AsyncTasks, SQLiteBackend, TaskState

SERVICE = textwrap.dedent(
    """
    import enum
    import sys

    import anyio
    from lifecycle.asynctask import AsyncTasks, SQLiteBackend, TaskContext

    tasks = AsyncTasks(SQLiteBackend("tasks.db"), poll_interval=0.05)


    class Tier(enum.Enum):
        FREE = "free"
        PAID = "paid"


    @tasks.register
    async def send_welcome(ctx: TaskContext, user_id: int, tier: Tier) -> str:
        print(f"welcoming user {user_id} ({tier.value})", flush=True)
        return f"sent to {user_id}"


    async def produce() -> None:
        async with tasks:
            for user_id in range(3):
                await tasks.enqueue(send_welcome, user_id, Tier.PAID)
        print("enqueued as", tasks.task_names, flush=True)


    if __name__ == "__main__":
        anyio.run(produce)
    """
)


def test_a_script_and_a_worker_importing_it_agree_on_task_names(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(SERVICE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    produced = subprocess.run(
        [sys.executable, "service.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert produced.returncode == 0, produced.stderr
    assert "enqueued as ['service.send_welcome']" in produced.stdout

    worker = subprocess.Popen(
        [sys.executable, "-m", "lifecycle.cli", "worker", "service:tasks"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert worker.stdout is not None
    output: list[str] = []
    try:
        welcomed: set[str] = set()
        for line in worker.stdout:  # the worker's own output is the synchronisation
            output.append(line)
            if line.startswith("welcoming user"):
                welcomed.add(line.split()[2])
            if len(welcomed) == 3:
                break
        assert welcomed == {"0", "1", "2"}, "".join(output)
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=60)
        output.append(rest)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == 0, "".join(output)

    async def stored() -> list[tuple[str, TaskState, object]]:
        async with AsyncTasks(SQLiteBackend(tmp_path / "tasks.db"), execution=False) as tasks:
            return [(info.name, info.state, info.result) for info in await tasks.list()]

    assert sorted(anyio.run(stored), key=str) == [
        ("service.send_welcome", TaskState.SUCCEEDED, f"sent to {user_id}") for user_id in range(3)
    ]
