"""sd_notify for ``Type=notify`` systemd services, with the standard library only.

When ``NOTIFY_SOCKET`` is set (systemd sets it for ``Type=notify`` units), ``TaskManager.run()`` sends:

- ``READY=1`` once the manager is ready (every task initialized and executing);
- ``STATUS=...`` when its state or readiness changes, a task restarts or fails;
- ``STOPPING=1`` when shutdown begins;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while every task is live (``WatchdogSec=`` in the unit; ignored
  when ``WATCHDOG_PID`` names another process). A blocked event loop or a task that failed for good stops the
  pings, and systemd restarts the service.

Socket addresses: a path (``/run/systemd/notify``) or an abstract socket (``@name``). Sending never blocks
and never raises: a datagram that cannot be sent is logged once as a warning.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Mapping

from .._redact import library_logger
from ._events import EventKind, LifecycleEvent
from ._readiness import Health
from ._task import ManagerState

__all__ = ["SystemdNotifier"]

logger = library_logger("lifecycle.systemd")


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None


class SystemdNotifier:
    """Sends sd_notify datagrams to one socket. Built from the environment by :meth:`from_environment`."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        self.address = address
        #: Seconds between two ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or ``None`` without a watchdog.
        self.watchdog_interval = watchdog_interval
        self._socket: socket.socket | None = None
        self._warned = False
        self._ready_sent = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or ``None`` when it is unset or not a supported address."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        if not raw:
            return None
        address = _address(raw)
        if address is None:
            logger.warning(
                "NOTIFY_SOCKET=%r is not a socket path or an abstract '@name' socket: systemd notifications "
                "are disabled",
                raw,
            )
            return None
        return cls(address, _watchdog_interval(env))

    def send(self, message: str) -> bool:
        """Send one datagram (``KEY=value`` lines); ``False`` when it could not be sent (logged once)."""
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "could not send a systemd notification to NOTIFY_SOCKET=%r (%s); the service goes on, "
                    "later failures are not logged",
                    self.address.replace("\0", "@"),
                    exc,
                )
            return False
        return True

    def on_event(self, event: LifecycleEvent) -> None:
        """Translate a manager event into notifications (an event listener of the manager)."""
        message = _message(event)
        if message is None:
            return
        if event.kind is EventKind.READY and not self._ready_sent:
            self._ready_sent = True
            message = "READY=1\n" + message
        self.send(message)

    async def watchdog(self, health: Callable[[], Health], sleep: Callable[[float], Awaitable[None]]) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval` while ``health().live``, until cancelled."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if health().live:
                self.send("WATCHDOG=1")
            await sleep(interval)

    def close(self) -> None:
        """Close the socket (a later :meth:`send` opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process (a parent that started us)
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        logger.warning("WATCHDOG_USEC=%r is not a positive integer: the systemd watchdog is not served", raw)
        return None
    return usec / 2 / 1_000_000


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: STATUS ends at the newline


def _message(event: LifecycleEvent) -> str | None:
    kind = event.kind
    if kind is EventKind.STATE_CHANGED and event.state is not None:
        if event.state is ManagerState.STOPPING:
            return None  # SHUTDOWN_REQUESTED says why, with STOPPING=1
        return _status(f"{event.manager}: {event.state.value}")
    if kind is EventKind.READY:
        return _status(f"{event.manager}: ready")
    if kind is EventKind.SHUTDOWN_REQUESTED:
        return "STOPPING=1\n" + _status(f"{event.manager}: {event.detail or 'shutting down'}")
    if kind in (EventKind.NOT_READY, EventKind.DRAINING, EventKind.DRAINED):
        return _status(f"{event.manager}: {event.detail or kind.value}")
    if kind is EventKind.SHUTDOWN_STUCK:
        return _status(f"{event.manager}: shutdown stuck past shutdown_timeout")
    if kind is EventKind.TASK_RESTARTING:
        return _status(f"{event.manager}: task {event.task_name!r} {event.detail}")
    if kind is EventKind.TASK_FAILED and event.stage is not None:
        return _status(f"{event.manager}: task {event.task_name!r} failed in {event.stage.value}")
    return None
