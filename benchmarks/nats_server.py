"""A private ``nats-server`` with JetStream for the NATS benchmark scenarios: on a free loopback port, storing
in a temporary directory, with its monitoring port (``/varz`` counts the messages clients send), stopped by
its own process id at the end. The harness deletes every stream between runs, so it only ever runs on a
server it started itself.

Standard library only. JetStream keeps its defaults (file storage, no forced sync), as a NATS user runs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["PrivateNats", "find_nats_server"]

_START_TIMEOUT = 30.0


def find_nats_server(given: str | None = None) -> str:
    """The nats-server binary: ``given``, else ``$LIFECYCLE_BENCH_NATS_SERVER``, else ``nats-server`` on the
    PATH. Raises ``FileNotFoundError`` naming what to install or pass."""
    candidate = given or os.environ.get("LIFECYCLE_BENCH_NATS_SERVER") or "nats-server"
    found = shutil.which(candidate)
    if found is None:
        raise FileNotFoundError(
            f"cannot start a private NATS server for the NATS scenarios: no {candidate!r} executable; "
            "install nats-server, pass --nats-server PATH, or leave the nats_* scenarios out (--scenarios)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateNats:
    """``with PrivateNats(binary) as server: ... server.url ...``: started on entry, stopped on exit."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.monitor_port = 0
        self._directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor(self) -> str:
        """``http://127.0.0.1:<monitoring port>``."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the server and return once JetStream answers; raises ``RuntimeError`` if it does not."""
        self._directory = Path(tempfile.mkdtemp(prefix="lifecycle-bench-nats-"))
        self.port, self.monitor_port = _free_port(), _free_port()
        log = self._directory / "nats.log"
        command = [
            self.binary, "-js", "-sd", str(self._directory / "store"), "-a", "127.0.0.1",
            "-p", str(self.port), "-m", str(self.monitor_port), "-l", str(log),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"the private nats-server did not start:\n{text}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor}/healthz?js-enabled-only=true", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process id, SIGKILL after 10 s) and delete its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> PrivateNats:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
