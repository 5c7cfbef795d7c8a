"""Helpers of the dashboard tests: put tasks in known states through the public Backend protocol (with the
times the test chooses, so the chart of the last hour has data), run the ``lifecycle tasks web`` command as a
server process and read the URL it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from lifecycle.asynctask import (
    AsyncTasks,
    Backend,
    JSONEncoding,
    NewTask,
    Settlement,
    TaskState,
    backend_from_url,
)

T = TypeVar("T")

ENCODING = JSONEncoding()
ROOT = Path(__file__).resolve().parents[2]


def traceback_text(message: str, kind: str = "ValueError") -> str:
    """A stored error as the engine writes it: a traceback ending with the exception line."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/srv/app/jobs.py", line 41, in resize_image\n'
        "    image = decode(blob)\n"
        '  File "/srv/app/images.py", line 12, in decode\n'
        f'    raise {kind}("{message}")\n'
        f"{kind}: {message}"
    )


@dataclass
class Planned:
    """One task to store: its final (or current) state and times, relative to now in seconds."""

    id: str
    name: str
    args: tuple[Any, ...] = ()
    queue: str = "default"
    state: TaskState = TaskState.PENDING
    enqueued: float = -10.0
    finished: float = -5.0
    run_in: float = 0.0
    error: str | None = None
    result: Any = None
    max_retries: int = 2
    retrying: bool = False  # pending after a failed attempt (attempts 1, run_in seconds from now)


@dataclass
class Stored:
    """The ids stored, by state."""

    ids: dict[TaskState, list[str]] = field(default_factory=dict)

    def of(self, state: TaskState) -> list[str]:
        """The ids stored in ``state``."""
        return self.ids.get(state, [])


async def store(backend: Backend, planned: Sequence[Planned], now: float | None = None) -> Stored:
    """Store the planned tasks on an opened ``backend``: enqueue each at its time, then claim and settle
    those that are finished, active or retrying (each queue claimed at the time of its task, one by one so
    every task gets its own times)."""
    now = time.time() if now is None else now
    stored = Stored()
    for plan in sorted(planned, key=lambda p: p.enqueued):
        at = now + plan.enqueued
        waits = plan.state is TaskState.PENDING and not plan.retrying
        task = NewTask(
            id=plan.id,
            name=plan.name,
            queue=plan.queue,
            payload=ENCODING.encode(plan.args),
            max_retries=plan.max_retries,
            timeout=None,
            enqueued_at=at,
            run_at=now + plan.run_in if waits else at,
        )
        await backend.enqueue_many([task])
        if not waits:
            claimed = await backend.claim([plan.queue], 1, now=at, lease_until=now + 30)
            assert [c.record.id for c in claimed] == [plan.id], f"{plan.id} was not the one claimable task"
            token = claimed[0].token
            if plan.state is TaskState.ACTIVE:
                pass
            elif plan.retrying:
                settled = Settlement(
                    plan.id, token, TaskState.PENDING, at=at, run_at=now + plan.run_in, error=plan.error
                )
                assert not await backend.settle([settled])
            elif plan.state is TaskState.CANCELLED:
                raise AssertionError("plan cancelled tasks as pending and cancel them with the backend")
            else:
                result = None if plan.state is not TaskState.SUCCEEDED else ENCODING.encode(plan.result)
                settled = Settlement(
                    plan.id,
                    token,
                    plan.state,
                    at=now + plan.finished,
                    error=plan.error,
                    result=result,
                )
                assert not await backend.settle([settled])
        stored.ids.setdefault(plan.state, []).append(plan.id)
    return stored


def demo_plan() -> list[Planned]:
    """A store as an operator sees one: three queues, an hour of finished work, a few failures, running,
    scheduled and retrying tasks (the screenshots of docs/dashboard.md show it)."""
    plan: list[Planned] = []
    for i in range(48):
        finished = -3550 + i * 73 + (i % 5) * 9
        plan.append(
            Planned(
                f"img-{i:03d}",
                "app.jobs.resize_image",
                (f"uploads/photo-{i:03d}.png", 512),
                state=TaskState.SUCCEEDED,
                enqueued=finished - 4,
                finished=finished,
                result={"width": 512, "height": 384},
            )
        )
    for i in range(70):
        finished = -3500 + i * 49
        plan.append(
            Planned(
                f"mail-{i:03d}",
                "app.mail.send_welcome",
                (1000 + i,),
                queue="emails",
                state=TaskState.SUCCEEDED,
                enqueued=finished - 2,
                finished=finished,
            )
        )
    for i, minutes in enumerate((52, 31, 9)):
        plan.append(
            Planned(
                f"img-dead-{i}",
                "app.jobs.resize_image",
                (f"uploads/broken-{i}.png", 512),
                state=TaskState.DEAD,
                enqueued=-minutes * 60 - 30,
                finished=-minutes * 60,
                error=traceback_text(f"cannot decode uploads/broken-{i}.png: truncated PNG chunk"),
            )
        )
    plan.append(
        Planned(
            "mail-dead-0",
            "app.mail.send_welcome",
            (1999,),
            queue="emails",
            state=TaskState.DEAD,
            enqueued=-1300,
            finished=-1200,
            error=traceback_text("SMTP 554: mailbox unavailable", "SMTPDataError"),
        )
    )
    for i in range(2):
        plan.append(
            Planned(
                f"img-run-{i}",
                "app.jobs.resize_image",
                (f"uploads/large-{i}.tiff", 2048),
                state=TaskState.ACTIVE,
                enqueued=-20 + i,
            )
        )
    plan.append(
        Planned("report-run", "app.reports.monthly", ("2024-05",), queue="reports", state=TaskState.ACTIVE)
    )
    for i in range(6):
        plan.append(
            Planned(f"mail-new-{i}", "app.mail.send_welcome", (2000 + i,), queue="emails", enqueued=-3)
        )
    for i in range(2):
        plan.append(
            Planned(
                f"report-later-{i}", "app.reports.monthly", (f"2024-0{6 + i}",), queue="reports", run_in=3600
            )
        )
    plan.append(
        Planned(
            "img-retry-0",
            "app.jobs.resize_image",
            ("uploads/slow.png", 512),
            state=TaskState.PENDING,
            retrying=True,
            run_in=40,
            enqueued=-60,
            error=traceback_text("storage timed out after 30 s", "TimeoutError"),
        )
    )
    return plan


@dataclass
class Server:
    """A ``lifecycle tasks web`` process and the URL it printed."""

    process: subprocess.Popen[str]
    url: str
    banner: str

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (killed after 10 s); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextmanager
def web_server(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run ``lifecycle tasks ARGS web --port 0 ...`` (``args`` are the whole argument list after
    ``lifecycle``) until the block ends; the URL is read from its first line (30 s at most)."""
    command = [sys.executable, "-m", "lifecycle.cli", *args]
    environment = {key: value for key, value in os.environ.items() if key != "LIFECYCLE_TASKS_BACKEND"}
    environment.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **(env or {})})
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=ROOT
    )
    server = None
    try:
        assert process.stdout is not None
        line = _first_line(process)
        match = re.search(r"http://\S+/", line)
        assert match, f"no URL in {line!r}; stderr: {process.stderr.read() if process.stderr else ''}"
        server = Server(process, match.group(0), line)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _first_line(process: subprocess.Popen[str]) -> str:
    """The first line the process prints, read in a thread so that a silent process fails in 30 s."""
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.append(process.stdout.readline() if process.stdout else "")
    )
    reader.daemon = True
    reader.start()
    reader.join(30)
    if not lines or not lines[0]:
        process.kill()
        stderr = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"the web command printed no URL within 30 s; stderr: {stderr}")
    return lines[0]


def run_async(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(function, *args)`` on asyncio in a thread of its own (the browser tests' thread runs
    Playwright's event loop), re-raising its exception."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(anyio.run(function, *args, backend="asyncio"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    if errors:
        raise errors[0]
    assert results, "the coroutine did not finish within 120 s"
    return results[0]


def with_tasks(url: str, function: Callable[[AsyncTasks], Awaitable[T]]) -> T:
    """``function(tasks)`` with an open, enqueue-only ``AsyncTasks`` over the store at ``url``."""

    async def main() -> T:
        async with AsyncTasks(backend_from_url(url), execution=False) as tasks:
            return await function(tasks)

    return run_async(main)


def store_at(url: str, planned: Sequence[Planned]) -> Stored:
    """:func:`store` on the store at ``url`` (created when missing)."""

    async def main() -> Stored:
        backend = backend_from_url(url)
        await backend.open()
        try:
            return await store(backend, planned)
        finally:
            await backend.close()

    return run_async(main)
