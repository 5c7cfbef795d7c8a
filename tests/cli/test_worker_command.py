"""`lifecycle worker MODULE:ATTR`: a real worker process runs the tasks of its queues, stops cleanly on
SIGINT (exit 0), and refuses targets that are not an executing AsyncTasks with a clear error (exit 2)."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

import anyio
import pytest

from tests.cli.cli_support import cli_env, lifecycle, lifecycle_argv

APP = textwrap.dedent(
    """
    from lifecycle.asynctask import AsyncTasks, SQLiteBackend

    def build(execution: bool = True) -> AsyncTasks:
        tasks = AsyncTasks(
            SQLiteBackend("jobs.db", poll_interval=0.05), execution=execution, queues=["default"]
        )

        @tasks.register(name="jobs.double")
        async def double(x: int) -> int:
            return x * 2

        return tasks

    tasks = build()
    producer = build(execution=False)
    not_tasks = 42
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "jobs_app.py").write_text(APP)
    return tmp_path


async def _enqueue(project: Path, queue: str, *values: int) -> list[str]:
    from lifecycle.asynctask import AsyncTasks, SQLiteBackend

    async with AsyncTasks(SQLiteBackend(str(project / "jobs.db")), execution=False) as producer:
        return [await producer.enqueue("jobs.double", value, queue=queue) for value in values]


@pytest.mark.parametrize("async_library", ["asyncio", "trio"])
def test_worker_runs_only_its_queues_and_stops_on_sigint(project: Path, async_library: str) -> None:
    wanted = anyio.run(_enqueue, project, "high", 1, 2, 3)
    other = anyio.run(_enqueue, project, "low", 4)
    process = subprocess.Popen(
        [
            *lifecycle_argv(),
            "worker",
            "jobs_app:tasks",
            "--concurrency",
            "2",
            "--queue",
            "high",
            "--backend",
            async_library,
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:

        async def results() -> list[object]:
            from lifecycle.asynctask import AsyncTasks, SQLiteBackend

            backend = SQLiteBackend(str(project / "jobs.db"), poll_interval=0.05)
            async with AsyncTasks(backend, execution=False, poll_interval=0.05) as reader:
                done = [await reader.wait(task_id, timeout=30) for task_id in wanted]
                untouched = await reader.info(other[0])
                assert untouched is not None
                assert untouched.state.value == "pending"
                return [info.result for info in done]

        assert anyio.run(results) == [2, 4, 6]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "queues high, concurrency 2, 1 registered task(s)" in stderr
    assert "shutting down gracefully" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("jobs_app:not_tasks",), "is an int, not a lifecycle.asynctask.AsyncTasks"),
        (("jobs_app:producer",), "was built with execution=False"),
        (("jobs_app:tasks", "--concurrency", "0"), "--concurrency must be at least 1"),
        (("jobs_app:tasks", "--queue", "a=2", "--queue", "b"), "give every --queue a weight"),
        (("jobs_app:tasks", "--queue", "a=x"), "the weight must be a positive integer"),
        (("jobs_app:tasks", "--queue", "a=0"), "the weight must be a positive integer, as in a=3"),
        (("jobs_app:tasks", "--queue", "=3"), "--queue =3: the queue name must be a non-empty string"),
        (("jobs_app:tasks", "--queue", ""), "--queue NAME must be a non-empty string"),
        (("missing_module:tasks",), "there is no module named 'missing_module'"),
    ],
)
def test_bad_targets_and_options_exit_2(project: Path, args: tuple[str, ...], message: str) -> None:
    result = lifecycle("worker", *args, cwd=project)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert message in " ".join(result.stderr.split())


def test_weighted_queues_are_parsed() -> None:
    from lifecycle.cli._worker import parse_queues

    assert parse_queues(["a", "b"]) == ["a", "b"]
    assert parse_queues(["a=3", "b=1"]) == {"a": 3, "b": 1}
