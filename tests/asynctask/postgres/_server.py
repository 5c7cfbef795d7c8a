"""A private PostgreSQL server for tests that stop or restart it (never the shared one on port 5432).

initdb refuses to run as root, so when the tests run as root the server runs as the ``postgres`` user
(``runuser``), in a directory under /tmp that user can reach (pytest's tmp_path is private to root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["PrivatePostgres", "private_postgres"]

REQUIRE_SERVICES = os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1"


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, on a free loopback port, trust authentication."""

    def __init__(self, bin_dir: Path, data_dir: Path, port: int, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.data_dir = data_dir
        self.port = port
        self._user = user  # run the server as this OS user (when we are root), else as ourselves

    @property
    def dsn(self) -> str:
        """The connection URL of the ``postgres`` database as the ``postgres`` role."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if completed.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stdout}\n"
                f"{completed.stderr}\n{tail}"
            )

    def init(self) -> None:
        """Create the cluster (no fsync during initdb: it is thrown away after the test)."""
        self._run("initdb", "-D", str(self.data_dir / "data"), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        data, log = str(self.data_dir / "data"), str(self.data_dir / "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode="immediate"`` is a crash (no shutdown checkpoint, WAL replay on start)."""
        self._run("pg_ctl", "-D", str(self.data_dir / "data"), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "immediate") -> None:
        """Stop (by default like a crash) and start again on the same port."""
        self.stop(mode)
        self.start()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server, stopped and deleted afterwards; skips (or fails when services are required)
    when the PostgreSQL server binaries are not installed."""
    bin_dir = _binaries()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} and LIFECYCLE_REQUIRE_SERVICES=1 is set", pytrace=False)
        pytest.skip(message)
    user = None
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        account = pwd.getpwnam(user)
        os.chown(directory, account.pw_uid, account.pw_gid)
    server = PrivatePostgres(bin_dir, directory, _free_port(), user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop("immediate")
        except RuntimeError:
            pass  # already stopped (or never started)
        shutil.rmtree(directory, ignore_errors=True)
