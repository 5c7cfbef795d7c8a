"""``lifecycle tasks group ID``: one group of tasks (``enqueue_group``, or a chain's group step): its state,
its members per state, its ``then`` task once enqueued, and each member with its state and progress
(``--json``: the same as one object)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table
from rich.text import Text

from ...asynctask import TaskState
from ._format import EXIT_NOT_FOUND, STATE_STYLES, CliError, print_json, progress_text, progress_to_json
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]

#: Members listed one by one (a bigger group shows its counts and the first ones).
MEMBERS_SHOWN = 50


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``group``."""
    group = commands.add_parser("group", help="one group of tasks: its state, counts, then task and members")
    group.add_argument("group_id", metavar="ID")
    add_json_option(group)
    group.set_defaults(handler=with_tasks(_group))


async def _group(args: argparse.Namespace, session: Session) -> int:
    tasks = session.tasks
    info = await tasks.group_info(args.group_id)
    if info is None:
        raise CliError(
            f"there is no group with id {args.group_id!r} (never stored, removed by retention, or the store "
            "has no groups)",
            EXIT_NOT_FOUND,
        )
    members = [(task_id, await tasks.info(task_id)) for task_id in info.task_ids[:MEMBERS_SHOWN]]
    if args.json:
        print_json(
            {
                "id": info.id,
                "state": info.state.value,
                "counts": {state.value: count for state, count in info.counts.items()},
                "then_id": info.then_id,
                "task_ids": list(info.task_ids),
                "members": [
                    {
                        "id": task_id,
                        "state": None if member is None else member.state.value,
                        "progress": None if member is None else progress_to_json(member),
                    }
                    for task_id, member in members
                ],
            }
        )
        return 0
    counts = ", ".join(f"{count} {state.value}" for state, count in info.counts.items() if count)
    session.console.print(
        Text.assemble(
            ("group ", "bold"),
            info.id,
            "  ",
            (info.state.value, STATE_STYLES[info.state.value]),
            f"  {len(info.task_ids)} members: {counts or 'none stored'}",
        )
    )
    if info.then_id is not None:
        session.console.print(f"then: {info.then_id}", highlight=False)
    elif info.state in (TaskState.DEAD, TaskState.CANCELLED):
        session.console.print(f"then: never runs (the group is {info.state.value})", highlight=False)
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("id", no_wrap=True)
    table.add_column("state")
    table.add_column("progress", overflow="ellipsis", no_wrap=True, max_width=60)
    for index, (task_id, member) in enumerate(members):
        state = (
            Text("gone", style="dim")
            if member is None
            else Text(member.state.value, STATE_STYLES[member.state.value])
        )
        table.add_row(str(index), task_id, state, "" if member is None else progress_text(member))
    session.console.print(table)
    if len(info.task_ids) > MEMBERS_SHOWN:
        session.console.print(f"... and {len(info.task_ids) - MEMBERS_SHOWN} more members", highlight=False)
    return 0
