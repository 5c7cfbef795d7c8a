"""``lifecycle tasks pause QUEUE``: stop every worker of the store from starting tasks of a queue."""

from __future__ import annotations

import argparse
from typing import Any

from ._queues import change_pause
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``pause``."""
    pause = commands.add_parser(
        "pause", help="pause a queue: no worker of the store starts its tasks until it is resumed (stored)"
    )
    pause.add_argument("queue", metavar="QUEUE")
    add_json_option(pause)
    pause.set_defaults(handler=with_tasks(_pause))


async def _pause(args: argparse.Namespace, session: Session) -> int:
    return await change_pause(args, session, pause=True)
