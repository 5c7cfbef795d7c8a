"""Human output of :func:`lifecycle.run`, the one place outside ``lifecycle.cli`` that uses rich.

- :func:`stderr_console`: the console everything here writes to (stderr; a terminal gets colours).
- :func:`configure_logging`: logging at INFO for a process whose application configured none: rich lines on
  a terminal, one plain line per event anywhere else.
- :func:`print_failure_report`: each failed task of a :class:`~lifecycle.TaskManagerError` (name, stage,
  exception, traceback), a rich panel each on a terminal, plain unwrapped lines anywhere else.
- :func:`print_plain`: a text (the stuck-shutdown report) exactly as it is, never wrapped or marked up.

The library itself only logs; the core never imports this module (nor rich). The ``lifecycle`` command
imports :func:`print_failure_report` from here too. Passwords of URLs and DSNs are masked in all of it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from types import ModuleType

import anyio
from rich.console import Console, Group
from rich.logging import RichHandler
from rich.panel import Panel
from rich.text import Text
from rich.traceback import Traceback

from ._core._errors import TaskError, TaskManagerError
from ._redact import redact

__all__ = ["configure_logging", "print_failure_report", "print_plain", "stderr_console"]

# Frames of these show as one line each, without source: the user's own frames are what matter.
_QUIET_MODULES: list[ModuleType | str] = [anyio, str(Path(__file__).parent / "_core")]


def stderr_console() -> Console:
    """A rich console on stderr (it finds out by itself whether stderr is a terminal)."""
    return Console(stderr=True)


def print_plain(console: Console, text: str) -> None:
    """Print ``text`` as it is: no markup, no highlighting, long lines never wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ logging


class _RedactingRichHandler(RichHandler):
    """Rich log lines with rich tracebacks, except for a record whose traceback shows a secret: that one is
    written with the traceback the redacting filter rendered, masked."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "lifecycle_secret_in_traceback", False):
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = f"{record.getMessage()}\n{record.exc_text}", None
            record.exc_info, record.exc_text = None, None
        super().emit(record)


def configure_logging(console: Console) -> bool:
    """Log at INFO to stderr unless the application configured logging itself; True when this configured it.

    On a terminal the lines are rich (coloured, wrapped to the terminal's width). Anywhere else (a container,
    a pipe, a file) each event is one plain line, never wrapped, with its traceback, if any, on the lines
    after it: what log collectors expect.
    """
    root = logging.getLogger()
    if root.handlers:
        return False
    if console.is_terminal:
        handler: logging.Handler = _RedactingRichHandler(
            console=console, show_path=False, rich_tracebacks=True, markup=False
        )
        logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=[handler])
    else:
        handler = logging.StreamHandler(sys.stderr)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[handler]
        )
    return True


# ------------------------------------------------------------------------------------ the failure report


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
            print_plain(console, _plain_lines(task_error, tracebacks))
        print_plain(console, redact(error.message))
        return
    for task_error in error.errors:
        console.print(_error_panel(task_error, tracebacks))
    console.print(Text(redact(error.message), style="bold red"))
