"""``lifecycle tasks list``: tasks newest first, as a table that fits the terminal, with a one-line error
note where the error tells the task's story (``--json``: every field)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..._checks import check_count
from ...asynctask import TaskInfo
from ._format import STATE_STYLES, error_note, format_age, info_to_json, option, print_json
from ._session import Session, add_json_option, add_state_option, with_tasks

__all__ = ["list_table", "register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``list``."""
    listing = commands.add_parser("list", help="tasks newest first, with a one-line error note")
    add_state_option(listing, help="only tasks in this state (repeat for several)")
    listing.add_argument("--queue", help="only tasks of this queue")
    listing.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    listing.add_argument("--offset", type=int, default=0, help="skip this many rows first")
    add_json_option(listing)
    listing.set_defaults(handler=with_tasks(_list))


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
    limit = option(check_count, args.limit, "--limit", minimum=1)
    offset = option(check_count, args.offset, "--offset", minimum=0)
    infos = await session.tasks.list(state=args.states, queue=args.queue, limit=limit, offset=offset)
    if args.json:
        print_json([info_to_json(info) for info in infos])
    elif not infos:
        session.console.print("no tasks match")
    else:
        session.console.print(list_table(infos, time.time(), session.console.width), crop=False)
        if len(infos) == limit:
            session.console.print(
                f"[dim]showing {limit} tasks; use --limit/--offset for more[/]", highlight=False
            )
    return 0
