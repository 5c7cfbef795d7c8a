"""``lifecycle worker MODULE:ATTR``: run an ``AsyncTasks`` as a worker process under a TaskManager, with
``lifecycle.run``'s signal policy (first SIGINT/SIGTERM drains, second cancels cleanups, third exits)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape

from .._checks import check_count, check_name
from .._core._manager import TaskManager
from .._redact import redact
from .._run import run
from ..asynctask import AsyncTasks
from ._load import LoadError, load_async_tasks, print_load_error

__all__ = ["configure_worker", "parse_queues", "register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``worker`` subcommand."""
    parser = subparsers.add_parser(
        "worker",
        help="run the async-task workers of an AsyncTasks until SIGINT/SIGTERM",
        description=(
            "Run the AsyncTasks found at MODULE:ATTR (an AsyncTasks, or a zero-argument function returning "
            "one) as a worker under a TaskManager with lifecycle.run's signal policy: the first "
            "SIGINT/SIGTERM stops claiming and lets running tasks finish within shutdown_grace (the rest "
            "return to pending), the second cancels the cleanup, the third exits at once. Exit status: 0 "
            "clean stop, 1 when the worker failed (e.g. the backend cannot be opened), 2 when the target "
            "cannot be loaded or an option is invalid."
        ),
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="for example myapp.tasks:tasks")
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="how many tasks run at once in this process (default: the AsyncTasks' own setting)",
    )
    parser.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME[=WEIGHT]",
        help=(
            "a queue to take tasks from; repeat for several: in the order given (strict priority), or "
            "all with =WEIGHT for weighted order (default: the AsyncTasks' own queues)"
        ),
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library to run on (default: asyncio; Redis and PostgreSQL backends need asyncio)",
    )
    parser.set_defaults(handler=_worker_command)


def parse_queues(values: list[str]) -> list[str] | dict[str, int]:
    """``--queue`` values as a strict list, or a weighted mapping when every value is ``NAME=WEIGHT``.
    Raises ``ValueError`` for a mix, an empty name or a weight that is not a positive integer."""
    weighted = ["=" in value for value in values]
    if any(weighted) and not all(weighted):
        raise ValueError(
            "give every --queue a weight (--queue high=6 --queue low=1) or none (strict order), not a mix"
        )
    if not all(weighted):
        return [check_name(value, "--queue NAME") for value in values]
    weights: dict[str, int] = {}
    for value in values:
        name, _, weight = value.partition("=")
        check_name(name, f"--queue {value}: the queue name")
        try:
            weights[name] = check_count(int(weight), f"--queue {value}: the weight", minimum=1)
        except ValueError:
            raise ValueError(
                f"--queue {value}: the weight must be a positive integer, as in {name or 'NAME'}=3"
            ) from None
    return weights


def configure_worker(
    tasks: AsyncTasks, *, concurrency: int | None = None, queues: list[str] | dict[str, int] | None = None
) -> None:
    """Override the worker settings of ``tasks`` before it runs (the command line's ``--concurrency`` and
    ``--queue``), through :meth:`AsyncTasks.configure_worker`. Raises ``ValueError``/``TypeError`` naming a
    bad value."""
    if concurrency is not None:
        check_count(concurrency, "--concurrency", minimum=1)
    tasks.configure_worker(concurrency=concurrency, queues=queues)


def _worker_command(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        tasks = load_async_tasks(args.target)
    except LoadError as exc:
        print_load_error(console, exc)
        return 2
    if not tasks.execution:
        console.print(
            f"[bold red]error:[/] {args.target!r} was built with execution=False (enqueue-only); a worker "
            "needs an AsyncTasks that executes: build it with execution=True for this process",
            soft_wrap=True,
        )
        return 2
    try:
        configure_worker(
            tasks,
            concurrency=args.concurrency,
            queues=None if args.queues is None else parse_queues(args.queues),
        )
    except (ValueError, TypeError) as exc:
        console.print(
            f"[bold red]error:[/] {escape(redact(str(exc)))}", soft_wrap=True, markup=True, highlight=False
        )
        return 2
    if not tasks.task_names:
        console.print(
            f"[yellow]warning:[/] {args.target!r} has no registered task functions; tasks it claims will "
            "fail as unknown and be retried",
            soft_wrap=True,
        )
    console.print(
        f"worker: {redact(repr(tasks.backend))}, queues {', '.join(tasks.queues)}, "
        f"concurrency {tasks.concurrency}, {len(tasks.task_names)} registered task(s)",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    manager = TaskManager(name="lifecycle-worker")
    manager.add_task("async-tasks", tasks)
    return run(manager, backend=args.backend)
