"""Rich reports for humans: a TaskManagerError (task, stage, exception, traceback) and load errors."""

from __future__ import annotations

import anyio
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text
from rich.traceback import Traceback

from .. import _manager as lifecycle_package
from .._errors import TaskError, TaskManagerError
from ._load import LoadError

__all__ = ["print_failure_report", "print_load_error"]

# Frames of these show as one line each, without source: the user's own frames are what matter.
_QUIET_MODULES = [anyio, lifecycle_package]


def _error_panel(error: TaskError) -> Panel:
    cause = error.__cause__
    title = f"task {error.task_name!r} failed in {error.stage.value} ({error.task_type.name})"
    if cause is None:
        return Panel(Text(str(error)), title=title, title_align="left", border_style="red")
    headline = Text.assemble((type(cause).__name__, "bold red"), ": ", str(cause))
    body: list[Text | Traceback] = [headline]
    if cause.__traceback__ is not None:
        body.append(
            Traceback.from_exception(
                type(cause), cause, cause.__traceback__, show_locals=False, suppress=_QUIET_MODULES
            )
        )
    return Panel(Group(*body), title=title, title_align="left", border_style="red")


def print_failure_report(console: Console, error: TaskManagerError) -> None:
    """Print each failed task (name, stage, type, exception and traceback), then a one-line summary."""
    for task_error in error.errors:
        console.print(_error_panel(task_error))
    console.print(Text(error.message, style="bold red"))


def print_load_error(console: Console, error: LoadError) -> None:
    """Print why a ``MODULE:ATTR`` target could not be loaded, with the underlying traceback if any."""
    console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
    cause = error.__cause__
    if cause is not None and cause.__traceback__ is not None:
        console.print(Traceback.from_exception(type(cause), cause, cause.__traceback__))
