"""``lifecycle.run``: run a TaskManager as a process's main, with one signal policy on asyncio and trio.

Signals (SIGINT / SIGTERM, received through ``anyio.open_signal_receiver`` for the whole run, shutdown
included, so trio cannot swallow the second Ctrl-C during a shielded cleanup):

1. first: graceful shutdown (``manager.shutdown()``);
2. second: cancel the cleanups running now, or cut a ``drain_delay`` short (``manager.cancel_cleanups()``);
3. third: print the stuck-shutdown report and exit at once with status 128 + the signal number.

When ``shutdown_timeout`` passes with tasks stuck, the report is printed and the process exits with 1.

Opt-in, ``dump_stacks_on="SIGUSR1"``: that signal logs :meth:`TaskManager.stack_report` (every task and where
it waits) at WARNING, and the service goes on.

What humans read (the logging set-up, the failure report, the stuck report) is written by ``_console.py``,
imported when :func:`run` is called, so ``import lifecycle`` does not import rich.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import anyio

from ._core._errors import TaskManagerError
from ._core._events import EventKind, LifecycleEvent
from ._core._manager import TaskManager
from ._redact import library_logger

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["run"]

logger = library_logger("lifecycle")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BACKENDS = ("asyncio", "trio")


def run(
    manager: TaskManager, *, backend: str = "asyncio", dump_stacks_on: str | signal.Signals | None = None
) -> int:
    """Run ``manager`` to completion under ``anyio.run`` and return the process exit status.

    Returns 0 when the manager stopped cleanly, 1 when it raised :class:`~lifecycle.TaskManagerError` (after
    printing a readable report of each failed task: stage, exception, traceback). Exits the process at once
    (``os._exit``) with 128 + signal number on the third SIGINT/SIGTERM, or with 1 when ``shutdown_timeout``
    passed with tasks stuck, after printing where each stuck task waits. A task's ``KeyboardInterrupt`` or
    ``SystemExit`` propagates after the cleanup.

    When the root logger has no handler, logging at INFO to stderr is configured so the service's start and
    stop are visible: rich on a terminal, one plain line per event anywhere else (a container's log). Each
    failure is logged with its traceback when it happens; at the end a terminal gets a rich panel per failed
    task (without the traceback shown above), anything else one more log line. When the application
    configured logging itself, its handlers get every line and no panel is printed.

    ``dump_stacks_on``: a signal (``"SIGUSR1"`` or ``signal.SIGUSR1``; off by default) on which the running
    service logs :meth:`TaskManager.stack_report` at WARNING on the ``lifecycle`` logger: each task stage and
    every task of the event loop, with where it waits. The service goes on; send it as often as needed
    (``kill -USR1 <pid>``, ``docker kill --signal=USR1``).

    Raises ``ValueError`` for an unknown backend, or a ``dump_stacks_on`` that is not a signal of this
    platform or is SIGINT / SIGTERM (the shutdown's), SIGKILL or SIGSTOP; ``RuntimeError`` when trio is asked
    for but not installed.

    Example::

        if __name__ == "__main__":
            raise SystemExit(lifecycle.run(manager))
    """
    if not isinstance(manager, TaskManager):
        raise TypeError(f"lifecycle.run() needs a lifecycle.TaskManager, got {type(manager).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use 'asyncio' or 'trio'")
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        raise RuntimeError("backend 'trio' needs the trio package: pip install trio")
    dump_signal = _dump_signal(dump_stacks_on)
    from ._console import configure_logging, stderr_console

    console = stderr_console()
    configured = configure_logging(console)
    policy = _SignalPolicy(manager, console, dump_signal)
    manager.add_listener(policy.on_event)
    error: TaskManagerError | None = anyio.run(_main, manager, policy, backend=backend)
    if error is None:
        return 0
    _report_failure(console, error, panels=configured and console.is_terminal)
    return 1


def _dump_signal(value: str | signal.Signals | None) -> signal.Signals | None:
    if value is None:
        return None
    if isinstance(value, signal.Signals):
        signum = value
    elif isinstance(value, str) and isinstance(getattr(signal, value.upper(), None), signal.Signals):
        signum = getattr(signal, value.upper())
    else:
        raise ValueError(
            f"run(dump_stacks_on={value!r}): not a signal of this platform; use a name such as 'SIGUSR1' or "
            "a signal.Signals member, or None"
        )
    if signum in (*_SIGNALS, getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
        raise ValueError(
            f"run(dump_stacks_on={value!r}): {signum.name} cannot dump stacks (SIGINT and SIGTERM stop the "
            "service, SIGKILL and SIGSTOP cannot be caught); use SIGUSR1 or SIGUSR2"
        )
    return signum


def _report_failure(console: Console, error: TaskManagerError, *, panels: bool) -> None:
    """Say why the run failed, showing each traceback once: the log showed it when the task failed."""
    logged = logger.isEnabledFor(logging.ERROR) and logger.hasHandlers()
    if logged and not panels:
        # The application's own logging, or a log read by a machine: one more log line, not a rich panel.
        logger.error("%s", error.message)
        return
    from ._console import print_failure_report

    print_failure_report(console, error, tracebacks=not logged)


async def _main(manager: TaskManager, policy: _SignalPolicy) -> TaskManagerError | None:
    outcome: TaskManagerError | None = None
    fatal: BaseException | None = None
    extra = () if policy.dump_signal is None else (policy.dump_signal,)
    with anyio.open_signal_receiver(*_SIGNALS, *extra) as signals:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(policy.receive, signals)
            try:
                await manager.run()
            except TaskManagerError as exc:
                outcome = exc
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                fatal = exc  # re-raised outside the task group so it is not wrapped in a group
            finally:
                task_group.cancel_scope.cancel()
    if fatal is not None:
        raise fatal
    return outcome


class _SignalPolicy:
    """Counts SIGINT/SIGTERM and applies the three-step policy; exits on a stuck shutdown; logs the stack
    report on ``dump_signal``."""

    def __init__(
        self, manager: TaskManager, console: Console, dump_signal: signal.Signals | None = None
    ) -> None:
        self._manager = manager
        self._console = console
        self._count = 0
        self.dump_signal = dump_signal

    async def receive(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            self.handle(signal.Signals(signum))

    def handle(self, signum: signal.Signals) -> None:
        name = signum.name
        if signum == self.dump_signal:
            logger.warning(
                "%s", self._manager.stack_report(f"received {name}: stack report (the service goes on)")
            )
            return
        self._count += 1
        if self._count == 1:
            logger.warning(
                "%s: received %s: shutting down gracefully (send it again to cancel the running cleanup, "
                "a third time to exit at once)",
                self._manager.name,
                name,
            )
            self._manager.shutdown()
        elif self._count == 2:
            cancelled = self._manager.cancel_cleanups()
            if cancelled:
                logger.warning(
                    "%s: received %s again: cancelled %d running cleanup(s); a third time exits at once",
                    self._manager.name,
                    name,
                    cancelled,
                )
            else:
                logger.warning(
                    "%s: received %s again: no cleanup is running yet (execute tasks are still stopping; a "
                    "drain delay, if any, is cut short); a third time exits at once",
                    self._manager.name,
                    name,
                )
        else:
            report = self._manager.stuck_report(f"received {name} a third time: exiting at once")
            self._exit(report, 128 + int(signum), already_logged=False)

    def on_event(self, event: LifecycleEvent) -> None:
        if event.kind is EventKind.SHUTDOWN_STUCK:
            logged = logger.isEnabledFor(logging.ERROR) and logger.hasHandlers()
            self._exit(event.detail or "shutdown stuck", 1, already_logged=logged)

    def _exit(self, report: str, status: int, *, already_logged: bool) -> NoReturn:
        if not already_logged:
            from ._console import print_plain

            print_plain(self._console, report)
        _flush_everything()
        os._exit(status)


def _flush_everything() -> None:
    for handler in logging.getLogger().handlers + logger.handlers:
        try:
            handler.flush()
        except Exception:  # pragma: no cover - a broken handler must not prevent the exit
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover
            pass
