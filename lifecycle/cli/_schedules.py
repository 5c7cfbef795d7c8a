"""``lifecycle tasks --app MODULE:ATTR schedules``: schedules of an AsyncTasks, next fire times."""

from __future__ import annotations

import argparse

from ._format import CliError
from ._tasks import Session

__all__ = ["schedules"]


async def schedules(args: argparse.Namespace, session: Session) -> int:
    """Print the schedules of the ``--app`` AsyncTasks."""
    raise CliError("not yet")
