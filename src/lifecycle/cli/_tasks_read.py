"""The read commands of ``lifecycle tasks``: ``stats``, ``list``, ``show`` and ``watch`` (tables or JSON)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._redact import redact
from ..asynctask import QueueStats, TaskInfo, TaskState
from ._format import (
    EXIT_NOT_FOUND,
    STATE_STYLES,
    CliError,
    attempts_text,
    error_note,
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

    listing = commands.add_parser("list", help="tasks newest first, with a one-line error note")
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
    watch.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per refresh, one per line (JSON lines), instead of the live screen",
    )
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


#: Columns of ``list`` a narrow terminal leaves out first (id and state are always shown, never cut).
_DROPPABLE = ("queue", "when", "tries", "name")
_GAP = 2  # between two columns
_MIN_NAME, _MIN_QUEUE, _MIN_ERROR = 8, 5, 24
_SHORT_QUEUE = 12


def list_table(infos: list[TaskInfo], now: float, width: int) -> RenderableType:
    """Tasks as table rows: id, name, queue, state, attempts of allowed, when (finished, or due for a pending
    task) and the error note (see :func:`error_note`). Ids and states are never cut: on a narrow terminal
    the name and queue are shortened with an ellipsis, then the queue, when, tries and name columns are left
    out (a note says so), and below about 45 columns each task is one line the terminal wraps. The error
    notes are a column from 110 columns on, and follow the table when narrower."""
    if not infos:
        return Text("no tasks match")
    rows = [
        {
            "id": info.id,
            "name": info.name,
            "queue": info.queue,
            "state": info.state.value,
            "tries": f"{info.attempts}/{info.max_retries + 1}",
            "when": format_age(info.finished_at if info.state.is_final else info.run_at, now),
            "error": error_note(info),
        }
        for info in infos
    ]
    widths = {name: max(cell_len(name), *(cell_len(row[name]) for row in rows)) for name in rows[0]}
    shown = ["id", "name", "queue", "state", "tries", "when"]
    minimum = {
        "name": min(widths.get("name", 0), _MIN_NAME),
        "queue": min(widths.get("queue", 0), _MIN_QUEUE),
    }

    def needed(columns: list[str]) -> int:
        return sum(minimum.get(column, widths[column]) for column in columns) + _GAP * (len(columns) - 1)

    dropped: list[str] = []
    for column in _DROPPABLE:
        if needed(shown) <= width:
            break
        shown.remove(column)
        dropped.append(column)
    if needed(shown) > width:
        # Not even the id and the state fit: one line per task, uncut (print it with crop=False: the
        # terminal wraps the lines), and its error note on the next line.
        lines: list[RenderableType] = []
        for row in rows:
            lines.append(Text(f"{row['id']}  {row['state']}  {row['name']}", no_wrap=True, overflow="ignore"))
            if row["error"]:
                lines.append(Text(f"  {row['error']}", style="red"))
        lines.append(Text("(too narrow for a table; widen the terminal or use --json)", style="dim"))
        return Group(*lines)
    sizes = {column: minimum.get(column, widths[column]) for column in shown}
    spare = width - needed(shown)
    # The room left goes to a short queue name first (most are), then to the task name, then to the queue.
    for column, most in (("queue", _SHORT_QUEUE), ("name", None), ("queue", None)):
        if column in sizes:
            grow = min(spare, (widths[column] if most is None else min(widths[column], most)) - sizes[column])
            sizes[column] += max(0, grow)
            spare -= max(0, grow)
    notes = any(row["error"] for row in rows)
    wide = notes and width >= 110 and spare >= _MIN_ERROR + _GAP
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column in shown:
        right = column == "tries"
        table.add_column(
            column,
            no_wrap=True,
            overflow="ellipsis",
            width=sizes[column],
            justify="right" if right else "left",
        )
    if wide:
        longest = max(cell_len(row["error"]) for row in rows)
        table.add_column(
            "error", overflow="ellipsis", no_wrap=True, style="red", width=min(spare - _GAP, longest)
        )
    stacked = width - widths["id"] - _GAP < _MIN_ERROR  # too narrow beside the id: the note below it
    errors = Table.grid(padding=(0, 2))
    errors.add_column(no_wrap=not stacked, overflow="fold")
    if not stacked:
        errors.add_column(style="red", overflow="fold")
    for row in rows:
        cells: list[RenderableType] = [
            Text(row["state"], style=STATE_STYLES[row["state"]]) if column == "state" else row[column]
            for column in shown
        ]
        table.add_row(*cells, *([row["error"]] if wide else []))
        if row["error"] and not wide:
            if stacked:
                errors.add_row(row["id"])
                errors.add_row(Text(f"  {row['error']}", style="red"))
            else:
                errors.add_row(row["id"], row["error"])
    parts: list[RenderableType] = [table]
    if dropped:
        parts.append(
            Text(
                f"(too narrow: {', '.join(dropped)} left out; widen the terminal or use --json)", style="dim"
            )
        )
    if errors.row_count:
        parts += [Text("errors:", style="bold"), errors]
    return Group(*parts) if len(parts) > 1 else table


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
        session.console.print(list_table(infos, time.time(), session.console.width), crop=False)
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
        ("attempts", attempts_text(info)),
        ("timeout", "-" if info.timeout is None else f"{info.timeout:g} s"),
        ("enqueued at", format_time(info.enqueued_at, now)),
        ("run at", format_time(info.run_at, now)),
        ("started at", format_time(info.started_at, now)),
        ("finished at", format_time(info.finished_at, now)),
        ("arguments", Text(redact(repr(arguments)))),
        ("result", Text(redact(repr(info.result)))),
    ]
    for name, value in rows:
        fields.add_row(name, value)
    parts: list[RenderableType] = [fields]
    if info.damaged:
        parts.append(Panel(Text(info.damaged), title="damaged", title_align="left", border_style="red"))
    if info.last_error:
        title = (
            "last error" if info.state is not TaskState.SUCCEEDED else "last error (of an earlier attempt)"
        )
        error = Text(redact(info.last_error))
        parts.append(Panel(error, title=title, title_align="left", border_style="red"))
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
