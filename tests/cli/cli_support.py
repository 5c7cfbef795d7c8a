"""Helpers of the CLI tests: run the ``lifecycle`` command in this process (``lifecycle.cli.main(argv)``
with its output captured) or, for the few smoke tests that need a real process (signals, a terminal), as
a subprocess; and put tasks in known states on a backend through the Backend protocol (so every backend is
seeded the same way, without running a worker)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from lifecycle.asynctask import Backend, JSONEncoding, NewTask, Settlement, TaskState, backend_from_url
from lifecycle.cli import main

ENCODING = JSONEncoding()

#: The terminal every CLI run sees: wide (tables are not cut), no colours.
TERMINAL = {"COLUMNS": "160", "LINES": "50", "NO_COLOR": "1", "TERM": "dumb"}


def lifecycle_argv() -> list[str]:
    """The command that starts ``lifecycle`` in a subprocess."""
    script = Path(sys.executable).with_name("lifecycle")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lifecycle.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: a fixed, wide terminal width so tables do not truncate."""
    env = {key: value for key, value in os.environ.items() if key not in ("LIFECYCLE_TASKS_BACKEND",)}
    env.update(TERMINAL)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    """How a ``lifecycle`` run ended: its exit status and what it wrote."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def in_directory(path: Path | None) -> Iterator[None]:
    """Work in ``path`` (as a user running the command there) and afterwards restore the current directory,
    ``sys.path`` and the environment, and forget the modules imported from ``path`` (a test's app), so
    nothing of one run leaks into the next."""
    cwd, saved_path, saved_environ = os.getcwd(), list(sys.path), dict(os.environ)
    before = set(sys.modules)
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = saved_path
        os.environ.clear()
        os.environ.update(saved_environ)
        root = os.path.realpath(path or cwd)
        for name in set(sys.modules) - before:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if os.path.realpath(module_file).startswith(root + os.sep):
                del sys.modules[name]


def lifecycle(*args: str, cwd: Path | None = None) -> Result:
    """Run ``lifecycle ARGS`` in this process (``lifecycle.cli.main``) in ``cwd``, on a wide terminal without
    colours and without ``$LIFECYCLE_TASKS_BACKEND``; its stdout and stderr are captured."""
    out, err = io.StringIO(), io.StringIO()
    with in_directory(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.environ.pop("LIFECYCLE_TASKS_BACKEND", None)
        os.environ.update(TERMINAL)
        try:
            status = main(list(args))
        except SystemExit as exit:  # argparse refusing an option
            status = exit.code if isinstance(exit.code, int) else 2
    return Result(status, out.getvalue(), err.getvalue())


def lifecycle_json(*args: str, cwd: Path | None = None) -> Any:
    """Run a read command with ``--json`` and return the parsed output (asserting exit status 0)."""
    result = lifecycle(*args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass
class Seeded:
    """The ids of the tasks :func:`seed` stored, by state."""

    succeeded: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def failure_text(message: str) -> str:
    """A stored error as the engine writes it: a traceback ending with the exception line."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/srv/app/jobs.py", line 12, in boom\n'
        f'    raise ValueError("{message}")\n'
        f"ValueError: {message}"
    )


async def seed_async(
    backend: Backend,
    *,
    succeeded: int = 0,
    dead: Sequence[str] = (),
    pending: int = 0,
    queue: str = "default",
    prefix: str = "t",
    finished_at: float | None = None,
) -> Seeded:
    """Store ``succeeded`` tasks that returned ``i * 2``, one dead task per message in ``dead`` and
    ``pending`` tasks due in an hour, on an opened ``backend``."""
    # A task finished long ago was enqueued (and is indexed) long ago as well.
    now = time.time() if finished_at is None else finished_at - 1.0
    done_at = now if finished_at is None else finished_at
    seeded = Seeded()

    def task(task_id: str, name: str, arg: int, run_at: float) -> NewTask:
        return NewTask(
            id=task_id,
            name=name,
            queue=queue,
            payload=ENCODING.encode((arg,)),
            max_retries=2,
            timeout=None,
            enqueued_at=now,
            run_at=run_at,
        )

    finished = [task(f"{prefix}-ok-{i}", "app.ok", i, now) for i in range(succeeded)]
    failing = [task(f"{prefix}-dead-{i}", "app.boom", i, now) for i in range(len(dead))]
    if finished or failing:
        await backend.enqueue_many([*finished, *failing])
        claimed = await backend.claim([queue], len(finished) + len(failing), now=now, lease_until=now + 60)
        assert len(claimed) == len(finished) + len(failing), "the seed tasks were not all claimable"
        messages = dict(zip([t.id for t in failing], dead, strict=True))
        settlements = []
        for item in claimed:
            record = item.record
            if record.id in messages:
                settlements.append(
                    Settlement(
                        record.id,
                        item.token,
                        TaskState.DEAD,
                        at=done_at,
                        error=failure_text(messages[record.id]),
                    )
                )
                seeded.dead.append(record.id)
            else:
                arg = ENCODING.decode(record.payload)[0]
                settlements.append(
                    Settlement(
                        record.id,
                        item.token,
                        TaskState.SUCCEEDED,
                        at=done_at,
                        result=ENCODING.encode(arg * 2),
                    )
                )
                seeded.succeeded.append(record.id)
        assert not await backend.settle(settlements)
    later = [task(f"{prefix}-later-{i}", "app.ok", 100 + i, time.time() + 3600) for i in range(pending)]
    if later:
        seeded.pending = await backend.enqueue_many(later)
    return seeded


def seed(url: str, **options: Any) -> Seeded:
    """:func:`seed_async` on the backend at ``url`` (opened and closed here, on asyncio)."""

    async def main() -> Seeded:
        backend = backend_from_url(url)
        await backend.open()
        try:
            return await seed_async(backend, **options)
        finally:
            await backend.close()

    result: Seeded = anyio.run(main, backend="asyncio")
    return result


def state_of(url: str, task_id: str) -> TaskState | None:
    """The stored state of ``task_id`` at ``url`` (``None`` when there is no such task)."""

    async def main() -> TaskState | None:
        backend = backend_from_url(url)
        await backend.open()
        try:
            record = await backend.get(task_id)
            return None if record is None else record.state
        finally:
            await backend.close()

    result: TaskState | None = anyio.run(main, backend="asyncio")
    return result
