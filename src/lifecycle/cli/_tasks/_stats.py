"""``lifecycle tasks stats``: a table of task counts per queue and state, then the paused queues and the
flow limits per task name with how many due tasks wait on each (``--json``: all of it; see
:mod:`._flowview`)."""

from __future__ import annotations

import argparse
from typing import Any

from ._flowview import flow_to_json, read_flow, render_flow
from ._format import print_json, stats_table, stats_to_json
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``stats``."""
    stats = commands.add_parser("stats", help="a table of task counts per queue and state")
    add_json_option(stats)
    stats.set_defaults(handler=with_tasks(_stats))


async def _stats(args: argparse.Namespace, session: Session) -> int:
    stats = await session.tasks.stats()
    flow = await read_flow(session.tasks, session.app)
    limits_known = session.app is not None
    if args.json:
        print_json({**stats_to_json(stats), **flow_to_json(flow, limits_known=limits_known)})
        return 0
    if not stats:
        session.console.print("no tasks are stored")
    else:
        session.console.print(stats_table(stats))
    shown = render_flow(flow, limits_known=limits_known)
    if shown is not None:
        session.console.print(shown)
    return 0
