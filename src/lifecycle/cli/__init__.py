"""The ``lifecycle`` command line: ``lifecycle --version``, ``lifecycle run MODULE:ATTR`` and friends.

Rich output lives here (and in :func:`lifecycle.run`'s console output); the library itself only logs.
Importing this package is cheap: the parser and its subcommands load when :func:`main` runs.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lifecycle`` console script; returns the process exit status."""
    from ._app import main as app_main

    return app_main(argv)
