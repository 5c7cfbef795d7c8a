"""The argument parser and dispatch of the ``lifecycle`` command.

Each subcommand lives in its own module with a ``register(subparsers)`` function that adds its parser and
sets ``handler`` (a function taking the parsed ``argparse.Namespace`` and returning an exit status). To add a
subcommand, write the module and list it in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

from .._version import __version__

__all__ = ["COMMAND_MODULES", "Handler", "build_parser", "main"]

#: Modules that register a subcommand, in the order ``lifecycle --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = ("lifecycle.cli._run", "lifecycle.cli._worker", "lifecycle.cli._tasks")

#: What a subcommand's ``handler`` default must be.
Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The ``lifecycle`` parser with every subcommand of :data:`COMMAND_MODULES` registered."""
    parser = argparse.ArgumentParser(
        prog="lifecycle",
        description="Run Python services built on lifecycle TaskManagers (asyncio or trio).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))
