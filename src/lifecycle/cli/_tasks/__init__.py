"""``lifecycle tasks --backend URL COMMAND``: look at and act on stored tasks from a shell.

Commands: ``stats``, ``list``, ``show``, ``group``, ``requeue``, ``cancel``, ``purge``, ``pause``,
``resume``, ``watch``, ``schedules`` and ``web`` (the web dashboard). The backend comes from ``--backend
URL`` (or the ``LIFECYCLE_TASKS_BACKEND`` environment variable), or from the ``AsyncTasks`` named by ``--app
MODULE:ATTR`` (which also brings its encoding, to decode results, its schedules and its flow limits).
Every command runs on asyncio (the Redis and PostgreSQL clients need it).

The options ``--backend``, ``--app``, ``--json`` and ``--debug`` go before or after the command.

Exit status: 0 done; 1 the backend failed (unreachable, storage error) or an unexpected error; 2 usage
error (bad option, URL, duration or target); 3 a task id that does not exist; 4 a task in a state the
operation does not apply to. Errors are one line on stderr; ``--debug`` prints the traceback too. Passwords
in URLs and DSNs are shown as ``***`` everywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import (
    _cancel,
    _group,
    _list,
    _pause,
    _purge,
    _requeue,
    _resume,
    _schedules,
    _show,
    _stats,
    _watch,
    _web,
)
from ._format import EXIT_USAGE, plain_help
from ._session import add_shared_options

__all__ = ["register"]

# The command modules (one per command, each with ``register(commands)``), in the order --help lists them:
# the read commands, then those that change tasks.
_COMMANDS = (
    _stats,
    _list,
    _show,
    _group,
    _watch,
    _schedules,
    _web,
    _requeue,
    _cancel,
    _purge,
    _pause,
    _resume,
)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``tasks`` subcommand and its own subcommands."""
    parser = subparsers.add_parser(
        "tasks",
        help=(
            "inspect and manage stored async tasks (stats, list, show, group, requeue, cancel, purge, "
            "pause, resume, watch, schedules, web)"
        ),
        description=plain_help(__doc__.split("\n\n", 1)[1]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_shared_options(parser, default=None)
    parser.add_argument("--json", action="store_true", dest="json_global", help="JSON output (read commands)")
    parser.set_defaults(handler=_tasks_help(parser), json=False)
    commands = parser.add_subparsers(dest="tasks_command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(commands)
    for command in commands.choices.values():
        # The same options after the command (`lifecycle tasks stats --backend URL`); given there, they win.
        add_shared_options(command, default=argparse.SUPPRESS)


def _tasks_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return handler
