"""A private ``nats-server`` with JetStream for the NATS benchmark scenarios (see
:mod:`benchmarks.private_server`), with its monitoring port (``/varz`` counts the messages clients send).
The harness deletes every stream between runs, so it only ever runs on a server it started itself.

Standard library only. JetStream keeps its defaults (file storage, no forced sync), as a NATS user runs it.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from benchmarks.private_server import PrivateServer, find_binary, free_port

__all__ = ["PrivateNats", "find_nats_server"]


def find_nats_server(given: str | None = None) -> str:
    """The nats-server binary: ``given``, else ``$LIFECYCLE_BENCH_NATS_SERVER``, else ``nats-server`` on the
    PATH. Raises ``FileNotFoundError`` naming what to install or pass."""
    return find_binary(
        given,
        "LIFECYCLE_BENCH_NATS_SERVER",
        "nats-server",
        "cannot start a private NATS server for the NATS scenarios: no {candidate} executable; install "
        "nats-server, pass --nats-server PATH, or leave the nats_* scenarios out (--scenarios)",
    )


class PrivateNats(PrivateServer):
    """``with PrivateNats(binary) as server: ... server.url ...``: started on entry, stopped on exit."""

    name = "nats"

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.monitor_port = 0

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor(self) -> str:
        """``http://127.0.0.1:<monitoring port>``."""
        return f"http://127.0.0.1:{self.monitor_port}"

    def command(self, directory: Path, log: Path) -> list[str]:
        self.monitor_port = free_port()
        return [
            self.binary, "-js", "-sd", str(directory / "store"), "-a", "127.0.0.1",
            "-p", str(self.port), "-m", str(self.monitor_port), "-l", str(log),
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor}/healthz?js-enabled-only=true", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False
