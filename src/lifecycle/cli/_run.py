"""``lifecycle run MODULE:ATTR [--backend asyncio|trio]``: run a TaskManager like ``lifecycle.run`` does."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from .._run import run
from ._load import LoadError, load_manager, print_load_error

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``run`` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="run a TaskManager until SIGINT/SIGTERM or until it stops by itself",
        description=(
            "Run the TaskManager found at MODULE:ATTR (a TaskManager, or a zero-argument function returning "
            "one) with lifecycle.run: the first SIGINT/SIGTERM shuts it down gracefully, the second cancels "
            "running cleanups, the third exits at once. Exit status: 0 clean, 1 when a task failed, 2 when "
            "the target cannot be loaded."
        ),
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="for example myservice.main:manager")
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library to run on (default: asyncio)",
    )
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    try:
        manager = load_manager(args.target)
    except LoadError as exc:
        print_load_error(Console(stderr=True), exc)
        return 2
    return run(manager, backend=args.backend)
