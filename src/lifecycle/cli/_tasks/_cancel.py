"""``lifecycle tasks cancel ID...``: cancel pending tasks, so they never run."""

from __future__ import annotations

import argparse
from typing import Any

from ._changes import one_by_one
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``cancel``."""
    cancel = commands.add_parser("cancel", help="cancel pending tasks: they will not run")
    cancel.add_argument("task_ids", metavar="ID", nargs="+")
    add_json_option(cancel)
    cancel.set_defaults(handler=with_tasks(_cancel))


async def _cancel(args: argparse.Namespace, session: Session) -> int:
    return await one_by_one(args, session, "cancel", session.tasks.cancel)
