"""A server process private to one benchmark run (``redis-server``, ``nats-server``): on free loopback
ports, in a temporary directory, stopped by its own process id at the end. The harness empties such a
server between runs, so it only ever empties a server it started itself.

Standard library only. :mod:`benchmarks.redis_server` and :mod:`benchmarks.nats_server` say how each
server is started and when it is ready.
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
from typing import TypeVar

__all__ = ["PrivateServer", "find_binary", "free_port"]

_START_TIMEOUT = 30.0
_Server = TypeVar("_Server", bound="PrivateServer")


def find_binary(given: str | None, environment: str, default: str, missing: str) -> str:
    """The server binary: ``given``, else ``$environment``, else ``default`` on the PATH. Raises
    ``FileNotFoundError`` with ``missing`` (what to install or pass) after the name looked for."""
    candidate = given or os.environ.get(environment) or default
    found = shutil.which(candidate)
    if found is None:
        raise FileNotFoundError(missing.format(candidate=repr(candidate)))
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateServer:
    """``with Subclass(binary) as server: ...``: started on entry, stopped on exit. A subclass gives
    :meth:`command` and :meth:`ready`."""

    name = "server"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self._directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._process is None else self._process.pid

    def command(self, directory: Path, log: Path) -> list[str]:
        """The command line that starts the server on :attr:`port`, keeping its files in ``directory`` and
        its log in ``log``; ports of its own are chosen here."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the started server answers."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and return once it is :meth:`ready`; raises ``RuntimeError`` if it is not."""
        self._directory = Path(tempfile.mkdtemp(prefix=f"lifecycle-bench-{self.name}-"))
        self.port = free_port()
        log = self._directory / f"{self.name}.log"
        command = self.command(self._directory, log)
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"the private {self.name}-server did not start:\n{text}")
            time.sleep(0.02)

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

    def __enter__(self: _Server) -> _Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
