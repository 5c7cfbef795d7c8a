"""``lifecycle tasks show ID``: every field of one task, with its decoded arguments, its result, its progress,
the group it belongs to and its last error's whole traceback (``--json``: the same as one object)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..._redact import redact
from ...asynctask import TaskState
from ._format import (
    EXIT_NOT_FOUND,
    STATE_STYLES,
    CliError,
    attempts_text,
    format_time,
    info_to_json,
    print_json,
    progress_text,
)
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``show``."""
    show = commands.add_parser("show", help="every field of one task, with its arguments and traceback")
    show.add_argument("task_id", metavar="ID")
    add_json_option(show)
    show.set_defaults(handler=with_tasks(_show))


async def _show(args: argparse.Namespace, session: Session) -> int:
    tasks = session.tasks
    info = await tasks.info(args.task_id)
    if info is None:
        raise CliError(
            f"there is no task with id {args.task_id!r} (never stored, or removed by retention or purge)",
            EXIT_NOT_FOUND,
        )
    arguments = await _arguments(session, args.task_id)
    group = None if info.group_id is None else await tasks.group_info(info.group_id)
    if args.json:
        membership = None
        if group is not None:
            membership = {
                "id": group.id,
                "state": group.state.value,
                "member": group.task_ids.index(info.id) if info.id in group.task_ids else None,
                "members": len(group.task_ids),
                "counts": {state.value: count for state, count in group.counts.items()},
                "then_id": group.then_id,
            }
        print_json(info_to_json(info, arguments=arguments, group=membership))
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
    progress = progress_text(info)
    if progress:
        rows.append(("progress", Text(progress)))
    if info.group_id is not None:
        if group is None:
            rows.append(("group", Text(f"{info.group_id} (no longer stored)")))
        else:
            place = group.task_ids.index(info.id) + 1 if info.id in group.task_ids else "?"
            done = group.counts[TaskState.SUCCEEDED]
            text = Text.assemble(
                f"{group.id} ",
                (group.state.value, STATE_STYLES[group.state.value]),
                f" (member {place} of {len(group.task_ids)}, {done} succeeded",
                f", then {group.then_id})" if group.then_id else ")",
            )
            rows.append(("group", text))
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
