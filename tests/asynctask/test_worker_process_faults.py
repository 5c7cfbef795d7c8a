"""A real worker process (``lifecycle.run``): a task raising ``KeyboardInterrupt`` or calling ``sys.exit`` is
that task's failure and the process keeps running; a real SIGINT/SIGTERM still stops it gracefully."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from lifecycle.asynctask import AsyncTasks, Call, TaskRecord, TaskState, backend_from_url
from tests.asynctask.procs import Workers

pytestmark = pytest.mark.slow


def enqueue(url: str, calls: list[Call]) -> list[str]:
    async def main() -> list[str]:
        async with AsyncTasks(backend_from_url(url), execution=False) as tasks:
            return await tasks.enqueue_many(calls)

    return anyio.run(main)


def stored(url: str) -> dict[str, TaskRecord]:
    async def main() -> dict[str, TaskRecord]:
        backend = backend_from_url(url)
        await backend.open()
        try:
            return {record.id: record for record in await backend.list_records(limit=1000)}
        finally:
            await backend.close()

    return anyio.run(main)


def wait_until_finished(url: str, ids: list[str], timeout: float = 60.0) -> dict[str, TaskRecord]:
    """Poll the store (the truth across processes) until every task of ``ids`` is finished."""
    deadline = time.monotonic() + timeout
    while True:
        records = stored(url)
        if all(records[task_id].state.is_final for task_id in ids):
            return records
        assert time.monotonic() < deadline, {i: records[i].state.value for i in ids}
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("library", "signum"), [("asyncio", signal.SIGTERM), ("trio", signal.SIGINT)], ids=["asyncio", "trio"]
)
def test_a_task_raising_keyboard_interrupt_fails_alone_and_a_real_signal_still_stops_the_worker(
    tmp_path: Path, library: str, signum: signal.Signals
) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    with Workers(url, tmp_path / "out") as workers:
        worker = workers.start(backend=library, lease=5.0)
        workers.wait_for("ready", worker=worker.name)
        interrupt, exits, fine = enqueue(
            url,
            [
                Call("procs.interrupt", "ki", max_retries=1),
                Call("procs.exit_in_thread", "exit", max_retries=0),
                Call("procs.record", "fine"),
            ],
        )
        records = wait_until_finished(url, [interrupt, exits, fine])
        assert worker.alive(), worker.diagnostics()
        assert (records[interrupt].state, records[interrupt].attempts) == (TaskState.DEAD, 2)
        assert "KeyboardInterrupt: raised by task ki" in (records[interrupt].last_error or "")
        assert records[exits].state is TaskState.DEAD
        assert "SystemExit: sys.exit from task exit" in (records[exits].last_error or "")
        assert (records[fine].state, records[fine].attempts) == (TaskState.SUCCEEDED, 1)

        later = enqueue(url, [Call("procs.record", "later")])
        workers.wait_for("ran", key="later", worker=worker.name)
        os.kill(worker.pid, signum)  # the real signal: the signal policy's graceful stop
        assert worker.wait() == 0, worker.diagnostics()
        assert workers.wait_for("exit", worker=worker.name)["code"] == 0
    assert stored(url)[later[0]].state is TaskState.SUCCEEDED
