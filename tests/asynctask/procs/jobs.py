"""The task functions a harness worker registers, and the JSON lines they print.

Every function takes a ``key`` (a string without spaces) so the test can follow each task. ``ran`` events and
``runs.log`` lines are written only once a run has finished its work, just before it returns.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from lifecycle.asynctask import AsyncTasks, TaskContext

__all__ = ["configure", "emit", "read_spans", "register_control_jobs", "register_flow_jobs", "register_jobs"]

_out_dir = Path(".")


def configure(out_dir: Path) -> None:
    """Set the directory for ``runs.log`` and the first-start marker files."""
    global _out_dir
    _out_dir = out_dir


def emit(event: str, **fields: Any) -> None:
    """Print one machine-readable line (flushed at once, so the test sees it before anything else happens)."""
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def _finish(ctx: TaskContext, key: str) -> str:
    # One O_APPEND write per run: lines from several processes never interleave.
    fd = os.open(_out_dir / "runs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{key} {ctx.attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    emit("ran", key=key, attempt=ctx.attempt)
    return key


async def record(ctx: TaskContext, key: str) -> str:
    """Record one run of ``key`` and return it."""
    return _finish(ctx, key)


async def hang_first(ctx: TaskContext, key: str) -> str:
    """Hang forever the first time any worker starts ``key``; finish normally on every later start.

    The first start is detected with an ``O_EXCL`` marker file, so it holds across processes and attempts.
    """
    try:
        fd = os.open(_out_dir / f"first-{key}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        emit("started", key=key, attempt=ctx.attempt, first=False)
        return _finish(ctx, key)
    os.close(fd)
    emit("started", key=key, attempt=ctx.attempt, first=True)
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def slow(ctx: TaskContext, key: str, seconds: float) -> str:
    """Take ``seconds`` (a task that can finish within a shutdown grace period), then record the run."""
    emit("started", key=key, attempt=ctx.attempt)
    await anyio.sleep(seconds)
    return _finish(ctx, key)


async def interrupt(ctx: TaskContext, key: str) -> None:
    """Raise ``KeyboardInterrupt`` from the task itself (no signal): the task's failure, not the worker's."""
    emit("started", key=key, attempt=ctx.attempt)
    raise KeyboardInterrupt(f"raised by task {key}")


def exit_in_thread(key: str) -> None:
    """A plain ``def`` (run in a worker thread) calling ``sys.exit``: the task's failure, not the worker's."""
    sys.exit(f"sys.exit from task {key}")


async def tick(ctx: TaskContext) -> str:
    """A scheduled run: record it under its task id, which names the schedule's fire time."""
    return _finish(ctx, ctx.task_id)


def register_jobs(tasks: AsyncTasks) -> None:
    """Register the harness functions under stable names (``procs.record``, ...)."""
    tasks.register(record, name="procs.record")
    tasks.register(hang_first, name="procs.hang_first")
    tasks.register(slow, name="procs.slow")
    tasks.register(tick, name="procs.tick")
    tasks.register(interrupt, name="procs.interrupt")
    tasks.register(exit_in_thread, name="procs.exit_in_thread")


def _span(kind: str, key: str, started: float, ended: float) -> None:
    """Append ``kind key start end pid`` to ``spans.log`` (one ``O_APPEND`` write: never interleaved)."""
    fd = os.open(_out_dir / "spans.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {key} {started!r} {ended!r} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    emit("ran", key=key)


async def rated(key: str) -> None:
    """A task limited to 20 starts a second (``rate_limit="20/s"``): records when it started."""
    now = time.time()
    _span("rated", key, now, now)


async def keyed(key: str, account: str, seconds: float) -> None:
    """One at a time per ``account`` (``max_running_per_key=1``, enqueued with ``concurrency_key=account``):
    records when it started and ended."""
    started = time.time()
    await anyio.sleep(seconds)
    _span("keyed", f"{account}/{key}", started, time.time())


async def capped(key: str, seconds: float) -> None:
    """At most 2 running in the store (``max_running=2``): records when it started and ended."""
    started = time.time()
    await anyio.sleep(seconds)
    _span("capped", key, started, time.time())


async def solo(ctx: TaskContext, key: str) -> None:
    """One at a time in the store (``max_running=1``); a key starting with ``doomed`` hangs the first time
    any worker starts it (as :func:`hang_first`), so a test can kill the worker that holds the one slot."""
    started = time.time()
    if not key.startswith("doomed"):
        emit("started", key=key, attempt=ctx.attempt, first=False)
        _span("solo", key, started, time.time())
        return
    try:
        fd = os.open(_out_dir / f"first-{key}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        emit("started", key=key, attempt=ctx.attempt, first=False)
        _span("solo", key, started, time.time())
        return
    os.close(fd)
    emit("started", key=key, attempt=ctx.attempt, first=True)
    await anyio.sleep_forever()


def register_flow_jobs(tasks: AsyncTasks) -> None:
    """Register the flow-limited functions (``procs.rated``, ``procs.keyed``, ``procs.capped``,
    ``procs.solo``)."""
    tasks.register(rated, name="procs.rated", rate_limit="20/s")
    tasks.register(keyed, name="procs.keyed", max_running_per_key=1)
    tasks.register(capped, name="procs.capped", max_running=2)
    tasks.register(solo, name="procs.solo", max_running=1)


def read_spans(out_dir: Path) -> list[tuple[str, str, float, float, int]]:
    """Every ``(kind, key, start, end, pid)`` the flow jobs recorded, in completion order."""
    path = out_dir / "spans.log"
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        kind, key, started, ended, pid = line.split(" ")
        spans.append((kind, key, float(started), float(ended), int(pid)))
    return spans


async def endless(ctx: TaskContext, key: str) -> None:
    """Run until cancelled: print ``started``, then ``stopped`` (with the time) once the scope is
    cancelled."""
    emit("started", key=key, attempt=ctx.attempt)
    try:
        await anyio.sleep_forever()
    finally:
        emit("stopped", key=key, attempt=ctx.attempt, at=time.time())


def endless_def(ctx: TaskContext, key: str) -> str:
    """A plain ``def`` (a worker thread) that runs until it sees ``ctx.cancel_requested``, then returns."""
    emit("started", key=key, attempt=ctx.attempt)
    pause = threading.Event()
    while not ctx.cancel_requested:
        pause.wait(0.005)
    emit("stopped", key=key, attempt=ctx.attempt, at=time.time())
    return "stopped early"


async def part(ctx: TaskContext, key: str, n: int, seconds: float) -> int:
    """A group member: take ``seconds``, record the run, return ``n``."""
    await anyio.sleep(seconds)
    _finish(ctx, key)
    return n


async def join(ctx: TaskContext, key: str) -> int:
    """A group's then: write the members' results (``previous_result``) to ``join-<key>.json``, record the
    run, return how many results it received."""
    results = ctx.previous_result
    (_out_dir / f"join-{key}-{os.getpid()}-{ctx.attempt}.json").write_text(json.dumps(results))
    _finish(ctx, key)
    return len(results)


def register_control_jobs(tasks: AsyncTasks) -> None:
    """Register the functions of the control-of-running-work tests (``procs.endless``, ``procs.endless_def``,
    ``procs.part``, ``procs.join``)."""
    tasks.register(endless, name="procs.endless", max_retries=3)
    tasks.register(endless_def, name="procs.endless_def", max_retries=3)
    tasks.register(part, name="procs.part", max_retries=5)
    tasks.register(join, name="procs.join", max_retries=5)
