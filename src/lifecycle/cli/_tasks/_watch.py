"""``lifecycle tasks watch``: a live dashboard of counts per queue and state, throughput per second, the
paused queues and flow limits (see :mod:`._flowview`), the running tasks that report progress and the most
recent failures, refreshed every ``--interval`` seconds until Ctrl-C (or SIGTERM). With ``--json`` the
same data is printed as one JSON object per refresh, one per line (JSON lines), for scripts."""

from __future__ import annotations

import argparse
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..._checks import check_seconds
from ..._redact import redact
from ...asynctask import AsyncTasks, FlowStats, QueueStats, TaskInfo, TaskState
from ._flowview import flow_to_json, read_flow, render_flow
from ._format import (
    error_summary,
    format_age,
    option,
    print_json,
    progress_text,
    progress_to_json,
    stats_table,
    stats_to_json,
)
from ._session import Session, with_tasks

__all__ = ["Dashboard", "failure_label", "register", "watch"]

#: How many failures the dashboard lists.
RECENT_FAILURES = 8
#: How many running tasks with progress the dashboard lists (the most recently started).
RUNNING_SHOWN = 8


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``watch``."""
    watch_parser = commands.add_parser(
        "watch", help="a live dashboard: counts, throughput per second, recent failures (Ctrl-C to stop)"
    )
    watch_parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    watch_parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per refresh, one per line (JSON lines), instead of the live screen",
    )
    watch_parser.set_defaults(handler=with_tasks(watch))


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    succeeded: int
    dead: int


class Dashboard:
    """The state of the watch screen: the latest counts, a window of samples for throughput, and the most
    recent failures (dead tasks, pending tasks waiting for a retry after an error, and dead tasks requeued
    by hand, which are pending with their attempts back at 0).

    Throughput is the growth of the succeeded and dead counts over the last ``window`` seconds, so it
    counts tasks finished by every worker on the backend; retention or a purge shrinking the counts reads
    as 0, not as a negative rate.
    """

    def __init__(
        self,
        tasks: AsyncTasks,
        *,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        app: AsyncTasks | None = None,
    ) -> None:
        self._tasks = tasks
        self._app = app
        self._window = window
        self._clock = clock
        self._samples: deque[_Sample] = deque()
        self.stats: dict[str, QueueStats] = {}
        self.flow = FlowStats(paused=frozenset(), tasks={}, sampled=0, complete=True)
        self.failures: list[TaskInfo] = []
        self.progress: list[TaskInfo] = []
        self.updated: float | None = None

    async def refresh(self) -> None:
        """Read the counts, the flow (paused queues, limits, waiting tasks) and recent failures once."""
        self.stats = await self._tasks.stats()
        self.flow = await read_flow(self._tasks, self._app)
        dead = await self._tasks.list(state=TaskState.DEAD, limit=50)
        pending = await self._tasks.list(state=TaskState.PENDING, limit=200)
        retrying = [info for info in pending if info.last_error]
        self.failures = sorted(dead + retrying, key=_failed_at, reverse=True)[:RECENT_FAILURES]
        running = await self._tasks.list(state=TaskState.ACTIVE, limit=200)
        reporting = [info for info in running if info.progress is not None or info.progress_message]
        self.progress = sorted(reporting, key=lambda info: info.started_at or 0.0, reverse=True)[
            :RUNNING_SHOWN
        ]
        now = self._clock()
        self._samples.append(
            _Sample(
                now,
                sum(counts.succeeded for counts in self.stats.values()),
                sum(counts.dead for counts in self.stats.values()),
            )
        )
        while len(self._samples) > 2 and self._samples[1].at <= now - self._window:
            self._samples.popleft()
        self.updated = time.time()

    def throughput(self) -> tuple[float, float] | None:
        """Succeeded and dead tasks per second over the window, or ``None`` before two samples."""
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        elapsed = last.at - first.at
        if elapsed <= 0:
            return None
        return (
            max(0, last.succeeded - first.succeeded) / elapsed,
            max(0, last.dead - first.dead) / elapsed,
        )

    def render(self) -> RenderableType:
        """The whole screen."""
        now = time.time()
        header = Text.assemble(
            ("lifecycle tasks watch", "bold"),
            f"  {redact(repr(self._tasks.backend))}",
            ("  (Ctrl-C to stop)", "dim"),
        )
        rate = self.throughput()
        if rate is None:
            speed = Text("throughput: measuring...", style="dim")
        else:
            speed = Text.assemble(
                "throughput: ",
                (f"{rate[0]:.1f}/s succeeded", "green"),
                ", ",
                (f"{rate[1]:.1f}/s dead", "red"),
                f"  (last {self._window:g} s)",
            )
        counts: RenderableType = (
            stats_table(self.stats, title="tasks per queue and state")
            if self.stats
            else Text("no tasks are stored yet")
        )
        failures: RenderableType
        if self.failures:
            failures = Table(title="recent failures", title_justify="left")
            failures.add_column("when", no_wrap=True)
            failures.add_column("state")
            failures.add_column("id", no_wrap=True)
            failures.add_column("name")
            failures.add_column("attempts", justify="right")
            failures.add_column("error", style="red", overflow="ellipsis", no_wrap=True, max_width=70)
            for info in self.failures:
                failures.add_row(
                    format_age(_failed_at(info), now),
                    failure_label(info),
                    info.id,
                    info.name,
                    f"{info.attempts}/{info.max_retries + 1}",
                    error_summary(info.last_error),
                )
        else:
            failures = Text("no recent failures", style="green")
        parts: list[RenderableType] = [header, speed, Text(""), counts]
        flow = render_flow(self.flow, limits_known=self._app is not None)
        if flow is not None:
            parts += [Text(""), flow]
        if self.progress:
            running = Table(title="running, with progress", title_justify="left")
            running.add_column("started", no_wrap=True)
            running.add_column("id", no_wrap=True)
            running.add_column("name")
            running.add_column("progress", overflow="ellipsis", no_wrap=True, max_width=70)
            for info in self.progress:
                running.add_row(format_age(info.started_at, now), info.id, info.name, progress_text(info))
            parts += [Text(""), running]
        return Group(*parts, Text(""), failures)

    def to_json(self) -> dict[str, Any]:
        """The screen's data as one JSON object (a line of ``watch --json``)."""
        rate = self.throughput()
        return {
            "at": self.updated,
            **stats_to_json(self.stats),
            **flow_to_json(self.flow, limits_known=self._app is not None),
            "throughput": None
            if rate is None
            else {"succeeded_per_s": rate[0], "dead_per_s": rate[1], "window_s": self._window},
            "running_progress": [
                {
                    "id": info.id,
                    "name": info.name,
                    "queue": info.queue,
                    "started_at": info.started_at,
                    "progress": progress_to_json(info),
                }
                for info in self.progress
            ],
            "recent_failures": [
                {
                    "id": info.id,
                    "name": info.name,
                    "queue": info.queue,
                    "state": info.state.value,
                    "label": failure_label(info),
                    "attempts": info.attempts,
                    "max_retries": info.max_retries,
                    "retries_left": info.retries_left,
                    "failed_at": _failed_at(info),
                    "error_summary": error_summary(info.last_error) or None,
                }
                for info in self.failures
            ],
        }


def failure_label(info: TaskInfo) -> str:
    """What a failure row is: ``dead``, ``retrying`` (pending after a failed attempt, with retries left) or
    ``requeued`` (a dead task moved back to pending by hand: its attempts start again at 0)."""
    if info.state is TaskState.DEAD:
        return "dead"
    return "requeued" if info.attempts == 0 else "retrying"


def _failed_at(info: TaskInfo) -> float:
    return info.finished_at or info.started_at or info.enqueued_at


async def watch(args: argparse.Namespace, session: Session) -> int:
    """Show the dashboard until SIGINT or SIGTERM; exit status 0."""
    interval = option(check_seconds, args.interval, "--interval")
    dashboard = Dashboard(session.tasks, app=session.app)
    await dashboard.refresh()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    group.cancel_scope.cancel()
                    return

            group.start_soon(stop_on_signal)
            if args.json:
                while True:
                    print_json(dashboard.to_json(), indent=None)
                    await anyio.sleep(interval)
                    await dashboard.refresh()
            with Live(dashboard.render(), console=session.console, auto_refresh=False) as live:
                while True:
                    await anyio.sleep(interval)
                    await dashboard.refresh()
                    live.update(dashboard.render(), refresh=True)
    return 0
