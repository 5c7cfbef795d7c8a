"""A private ``redis-server`` for one benchmark run (see :mod:`benchmarks.private_server`). The harness
empties its database between runs, so by default it empties only a server it started itself, never one
that others use.

Standard library only. The server keeps Redis's defaults except persistence (none: ``--save ""``,
``--appendonly no``), so the numbers measure the libraries, not the disk.
"""

from __future__ import annotations

import socket
from pathlib import Path

from benchmarks.private_server import PrivateServer, find_binary

__all__ = ["PrivateRedis", "find_redis_server"]


def find_redis_server(given: str | None = None) -> str:
    """The redis-server binary: ``given``, else ``$LIFECYCLE_BENCH_REDIS_SERVER``, else ``redis-server``
    on the PATH. Raises ``FileNotFoundError`` naming what to install or pass."""
    return find_binary(
        given,
        "LIFECYCLE_BENCH_REDIS_SERVER",
        "redis-server",
        "cannot start a private Redis for the benchmarks: no {candidate} executable; install the Redis "
        "server package, pass --redis-server PATH, or give --redis-url an empty database that nothing "
        "else uses",
    )


class PrivateRedis(PrivateServer):
    """``with PrivateRedis(binary) as server: ... server.url ...``: started on entry, stopped on exit."""

    name = "redis"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, directory: Path, log: Path) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(log),
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False
