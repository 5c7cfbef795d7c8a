"""Subprocess: a Task that runs an OS child process for the life of the service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Union

import anyio
from anyio.abc import Process

from .._checks import check_name, check_seconds
from .._core._errors import UnexpectedStopError
from .._redact import library_logger
from ._lines import LineReader

__all__ = ["ProcessExitedError", "Subprocess"]

logger = library_logger("lifecycle.tasks")

Command = Union[str, Sequence[Union[str, "os.PathLike[str]"]]]

#: How long to keep reading output after the child exited (a grandchild may hold the pipe open forever).
_DRAIN_AFTER_EXIT = 1.0
#: How many of the last output lines an error message quotes.
_LINES_IN_ERRORS = 10


class ProcessExitedError(UnexpectedStopError):
    """A :class:`Subprocess` child exited when it should not have: before it was ready, or with a failure.

    Attributes:
        returncode: the exit status (negative: killed by that signal number).
        output: the last lines the child wrote (stdout and stderr), oldest first.
    """

    def __init__(self, message: str, returncode: int, output: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.returncode: int = returncode
        self.output: tuple[str, ...] = tuple(output)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.returncode, self.output))


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _default_name(command: Command) -> str:
    if isinstance(command, str):
        words = command.split()
        first = words[0] if words else ""
    else:
        first = os.fspath(command[0]) if command else ""
    return os.path.basename(first) or "subprocess"


class Subprocess:
    """A :class:`~lifecycle.Task` that manages an OS child process with ``anyio.open_process``.

    - ``initialize`` starts the child. With ``ready``, it then waits until an output line satisfies
      ``ready(line)`` (bound it with the manager's ``initialize_timeout``); when the child exits first it
      raises :class:`ProcessExitedError` with the exit code and the last output lines. A failing or cancelled
      ``initialize`` stops the child before raising.
    - ``execute`` waits for the child to exit. Exit code 0 returns normally, so the task type decides what
      it means (``STRICT``: an unexpected stop; ``ERROR``: fine; ``STOP_GROUP``: this part of the job is
      done); any other exit raises :class:`ProcessExitedError` (an :class:`~lifecycle.UnexpectedStopError`)
      naming the exit code or the signal, with the last output lines.
    - ``cleanup`` sends SIGTERM, waits up to ``stop_timeout`` seconds, then sends SIGKILL. If the cleanup
      itself is cancelled (``cleanup_timeout``, a second Ctrl-C) the child is killed at once.

    Output: stdout and stderr are merged and every line goes to the ``lifecycle.tasks`` logger at INFO,
    prefixed with ``name[pid]``. Lines are read in ``initialize`` (while waiting for ``ready``), ``execute``
    and ``cleanup``; between ``initialize`` and ``execute`` the OS pipe buffers them (64 KiB on Linux).
    stdin is ``/dev/null``.

    The child runs in the service's process group, so a Ctrl-C in a terminal reaches it directly, as with
    any subprocess. ``initialize`` may run again after ``cleanup`` (e.g. inside
    :class:`~lifecycle.tasks.Interruptible`): it starts a new child.

    Args:
        args: the program and its arguments (a sequence), or a shell command line (a string).
        env: the child's whole environment (like ``subprocess``), or ``None`` to inherit this process's.
        cwd: the child's working directory.
        ready: called with each output line during ``initialize`` until it returns true.
        stop_timeout: seconds between SIGTERM and SIGKILL in ``cleanup`` (a number or ``timedelta``).
        name: shown in logs and errors (a non-empty string); defaults to the program's file name.

    Raises ``ValueError`` for empty ``args``, a ``stop_timeout`` that is not a finite number of seconds
    greater than zero, or an empty ``name``; ``TypeError`` for ``args`` of the wrong type, a ``ready`` that
    is not callable, a ``stop_timeout`` that is not a number (``bool`` is not one) or a ``name`` that is not
    a string.

    Example::

        manager.add_task(
            "redis",
            Subprocess(["redis-server", "--port", "6380"], ready=lambda line: "Ready to accept" in line),
            initialize_timeout=10,
        )
    """

    def __init__(
        self,
        args: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready: Callable[[str], bool] | None = None,
        stop_timeout: float | timedelta = 10.0,
        name: str | None = None,
    ) -> None:
        given: object = args
        if isinstance(given, bytes) or not isinstance(given, (str, Sequence)):
            raise TypeError(
                f"Subprocess args must be a list of program and arguments or a string, got {args!r}"
            )
        if not (args.strip() if isinstance(args, str) else len(args)):
            raise ValueError("Subprocess args is empty: give the program to run, e.g. ['redis-server']")
        if ready is not None and not callable(ready):
            raise TypeError(f"Subprocess ready must be a callable taking an output line, got {ready!r}")
        self._args: Command = args if isinstance(args, str) else list(args)
        self._env = None if env is None else dict(env)
        self._cwd = cwd
        self._ready = ready
        self._stop_timeout = check_seconds(stop_timeout, "Subprocess stop_timeout")
        self._name = _default_name(args) if name is None else check_name(name, "Subprocess name")
        self._process: Process | None = None
        self._reader: LineReader | None = None
        self._output_closed = anyio.Event()
        self._last_lines: deque[str] = deque(maxlen=_LINES_IN_ERRORS)
        self._returncode: int | None = None

    @property
    def name(self) -> str:
        """The name used in log lines and errors."""
        return self._name

    @property
    def pid(self) -> int | None:
        """The running child's process id, or ``None`` when no child is running."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """The last child's exit status once it exited (negative: killed by that signal), else ``None``."""
        if self._process is not None and self._process.returncode is not None:
            return self._process.returncode
        return self._returncode

    @property
    def output(self) -> tuple[str, ...]:
        """The last lines the child wrote, oldest first (kept for error messages)."""
        return tuple(self._last_lines)

    async def initialize(self) -> None:
        """Start the child and, with ``ready``, wait until an output line satisfies it."""
        if self._process is not None:
            raise RuntimeError(f"{self._name}: the child process is already running; call cleanup() first")
        self._last_lines.clear()
        self._returncode = None
        self._output_closed = anyio.Event()
        process = await anyio.open_process(
            self._args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self._cwd,
            env=self._env,
        )
        assert process.stdout is not None
        self._process = process
        self._reader = LineReader(process.stdout)
        logger.info("%s: started (pid %d)", self._label, process.pid)
        if self._ready is None:
            return
        try:
            await self._wait_until_ready(process, self._ready)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop(process)
            raise

    async def execute(self) -> None:
        """Wait for the child to exit; code 0 returns, anything else raises :class:`ProcessExitedError`."""
        process = self._process
        if process is None:
            raise RuntimeError(f"{self._name}: execute() needs a running child: call initialize() first")
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._pump)
            returncode = await process.wait()
            with anyio.move_on_after(_DRAIN_AFTER_EXIT):
                await self._output_closed.wait()
            task_group.cancel_scope.cancel()
        if returncode == 0:
            logger.info("%s: exited with code 0", self._label)
            return
        message = (
            f"{self._name}: the child process {_describe_exit(returncode)} while the service was running"
        )
        raise ProcessExitedError(self._with_output(message), returncode, self._last_lines)

    async def cleanup(self) -> None:
        """Stop the child: SIGTERM, then SIGKILL after ``stop_timeout``; returns once it has exited."""
        process = self._process
        if process is not None:
            await self._stop(process)

    @property
    def _label(self) -> str:
        process = self._process
        return self._name if process is None else f"{self._name}[{process.pid}]"

    async def _wait_until_ready(self, process: Process, ready: Callable[[str], bool]) -> None:
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if line is None:
                break
            self._log_line(line)
            if ready(line):
                logger.info("%s: ready", self._label)
                return
        self._output_closed.set()
        with anyio.move_on_after(self._stop_timeout):
            await process.wait()
        if process.returncode is None:
            raise RuntimeError(
                self._with_output(
                    f"{self._name}: the child closed its output without writing a line that satisfies "
                    "ready(); it was stopped"
                )
            )
        message = (
            f"{self._name}: the child process {_describe_exit(process.returncode)} before it was ready (no "
            "output line satisfied ready())"
        )
        raise ProcessExitedError(self._with_output(message), process.returncode, self._last_lines)

    async def _stop(self, process: Process) -> None:
        try:
            if process.returncode is None:
                returncode = await self._terminate(process)
                logger.info("%s: stopped (%s)", self._label, _describe_exit(returncode))
        except BaseException:
            if process.returncode is None:
                logger.warning("%s: stopping was interrupted: sending SIGKILL", self._label)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await process.aclose()
            self._returncode = process.returncode
            self._process = None
            self._reader = None

    async def _terminate(self, process: Process) -> int:
        """SIGTERM, then SIGKILL after ``stop_timeout``, reading output meanwhile; the exit status."""
        logger.info("%s: stopping: SIGTERM, SIGKILL in %gs if still running", self._label, self._stop_timeout)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        async with anyio.create_task_group() as task_group:
            # Keep reading output: a child blocked on a full pipe could not exit.
            task_group.start_soon(self._pump)
            returncode: int | None = None
            with anyio.move_on_after(self._stop_timeout):
                returncode = await process.wait()
            if returncode is None:
                logger.warning(
                    "%s: still running %gs after SIGTERM: sending SIGKILL", self._label, self._stop_timeout
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                returncode = await process.wait()
            exited: int = returncode
            with anyio.move_on_after(_DRAIN_AFTER_EXIT):
                await self._output_closed.wait()
            task_group.cancel_scope.cancel()
        return exited

    async def _pump(self) -> None:
        """Log output lines until the child closes its output."""
        reader = self._reader
        if reader is None:
            return
        while (line := await reader.readline()) is not None:
            self._log_line(line)
        self._output_closed.set()

    def _log_line(self, line: str) -> None:
        self._last_lines.append(line)
        logger.info("%s | %s", self._label, line)

    def _with_output(self, message: str) -> str:
        if not self._last_lines:
            return f"{message}; it wrote no output"
        quoted = "\n".join(f"    {line}" for line in self._last_lines)
        return f"{message}; its last output lines:\n{quoted}"

    def __repr__(self) -> str:
        state = "not running" if self._process is None else f"pid {self._process.pid}"
        return f"<Subprocess {self._name} ({state})>"
