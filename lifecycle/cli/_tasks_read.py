"""The read commands of ``lifecycle tasks``: ``stats``, ``list``, ``show`` and ``watch`` (tables or JSON)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..asynctask import QueueStats, TaskInfo, TaskState
from ._format import (
    EXIT_NOT_FOUND,
    STATE_STYLES,
    CliError,
    error_summary,
    format_age,
    format_time,
    info_to_json,
    print_json,
    stats_to_json,
)
from ._tasks import Session, TasksCommand, add_json_option, add_state_option

__all__ = ["list_table", "register", "stats_table"]

Wrap = Callable[[TasksCommand], Callable[[argparse.Namespace], int]]


def register(commands: argparse._SubParsersAction[Any], wrap: Wrap) -> None:
    """Add ``stats``, ``list``, ``show``, ``watch`` and ``schedules``."""
    stats = commands.add_parser("stats", help="a table of task counts per queue and state")
    add_json_option(stats)
    stats.set_defaults(handler=wrap(_stats))

    listing = commands.add_parser("list", help="tasks newest first, with a one-line error summary")
    add_state_option(listing, help="only tasks in this state (repeat for several)")
    listing.add_argument("--queue", help="only tasks of this queue")
    listing.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    listing.add_argument("--offset", type=int, default=0, help="skip this many rows first")
    add_json_option(listing)
    listing.set_defaults(handler=wrap(_list))

    show = commands.add_parser("show", help="every field of one task, with its arguments and traceback")
    show.add_argument("task_id", metavar="ID")
    add_json_option(show)
    show.set_defaults(handler=wrap(_show))

    from . import _dashboard, _schedules

    watch = commands.add_parser(
        "watch", help="a live dashboard: counts, throughput per second, recent failures (Ctrl-C to stop)"
    )
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    watch.set_defaults(handler=wrap(_dashboard.watch))

    schedules = commands.add_parser(
        "schedules", help="the schedules of the --app AsyncTasks with their next fire times"
    )
    add_json_option(schedules)
    schedules.set_defaults(handler=wrap(_schedules.schedules))


def stats_table(stats: Mapping[str, QueueStats], title: str | None = None) -> Table:
    """Counts per queue (rows) and state (columns), with a total row when there are several queues."""
    table = Table(title=title, title_justify="left", show_footer=len(stats) > 1)
    totals = {state.value: sum(counts[state] for counts in stats.values()) for state in TaskState}
    table.add_column("queue", footer="total")
    for state in TaskState:
        table.add_column(
            state.value, justify="right", style=STATE_STYLES[state.value], footer=str(totals[state.value])
        )
    table.add_column("total", justify="right", style="bold", footer=str(sum(totals.values())))
    for queue, counts in stats.items():
        table.add_row(queue, *(str(counts[state]) for state in TaskState), str(counts.total))
    return table


async def _stats(args: argparse.Namespace, session: Session) -> int:
    stats = await session.tasks.stats()
    if args.json:
        print_json(stats_to_json(stats))
    elif not stats:
        session.console.print("no tasks are stored")
    else:
        session.console.print(stats_table(stats))
    return 0


def list_table(infos: list[TaskInfo], now: float, width: int) -> RenderableType:
    """Tasks as table rows: id, name, queue, state, attempts of allowed, when (finished, or due for a pending
    task) and the error summary. Narrower than 110 columns, the error summaries follow the table instead."""
    wide = width >= 110
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("id", no_wrap=True, min_width=len(infos[0].id) if infos else None)
    table.add_column("name", no_wrap=True, overflow="ellipsis", min_width=8)
    table.add_column("queue", no_wrap=True, overflow="ellipsis", min_width=5)
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("when", no_wrap=True, min_width=7)
    if wide:
        table.add_column("error", overflow="ellipsis", no_wrap=True, style="red")
    errors = Table.grid(padding=(0, 2))
    errors.add_column(no_wrap=True)
    errors.add_column(style="red", overflow="fold")
    for info in infos:
        state = info.state.value
        when = info.finished_at if info.state.is_final else info.run_at
        summary = f"damaged: {info.damaged}" if info.damaged else error_summary(info.last_error)
        row: list[RenderableType] = [
            info.id,
            info.name,
            info.queue,
            Text(state, style=STATE_STYLES[state]),
            f"{info.attempts}/{info.max_retries + 1}",
            format_age(when, now),
        ]
        table.add_row(*row, *([summary] if wide else []))
        if summary and not wide:
            errors.add_row(info.id, summary)
    if errors.row_count:
        return Group(table, Text("errors:", style="bold"), errors)
    return table


async def _list(args: argparse.Namespace, session: Session) -> int:
    if args.limit < 1 or args.offset < 0:
        raise CliError("--limit must be at least 1 and --offset at least 0")
    infos = await session.tasks.list(
        state=args.states, queue=args.queue, limit=args.limit, offset=args.offset
    )
    if args.json:
        print_json([info_to_json(info) for info in infos])
    elif not infos:
        session.console.print("no tasks match")
    else:
        session.console.print(list_table(infos, time.time(), session.console.width))
        if len(infos) == args.limit:
            session.console.print(
                f"[dim]showing {args.limit} tasks; use --limit/--offset for more[/]", highlight=False
            )
    return 0


async def _show(args: argparse.Namespace, session: Session) -> int:
    tasks = session.tasks
    info = await tasks.info(args.task_id)
    if info is None:
        raise CliError(
            f"there is no task with id {args.task_id!r} (never stored, or removed by retention or purge)",
            EXIT_NOT_FOUND,
        )
    arguments = await _arguments(session, args.task_id)
    if args.json:
        print_json(info_to_json(info, arguments=arguments))
        return 0
    now = time.time()
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    rows: list[tuple[str, RenderableType]] = [
        ("id", info.id),
        ("name", info.name),
        ("queue", info.queue),
        ("state", Text(info.state.value, style=STATE_STYLES[info.state.value])),
        ("attempts", f"{info.attempts} of {info.max_retries + 1} ({info.retries_left} retries left)"),
        ("timeout", "-" if info.timeout is None else f"{info.timeout:g} s"),
        ("enqueued at", format_time(info.enqueued_at, now)),
        ("run at", format_time(info.run_at, now)),
        ("started at", format_time(info.started_at, now)),
        ("finished at", format_time(info.finished_at, now)),
        ("arguments", Text(repr(arguments))),
        ("result", Text(repr(info.result))),
    ]
    for name, value in rows:
        fields.add_row(name, value)
    parts: list[RenderableType] = [fields]
    if info.damaged:
        parts.append(Panel(Text(info.damaged), title="damaged", title_align="left", border_style="red"))
    if info.last_error:
        parts.append(Panel(Text(info.last_error), title="last error", title_align="left", border_style="red"))
    session.console.print(Group(*parts))
    return 0


async def _arguments(session: Session, task_id: str) -> Any:
    """The decoded arguments of the task, or the raw payload text when the encoding cannot decode it."""
    record = await session.tasks.backend.get(task_id)
    if record is None:
        return None
    try:
        decoded = session.tasks.encoding.decode(record.payload)
    except ValueError:
        return record.payload.decode("utf-8", errors="replace")
    return list(decoded) if isinstance(decoded, tuple) else decoded
