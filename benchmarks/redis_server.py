"""A private ``redis-server`` for one benchmark run: on a free loopback port, in a temporary directory,
stopped by its own process id at the end. The harness empties its database between runs, so by default it
empties only a server it started itself, never one that others use.

Standard library only. The server keeps Redis's defaults except persistence (none: ``--save ""``,
``--appendonly no``), so the numbers measure the libraries, not the disk.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PrivateRedis", "find_redis_server"]

_START_TIMEOUT = 30.0


def find_redis_server(given: str | None = None) -> str:
    """The redis-server binary: ``given``, else ``$LIFECYCLE_BENCH_REDIS_SERVER``, else ``redis-server``
    on the PATH. Raises ``FileNotFoundError`` naming what to install or pass."""
    candidate = given or os.environ.get("LIFECYCLE_BENCH_REDIS_SERVER") or "redis-server"
    found = shutil.which(candidate)
    if found is None:
        raise FileNotFoundError(
            f"cannot start a private Redis for the benchmarks: no {candidate!r} executable; install the "
            "Redis server package, pass --redis-server PATH, or give --redis-url an empty database that "
            "nothing else uses"
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateRedis:
    """``with PrivateRedis(binary) as server: ... server.url ...``: started on entry, stopped on exit."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self._directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the server and return once it answers ``PING``; raises ``RuntimeError`` if it does not."""
        self._directory = Path(tempfile.mkdtemp(prefix="lifecycle-bench-redis-"))
        self.port = _free_port()
        log = self._directory / "redis.log"
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(log),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"the private redis-server did not start:\n{text}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
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

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
