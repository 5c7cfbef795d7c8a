"""Helpers for the NatsBackend tests: private nats-server processes, and deleting a prefix's streams.

(A module of its own, not conftest.py, so that test modules can import it by a name no other test directory
uses.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import nats.js.errors
import pytest

from lifecycle.asynctask.nats import NatsBackend

__all__ = ["NATS_SERVER", "NatsServer", "OpenNats", "delete_streams", "require_binary", "streams_of"]

OpenNats = Callable[..., Awaitable[NatsBackend]]
"""The ``open_nats`` fixture: opens a NatsBackend under the test's prefix (keyword options pass through)."""

NATS_SERVER = os.environ.get("LIFECYCLE_TEST_NATS_SERVER", shutil.which("nats-server") or "nats-server")
"""The nats-server binary private servers run."""


def require_binary() -> None:
    """Skip the test when nats-server is missing (fail under LIFECYCLE_REQUIRE_SERVICES=1)."""
    if shutil.which(NATS_SERVER) is None:
        message = f"{NATS_SERVER} is not installed; install the NATS server to run this test"
        if os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


async def delete_streams(url: str, prefix: str) -> None:
    """Delete the streams of ``prefix`` (only those: other tests' prefixes share the server)."""
    try:
        client = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:  # the server is gone (a private one, already stopped)
        return
    try:
        js = client.jetstream()
        for name in (f"{prefix}_tasks_log", f"{prefix}_tasks_snap"):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await client.close()


async def streams_of(url: str, prefix: str) -> set[str]:
    """The streams of ``prefix`` that exist on the server."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        found: set[str] = set()
        for name in (f"{prefix}_tasks_log", f"{prefix}_tasks_snap"):
            try:
                await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                continue
            found.add(name)
        return found
    finally:
        await client.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    """A private ``nats-server -js`` on a free loopback port, storing in a directory of its own, which a test
    may stop and start again. Readiness is read from the server's log, never guessed with sleeps."""

    def __init__(self, directory: Path, *, jetstream: bool = True) -> None:
        self.directory = directory
        self.jetstream = jetstream
        self.port = _free_port()
        self.log: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it accepts clients (with JetStream ready, unless left out)."""
        ready = threading.Event()
        storage = ["-js", "-sd", str(self.directory / "store")] if self.jetstream else []
        process = subprocess.Popen(
            [NATS_SERVER, *storage, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._process = process

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.log.append(line)
                if "Server is ready" in line:
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("nats-server did not start:\n" + "".join(self.log[-20:]))

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM to its PID) and wait for it to exit."""
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._finish()

    def kill(self) -> None:
        """Kill the server (SIGKILL to its PID), as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._finish()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None
        self._reader = None
