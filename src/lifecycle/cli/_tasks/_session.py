"""What every ``lifecycle tasks`` command shares: the options ``--backend``, ``--app``, ``--json`` and
``--debug``, the opened session (the ``AsyncTasks`` over the backend), and :func:`with_tasks`, which runs a
command on asyncio and turns its errors into one line with the documented exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
from rich.console import Console
from rich.text import Text

from ..._compat import unwrap_single
from ..._redact import redact
from ...asynctask import AsyncTasks, Backend, TaskState, backend_from_url
from ...asynctask._backend import Create, opens_without_creating
from ...asynctask._errors import StoreNotFoundError
from .._load import LoadError, load_async_tasks
from ._format import CliError

__all__ = [
    "BACKEND_ENV",
    "Session",
    "TasksCommand",
    "add_json_option",
    "add_shared_options",
    "add_state_option",
    "open_session",
    "with_tasks",
]

#: The environment variable read when ``--backend`` is not given.
BACKEND_ENV = "LIFECYCLE_TASKS_BACKEND"


@dataclass(frozen=True, slots=True)
class Session:
    """What a ``tasks`` subcommand works with: the opened (enqueue-only) ``tasks``, the ``--app`` AsyncTasks
    when one was given, and the console for humans (stdout)."""

    tasks: AsyncTasks
    app: AsyncTasks | None
    console: Console


#: A subcommand's implementation: gets the parsed arguments and the session, returns the exit status.
TasksCommand = Callable[[argparse.Namespace, Session], Awaitable[int]]

_STATES = [state.value for state in TaskState]


def add_shared_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """``--backend``, ``--app`` and ``--debug``: on ``tasks`` with their defaults, and on each command with
    ``argparse.SUPPRESS`` (so that not giving them there keeps what was given before the command)."""
    parser.add_argument(
        "--backend",
        metavar="URL",
        default=os.environ.get(BACKEND_ENV) if default is None else default,
        help=(
            "where the tasks are stored: sqlite:///path.db, redis://host:port/db?prefix=NAME, "
            f"postgresql://user@host/db?schema=NAME, nats://host:4222?prefix=NAME (default: ${BACKEND_ENV})"
        ),
    )
    parser.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        default=default,
        help="an AsyncTasks (or a function returning one): its backend, encoding and schedules are used",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if default is None else default,
        help="print tracebacks of errors",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json`` on a read command (``lifecycle tasks --json COMMAND`` works as well)."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")


def add_state_option(parser: argparse.ArgumentParser, *, help: str, required: bool = False) -> None:
    """``--state STATE`` (repeatable) with the valid states as choices."""
    parser.add_argument(
        "--state", action="append", choices=_STATES, required=required, dest="states", help=help
    )


def with_tasks(command: TasksCommand) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler: open the tasks, run ``command`` on asyncio, turn errors into one line."""

    def handler(args: argparse.Namespace) -> int:
        args.json = bool(getattr(args, "json", False) or args.json_global)
        console = Console(stderr=True)
        sources = [args.backend] if args.backend else []
        try:
            return anyio.run(_run, command, args, backend="asyncio")
        except KeyboardInterrupt:
            return 130
        except CliError as exc:
            _print_error(console, str(exc), args.debug, None, *sources)
            return exc.exit_code
        except Exception as exc:
            error = unwrap_single(exc)
            if isinstance(error, CliError):
                _print_error(console, str(error), args.debug, None, *sources)
                return error.exit_code
            text = f"{type(error).__name__}: {error}"
            if not args.debug:
                text += " (run with --debug for the traceback)"
            _print_error(console, text, args.debug, error, *sources)
            return 1

    return handler


async def _run(command: TasksCommand, args: argparse.Namespace) -> int:
    # Schedules are declared in code: listing them neither needs stored tasks nor creates a store.
    create: Create = "on_enqueue" if args.tasks_command == "schedules" else False
    async with open_session(args.backend, args.app, create=create) as session:
        return await command(args, session)


@asynccontextmanager
async def open_session(url: str | None, app: str | None, *, create: Create = False) -> AsyncIterator[Session]:
    """The opened :class:`AsyncTasks` (enqueue-only) over ``url``'s backend, or the app's own AsyncTasks
    (with ``url`` given as well, the app's encoding over ``url``'s backend). Raises :class:`CliError`.

    A built-in backend is opened with ``create``: by default (``False``) a store that does not exist is an
    error, never created, whatever the app's AsyncTasks would do; ``"on_enqueue"`` creates nothing either
    and finds no tasks."""
    loaded = _load_app(app) if app else None
    if url is None and loaded is None:
        raise CliError(
            f"no task backend given: pass --backend URL (e.g. --backend sqlite:///tasks.db), set "
            f"${BACKEND_ENV}, or pass --app MODULE:ATTR naming your AsyncTasks"
        )
    if url is not None:
        if create is False:
            _check_sqlite_file(url)
        try:
            backend = backend_from_url(url)
        except (ValueError, ImportError) as exc:
            raise CliError(redact(str(exc), url)) from exc
        tasks = AsyncTasks(backend, execution=False, encoding=None if loaded is None else loaded.encoding)
    else:
        assert loaded is not None
        tasks = loaded
    await _open_backend(tasks.backend, create)
    async with tasks:
        yield Session(tasks, loaded, Console())


async def _open_backend(backend: Backend, create: Create) -> None:
    """Open ``backend`` with ``create`` before ``AsyncTasks`` does (its ``open`` then does nothing): a
    missing store is a usage error, like a missing SQLite file. A backend whose ``open`` takes no
    ``create`` is left to ``AsyncTasks``."""
    if not opens_without_creating(backend):
        return
    try:
        await backend.open(create=create)  # type: ignore[call-arg]
    except StoreNotFoundError as exc:
        raise CliError(str(exc)) from None


def _load_app(spec: str) -> AsyncTasks:
    try:
        return load_async_tasks(spec)
    except LoadError as exc:
        raise CliError(str(exc)) from exc


def _check_sqlite_file(url: str) -> None:
    # Opening a SQLite URL creates the file: a typo would silently show an empty, new database.
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite" or parts.netloc:
        return
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if not path or path == ":memory:":
        return
    if not Path(path).expanduser().exists():
        raise CliError(
            f"there is no SQLite database at {redact(path, url)!r} (from {redact(url, url)!r}); check the "
            "path: sqlite:///relative/path.db is relative to the current directory, sqlite:////abs/path.db "
            "absolute"
        )


def _print_error(
    console: Console, message: str, debug: bool, error: BaseException | None = None, *sources: str
) -> None:
    """``error: MESSAGE`` on one line (and with ``--debug`` the traceback), passwords masked."""
    console.print(Text.assemble(("error: ", "bold red"), redact(message, *sources)), soft_wrap=True)
    if debug and error is not None and error.__traceback__ is not None:
        from rich.traceback import Traceback

        trace = Traceback.extract(type(error), error, error.__traceback__)
        _redact_trace(trace, sources)  # the messages of the error and its causes can quote a URL
        # The event loop's own frames are shown by place only, without their code: they say nothing about
        # the failure, and rich highlights each frame's file from its first line (a third of the time).
        console.print(Traceback(trace, suppress=_PLUMBING))


_PLUMBING = (asyncio, anyio, contextlib)
"""The modules whose frames a ``--debug`` traceback shows without their code: the event loop and the
context managers every command runs through."""


def _redact_trace(trace: Any, sources: Sequence[str]) -> None:
    for stack in trace.stacks:
        stack.exc_value = redact(stack.exc_value, *sources)
        if getattr(stack, "notes", None):
            stack.notes = [redact(note, *sources) for note in stack.notes]
        for inner in getattr(stack, "exceptions", None) or ():
            _redact_trace(inner, sources)
