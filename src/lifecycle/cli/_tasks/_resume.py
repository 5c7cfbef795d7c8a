"""``lifecycle tasks resume QUEUE``: let the workers start the tasks of a paused queue again."""

from __future__ import annotations

import argparse
from typing import Any

from ._queues import change_pause
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``resume``."""
    resume = commands.add_parser("resume", help="resume a paused queue: workers start its tasks again")
    resume.add_argument("queue", metavar="QUEUE")
    add_json_option(resume)
    resume.set_defaults(handler=with_tasks(_resume))


async def _resume(args: argparse.Namespace, session: Session) -> int:
    return await change_pause(args, session, pause=False)
