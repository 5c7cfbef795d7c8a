"""``lifecycle tasks purge --state STATE``: delete tasks in the given states (of ``--queue``, finished
longer ago than ``--older-than``), in batches."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ...asynctask import TaskState
from ._changes import add_batch_option, batch_size, progress, report
from ._format import CliError, parse_duration
from ._session import Session, add_json_option, add_state_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``purge``."""
    purge = commands.add_parser("purge", help="delete tasks in the given states")
    add_state_option(purge, required=True, help="delete tasks in this state (repeat for several)")
    purge.add_argument("--queue", help="only tasks of this queue")
    purge.add_argument(
        "--older-than",
        metavar="AGE",
        help="only tasks finished (pending: enqueued) longer ago than AGE: 90, 30m, 12h, 7d, 1h30m",
    )
    add_batch_option(purge)
    add_json_option(purge)
    purge.set_defaults(handler=with_tasks(_purge))


async def _purge(args: argparse.Namespace, session: Session) -> int:
    batch = batch_size(args)
    states = {TaskState(state) for state in args.states}
    if TaskState.ACTIVE in states:
        raise CliError("purge cannot delete active tasks: a worker owns them; wait until they finish")
    older = None if args.older_than is None else parse_duration(args.older_than)
    before = None if older is None else time.time() - older
    tasks = session.tasks
    stats = await tasks.stats()
    estimate = sum(
        counts[state] for queue, counts in stats.items() if args.queue in (None, queue) for state in states
    )
    deleted = 0
    async with progress(session, "purging", estimate, batch) as advance:
        while True:
            count = await tasks.backend.purge(states=states, queue=args.queue, before=before, limit=batch)
            deleted += count
            advance(count)
            if count < batch:
                break
    names = "/".join(sorted(state.value for state in states))
    report(args, session, {"purged": deleted}, f"purged {deleted} {names} task(s)")
    return 0
