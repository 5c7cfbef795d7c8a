"""The commands of ``lifecycle tasks`` that change tasks: ``requeue``, ``cancel`` and ``purge``.

Bulk operations (``requeue --dead``, ``purge``) work in batches of ``--batch-size`` so no single statement
holds the storage for long, with a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..asynctask import TaskState
from ._format import EXIT_NOT_FOUND, EXIT_REFUSED, CliError, parse_duration, print_json
from ._tasks import Session, TasksCommand, add_json_option, add_state_option

__all__ = ["register"]

Wrap = Callable[[TasksCommand], Callable[[argparse.Namespace], int]]

DEFAULT_BATCH = 1000


def register(commands: argparse._SubParsersAction[Any], wrap: Wrap) -> None:
    """Add ``requeue``, ``cancel`` and ``purge``."""
    requeue = commands.add_parser(
        "requeue", help="move dead (or cancelled) tasks back to pending with attempts reset"
    )
    requeue.add_argument("task_ids", metavar="ID", nargs="*", help="the tasks to requeue")
    requeue.add_argument("--dead", action="store_true", help="requeue every dead task (of --queue)")
    requeue.add_argument("--queue", help="with --dead: only this queue")
    _add_batch_option(requeue)
    add_json_option(requeue)
    requeue.set_defaults(handler=wrap(_requeue))

    cancel = commands.add_parser("cancel", help="cancel pending tasks: they will not run")
    cancel.add_argument("task_ids", metavar="ID", nargs="+")
    add_json_option(cancel)
    cancel.set_defaults(handler=wrap(_cancel))

    purge = commands.add_parser("purge", help="delete tasks in the given states")
    add_state_option(purge, required=True, help="delete tasks in this state (repeat for several)")
    purge.add_argument("--queue", help="only tasks of this queue")
    purge.add_argument(
        "--older-than",
        metavar="AGE",
        help="only tasks finished (pending: enqueued) longer ago than AGE: 90, 30m, 12h, 7d, 1h30m",
    )
    _add_batch_option(purge)
    add_json_option(purge)
    purge.set_defaults(handler=wrap(_purge))


def _add_batch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"change at most N tasks per storage round trip (default {DEFAULT_BATCH})",
    )


def _check_batch(args: argparse.Namespace) -> int:
    batch: int = args.batch_size
    if batch < 1:
        raise CliError(f"--batch-size must be at least 1, got {batch}")
    return batch


async def _requeue(args: argparse.Namespace, session: Session) -> int:
    batch = _check_batch(args)
    if args.dead == bool(args.task_ids):
        raise CliError("give the task IDs to requeue, or --dead for every dead task (not both)")
    if args.queue is not None and not args.dead:
        raise CliError("--queue only applies with --dead")
    tasks = session.tasks
    if not args.dead:
        return await _one_by_one(args, session, "requeue", tasks.requeue)
    stats = await tasks.stats()
    total = sum(counts.dead for queue, counts in stats.items() if args.queue in (None, queue))
    moved = 0
    async with _progress(session, "requeueing dead tasks", total, batch) as advance:
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
    _report(args, session, {"requeued": moved}, f"requeued {moved} dead task(s)")
    return 0


async def _cancel(args: argparse.Namespace, session: Session) -> int:
    return await _one_by_one(args, session, "cancel", session.tasks.cancel)


async def _one_by_one(
    args: argparse.Namespace, session: Session, verb: str, operation: Callable[[str], Any]
) -> int:
    """Apply ``operation`` to each id; a refused id is explained by the task's state."""
    status = 0
    done: list[str] = []
    failed: dict[str, str] = {}
    for task_id in args.task_ids:
        if await operation(task_id):
            done.append(task_id)
            continue
        info = await session.tasks.info(task_id)
        if info is None:
            failed[task_id] = "there is no task with this id"
            status = max(status, EXIT_NOT_FOUND)
        else:
            failed[task_id] = _refusal(verb, info.state)
            status = max(status, EXIT_REFUSED)
    past = "requeued" if verb == "requeue" else "cancelled"
    if args.json:
        print_json({past: done, "failed": failed})
        return status
    for task_id in done:
        session.console.print(f"{past} {task_id}", highlight=False)
    errors = Console(stderr=True)
    for task_id, why in failed.items():
        errors.print(f"[bold red]error:[/] cannot {verb} {task_id}: {why}", soft_wrap=True, highlight=False)
    return status


def _refusal(verb: str, state: TaskState) -> str:
    if verb == "requeue":
        return f"it is {state.value}; only dead or cancelled tasks can be requeued"
    if state is TaskState.ACTIVE:
        return "it is running (active); a running task cannot be cancelled"
    return f"it is {state.value} already; only pending tasks can be cancelled"


async def _purge(args: argparse.Namespace, session: Session) -> int:
    batch = _check_batch(args)
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
    async with _progress(session, "purging", estimate, batch) as advance:
        while True:
            count = await tasks.backend.purge(states=states, queue=args.queue, before=before, limit=batch)
            deleted += count
            advance(count)
            if count < batch:
                break
    names = "/".join(sorted(state.value for state in states))
    _report(args, session, {"purged": deleted}, f"purged {deleted} {names} task(s)")
    return 0


def _report(args: argparse.Namespace, session: Session, data: dict[str, Any], text: str) -> None:
    if args.json:
        print_json(data)
    else:
        session.console.print(text, highlight=False)


@asynccontextmanager
async def _progress(
    session: Session, description: str, total: int, batch: int
) -> AsyncIterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal and the work takes more than one batch."""
    console = Console(stderr=True)
    if total <= batch or not console.is_terminal:
        yield lambda count: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task: TaskID = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task, count)
