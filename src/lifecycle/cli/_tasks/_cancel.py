"""``lifecycle tasks cancel ID...``: cancel tasks: a pending one never runs, a running one is stopped by its
worker and ends cancelled (the output says which: ``cancelled`` or ``cancellation requested``)."""

from __future__ import annotations

import argparse
from typing import Any

from ._changes import one_by_one
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``cancel``."""
    cancel = commands.add_parser(
        "cancel", help="cancel tasks: pending ones never run, running ones are stopped (then cancelled)"
    )
    cancel.add_argument("task_ids", metavar="ID", nargs="+")
    add_json_option(cancel)
    cancel.set_defaults(handler=with_tasks(_cancel))


async def _cancel(args: argparse.Namespace, session: Session) -> int:
    return await one_by_one(args, session, "cancel", session.tasks.cancel)
