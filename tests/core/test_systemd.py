"""sd_notify: the datagrams TaskManager.run() sends to NOTIFY_SOCKET, read from a socket the test binds."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator

import anyio
import pytest

from lifecycle import EventKind, Restart, TaskManagerError
from lifecycle._core._systemd import SystemdNotifier
from tests.core.fake_timing import FakeTiming
from tests.core.lifecycle_testkit import FakeTask, Outcome, manager, raises, run_capturing


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.sock.setblocking(False)
        self.received: list[str] = []

    async def receive(self) -> str:
        """The next datagram (waits for it, at most 10 s)."""
        with anyio.fail_after(10):
            while True:
                try:
                    message = self.sock.recv(4096).decode()
                except BlockingIOError:
                    await anyio.wait_readable(self.sock)
                    continue
                self.received.append(message)
                return message

    async def receive_until(self, text: str) -> list[str]:
        """Every datagram up to and including the first one containing ``text``."""
        messages = []
        while True:
            message = await self.receive()
            messages.append(message)
            if text in message:
                return messages

    def pending(self) -> list[str]:
        """Datagrams already delivered and not received yet (never waits)."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    directory = tempfile.mkdtemp(prefix="lc-", dir="/tmp")  # short: AF_UNIX paths are limited to 107 bytes
    listener = NotifySocket(os.path.join(directory, "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()
    shutil.rmtree(directory)


async def test_ready_status_and_stopping_are_sent_in_order(notify_socket: NotifySocket) -> None:
    m, _ = manager(name="svc")
    m.add_task("db", FakeTask("db", []))
    m.add_execute_task("worker", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        before_ready = await notify_socket.receive_until("READY=1")
        assert m.health().ready  # READY=1 is sent once every task executes
        assert before_ready[0] == "STATUS=svc: initializing"
        assert before_ready[-1] == "READY=1\nSTATUS=svc: ready"
        m.shutdown()
        stopping = await notify_socket.receive_until("STOPPING=1")
    assert await outcome.finished() is None
    assert stopping[-1] == "STOPPING=1\nSTATUS=svc: shutting down: shutdown() was called"
    assert notify_socket.pending() == ["STATUS=svc: stopped"]
    assert not any("WATCHDOG" in m for m in notify_socket.received)  # no WATCHDOG_USEC: no watchdog


async def test_restarts_and_failures_update_the_status_line(notify_socket: NotifySocket) -> None:
    m, _ = manager(name="svc", **FakeTiming().seams())
    m.add_execute_task("flaky", raises("down"), restart=Restart(max_restarts=1))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        messages = await notify_socket.receive_until("STOPPING=1")
    assert isinstance(await outcome.finished(), TaskManagerError)
    [restarting] = [m for m in messages if "task 'flaky' restarting" in m]
    assert restarting.startswith("STATUS=svc: task 'flaky' restarting in ")
    assert restarting.endswith(" s (restart 1 of 1 within 60 s, 1 in total)")
    assert "STATUS=svc: task 'flaky' failed in execute" in messages
    assert all("\n" not in line.split("STATUS=", 1)[-1] for line in messages)


async def test_an_abstract_socket_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NotifySocket(f"@lifecycle-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    try:
        m, _ = manager()
        outcome = Outcome()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_capturing, m, outcome)
            await listener.receive_until("READY=1")
            m.shutdown()
            await listener.receive_until("STOPPING=1")
        assert await outcome.finished() is None
    finally:
        listener.close()


async def test_watchdog_pings_at_half_the_interval_while_live_and_stops_when_not(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    release = anyio.Event()
    cleaning = anyio.Event()

    async def slow_cleanup() -> None:
        cleaning.set()
        await release.wait()

    timing = FakeTiming(gated=True)
    m, events = manager(name="svc", **timing.seams())
    m.add_task("db", FakeTask("db", [], cleanup=slow_cleanup))
    broken = anyio.Event()

    async def breaks_on_demand() -> None:
        await broken.wait()
        raise RuntimeError("gave up")

    m.add_execute_task("worker", breaks_on_demand)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        assert await timing.sleeping() == 1.5  # half of WATCHDOG_USEC
        assert await notify_socket.receive_until("WATCHDOG=1")
        await events.wait(EventKind.READY)
        timing.release()
        assert await timing.sleeping() == 1.5
        assert "WATCHDOG=1" in notify_socket.pending()  # live: pinged again
        broken.set()
        with anyio.fail_after(10):
            await cleaning.wait()
        assert not m.health().live
        notify_socket.pending()
        timing.release()
        await timing.sleeping()  # one more watchdog round has run
        assert "WATCHDOG=1" not in notify_socket.pending()  # not live: no ping, systemd will restart us
        release.set()
    assert isinstance(await outcome.finished(), TaskManagerError)


def test_environment_parsing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert SystemdNotifier.from_environment({}) is None
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@abc", "WATCHDOG_USEC": "1000000"})
    assert notifier is not None
    assert (notifier.address, notifier.watchdog_interval) == ("\0abc", 0.5)
    other = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other is not None
    assert other.watchdog_interval is None  # the watchdog is another process's
    with caplog.at_level(logging.WARNING, logger="lifecycle.systemd"):
        assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
        bad = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"})
    assert bad is not None
    assert bad.watchdog_interval is None
    assert "not a socket path or an abstract '@name' socket" in caplog.text
    assert "WATCHDOG_USEC='soon' is not a positive integer" in caplog.text


async def test_an_unreachable_socket_is_logged_once_and_the_service_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"/tmp/lifecycle-missing-{uuid.uuid4().hex}")
    m, events = manager()
    outcome = Outcome()
    with caplog.at_level(logging.WARNING, logger="lifecycle.systemd"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_capturing, m, outcome)
            await events.wait(EventKind.READY)
            m.shutdown()
    assert await outcome.finished() is None
    warnings = [r for r in caplog.records if r.name == "lifecycle.systemd"]
    assert len(warnings) == 1
    assert "could not send a systemd notification" in warnings[0].getMessage()
