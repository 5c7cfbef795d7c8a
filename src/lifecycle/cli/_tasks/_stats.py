"""``lifecycle tasks stats``: a table of task counts per queue and state (``--json``: the counts)."""

from __future__ import annotations

import argparse
from typing import Any

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
    if args.json:
        print_json(stats_to_json(stats))
    elif not stats:
        session.console.print("no tasks are stored")
    else:
        session.console.print(stats_table(stats))
    return 0
