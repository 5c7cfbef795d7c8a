"""``lifecycle tasks --app MODULE:ATTR schedules``: the schedules of an AsyncTasks, next fire times.

Schedules are declared in code (``tasks.schedule(...)`` / ``tasks.every(...)``), not stored in the backend,
so this command needs ``--app`` naming the AsyncTasks that declares them (importing it does not start
anything). Fire times are computed from now; ``last_fire`` is only known to a running scheduler.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich import box
from rich.table import Table

from ...asynctask import ScheduleInfo
from ._format import CliError, format_time, iso, print_json
from ._session import Session, add_json_option, with_tasks

__all__ = ["register", "schedule_to_json", "schedules"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``schedules``."""
    parser = commands.add_parser(
        "schedules", help="the schedules of the --app AsyncTasks with their next fire times"
    )
    add_json_option(parser)
    parser.set_defaults(handler=with_tasks(schedules))


def schedule_to_json(info: ScheduleInfo) -> dict[str, Any]:
    """A schedule as a JSON object (times as epoch seconds, plus ``next_fire_iso``)."""
    return {
        "name": info.name,
        "task": info.task_name,
        "kind": info.kind,
        "spec": info.spec,
        "timezone": info.timezone,
        "queue": info.queue,
        "missed": info.missed,
        "next_fire": info.next_fire,
        "next_fire_iso": iso(info.next_fire),
        "next_task_id": info.task_id(info.next_fire),
        "last_fire": info.last_fire,
    }


async def schedules(args: argparse.Namespace, session: Session) -> int:
    """Print the schedules of the ``--app`` AsyncTasks, by name, with their next fire times."""
    app = session.app
    if app is None:
        raise CliError(
            "schedules are declared in code, not stored in the backend: pass --app MODULE:ATTR naming the "
            "AsyncTasks that declares them, e.g. lifecycle tasks --app myapp.tasks:tasks schedules"
        )
    found = app.schedules()
    if args.json:
        print_json([schedule_to_json(info) for info in found])
        return 0
    if not found:
        session.console.print("no schedules are declared on this AsyncTasks")
        return 0
    now = time.time()
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column in ("name", "task", "when", "queue", "missed", "next fire"):
        table.add_column(column, no_wrap=column in ("name", "next fire"), overflow="fold")
    for info in found:
        when = f"cron {info.spec} ({info.timezone})" if info.kind == "cron" else f"every {info.spec} s"
        table.add_row(
            info.name, info.task_name, when, info.queue, info.missed, format_time(info.next_fire, now)
        )
    session.console.print(table)
    return 0
