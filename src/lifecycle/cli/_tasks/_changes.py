"""What the commands that change tasks (``requeue``, ``cancel``, ``purge``) share: ``--batch-size``, a
progress bar for bulk work, changing tasks one id at a time, and the final report.

Bulk operations (``requeue --dead``, ``purge``) work in batches of ``--batch-size`` so no single statement
holds the storage for long, with a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..._checks import check_count
from ...asynctask import TaskState
from ._format import EXIT_NOT_FOUND, EXIT_REFUSED, option, print_json
from ._session import Session

__all__ = ["DEFAULT_BATCH", "add_batch_option", "batch_size", "one_by_one", "progress", "report"]

DEFAULT_BATCH = 1000


def add_batch_option(parser: argparse.ArgumentParser) -> None:
    """``--batch-size N`` (default :data:`DEFAULT_BATCH`)."""
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"change at most N tasks per storage round trip (default {DEFAULT_BATCH})",
    )


def batch_size(args: argparse.Namespace) -> int:
    """``--batch-size``, checked: a whole number of at least 1 (a :class:`CliError` otherwise)."""
    return option(check_count, args.batch_size, "--batch-size", minimum=1)


async def one_by_one(
    args: argparse.Namespace, session: Session, verb: str, operation: Callable[[str], Any]
) -> int:
    """Apply ``operation`` to each id; a refused id is explained by the task's state."""
    status = 0
    done: list[str] = []
    requested: list[str] = []  # running tasks asked to stop (cancel)
    failed: dict[str, str] = {}
    for task_id in args.task_ids:
        try:
            changed = await operation(task_id)
        except RuntimeError as exc:  # a running task on a store that cannot cancel one
            failed[task_id] = str(exc)
            status = max(status, EXIT_REFUSED)
            continue
        if changed:
            after = await session.tasks.info(task_id) if verb == "cancel" else None
            (requested if after is not None and after.state is TaskState.ACTIVE else done).append(task_id)
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
        changes: dict[str, Any] = {past: done}
        if verb == "cancel":
            changes["cancel_requested"] = requested
        print_json({**changes, "failed": failed})
        return status
    for task_id in done:
        session.console.print(f"{past} {task_id}", highlight=False)
    for task_id in requested:
        session.console.print(
            f"cancellation requested {task_id} (running: its worker stops it, then it is cancelled)",
            highlight=False,
        )
    errors = Console(stderr=True)
    for task_id, why in failed.items():
        errors.print(f"[bold red]error:[/] cannot {verb} {task_id}: {why}", soft_wrap=True, highlight=False)
    return status


def _refusal(verb: str, state: TaskState) -> str:
    if verb == "requeue":
        return f"it is {state.value}; only dead or cancelled tasks can be requeued"
    if state is TaskState.ACTIVE:  # it finished between the cancel and this look
        return "it was running and has just finished"
    return f"it is {state.value} already; only pending or running tasks can be cancelled"


def report(args: argparse.Namespace, session: Session, data: dict[str, Any], text: str) -> None:
    """Say what a bulk command did: ``data`` as JSON with ``--json``, else ``text``."""
    if args.json:
        print_json(data)
    else:
        session.console.print(text, highlight=False)


@asynccontextmanager
async def progress(
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
