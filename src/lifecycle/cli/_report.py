"""Rich reports for humans: a TaskManagerError (task, stage, exception, traceback) and load errors."""

from __future__ import annotations

import traceback

import anyio
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text
from rich.traceback import Traceback

from .._core import _manager as lifecycle_package
from .._core._errors import TaskError, TaskManagerError
from .._redact import redact
from ._load import LoadError

__all__ = ["print_failure_report", "print_load_error"]

# Frames of these show as one line each, without source: the user's own frames are what matter.
_QUIET_MODULES = [anyio, lifecycle_package]


def _title(error: TaskError) -> str:
    return f"task {error.task_name!r} failed in {error.stage.value} ({error.task_type.name})"


def _error_panel(error: TaskError, tracebacks: bool) -> Panel:
    cause = error.__cause__
    title = _title(error)
    if cause is None:
        return Panel(Text(redact(str(error))), title=title, title_align="left", border_style="red")
    headline = Text.assemble((type(cause).__name__, "bold red"), ": ", redact(str(cause)))
    body: list[Text | Traceback] = [headline]
    if cause.__traceback__ is not None:
        if tracebacks:
            trace = Traceback.extract(type(cause), cause, cause.__traceback__, show_locals=False)
            for stack in trace.stacks:
                stack.exc_value = redact(stack.exc_value)
            body.append(Traceback(trace, suppress=_QUIET_MODULES))
        else:
            body.append(Text("(its traceback is in the log above)", style="dim"))
    return Panel(Group(*body), title=title, title_align="left", border_style="red")


def _plain_lines(error: TaskError, tracebacks: bool) -> str:
    cause = error.__cause__
    if cause is None:
        return redact(f"{_title(error)}: {error}")
    if tracebacks and cause.__traceback__ is not None:
        return redact(f"{_title(error)}:\n" + "".join(traceback.format_exception(cause)).rstrip("\n"))
    return redact(f"{_title(error)}: {type(cause).__name__}: {cause}")


def print_failure_report(console: Console, error: TaskManagerError, *, tracebacks: bool = True) -> None:
    """Print each failed task (name, stage, type, exception and, with ``tracebacks``, its traceback), then a
    one-line summary. A rich panel per task on a terminal; plain, unwrapped lines anywhere else."""
    if not console.is_terminal:
        for task_error in error.errors:
            console.print(_plain_lines(task_error, tracebacks), markup=False, highlight=False, soft_wrap=True)
        console.print(redact(error.message), markup=False, highlight=False, soft_wrap=True)
        return
    for task_error in error.errors:
        console.print(_error_panel(task_error, tracebacks))
    console.print(Text(redact(error.message), style="bold red"))


def print_load_error(console: Console, error: LoadError) -> None:
    """Print why a ``MODULE:ATTR`` target could not be loaded, with the underlying traceback if any."""
    console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
    cause = error.__cause__
    if cause is not None and cause.__traceback__ is not None:
        console.print(Traceback.from_exception(type(cause), cause, cause.__traceback__))
