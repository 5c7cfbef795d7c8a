"""``lifecycle tasks requeue``: move dead (or cancelled) tasks back to pending, with their attempts reset:
the ids given, or ``--dead`` for every dead task (of ``--queue``), in batches."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ...asynctask import TaskState
from ._changes import add_batch_option, batch_size, one_by_one, progress, report
from ._format import CliError
from ._session import Session, add_json_option, with_tasks

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``requeue``."""
    requeue = commands.add_parser(
        "requeue", help="move dead (or cancelled) tasks back to pending with attempts reset"
    )
    requeue.add_argument("task_ids", metavar="ID", nargs="*", help="the tasks to requeue")
    requeue.add_argument("--dead", action="store_true", help="requeue every dead task (of --queue)")
    requeue.add_argument("--queue", help="with --dead: only this queue")
    add_batch_option(requeue)
    add_json_option(requeue)
    requeue.set_defaults(handler=with_tasks(_requeue))


async def _requeue(args: argparse.Namespace, session: Session) -> int:
    batch = batch_size(args)
    if args.dead == bool(args.task_ids):
        raise CliError("give the task IDs to requeue, or --dead for every dead task (not both)")
    if args.queue is not None and not args.dead:
        raise CliError("--queue only applies with --dead")
    tasks = session.tasks
    if not args.dead:
        return await one_by_one(args, session, "requeue", tasks.requeue)
    stats = await tasks.stats()
    total = sum(counts.dead for queue, counts in stats.items() if args.queue in (None, queue))
    moved = 0
    async with progress(session, "requeueing dead tasks", total, batch) as advance:
        # Bounded by the count at the start: tasks that die again meanwhile are not looped over forever.
        while moved < total:
            records = await tasks.backend.list_records(
                states={TaskState.DEAD}, queue=args.queue, limit=min(batch, total - moved)
            )
            if not records:
                break
            done = await tasks.backend.requeue([record.id for record in records], now=time.time())
            moved += done
            advance(done)
            if done == 0:
                break
    report(args, session, {"requeued": moved}, f"requeued {moved} dead task(s)")
    return 0
