"""Helpers for the RedisBackend tests: private redis-server processes, and shared type names.

(A module of its own, not conftest.py, so that test modules can import it by a name no other test directory
uses.)
"""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from lifecycle.asynctask._backends.redis._conn import SCRIPTS
from lifecycle.asynctask.redis import RedisBackend

__all__ = [
    "REDIS_CLI",
    "REDIS_SERVER",
    "LocalCluster",
    "OpenRedis",
    "RedisServer",
    "delete_prefix",
    "keys_of",
    "until_blocked",
]

OpenRedis = Callable[..., Awaitable[RedisBackend]]
"""The ``open_redis`` fixture: opens a RedisBackend under the test's prefix (keyword options pass through)."""

REDIS_SERVER = os.environ.get("LIFECYCLE_TEST_REDIS_SERVER", "/usr/bin/redis-server")
"""The redis-server binary private servers run."""

REDIS_CLI = os.environ.get("LIFECYCLE_TEST_REDIS_CLI", "/usr/bin/redis-cli")
"""The redis-cli binary that joins a private cluster."""


def _free_port(*, cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one at most 55535 whose bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])
    generator = random.Random()
    for _ in range(1000):
        port = generator.randrange(20000, 45000)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


class RedisServer:
    """A private ``redis-server`` on a free loopback port, with its data (AOF, ``appendfsync always``) in a
    directory of its own, which a test may kill and start again. Readiness is read from the server's log,
    never guessed with sleeps. ``{port}`` in an extra option is replaced by the server's port."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.port = _free_port(cluster="--cluster-enabled" in extra)
        self.extra = tuple(option.replace("{port}", str(self.port)) for option in extra)
        self.log: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it accepts connections (after loading its AOF)."""
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            *self.extra,
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._process = process
        assert process.stdout is not None
        for line in process.stdout:
            self.log.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            process.wait()
            raise RuntimeError(f"redis-server did not start:\n{''.join(self.log)}")
        # Keep reading, so the server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, args=(process,), daemon=True)
        self._reader.start()

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.log.append(line)

    def kill(self) -> None:
        """``kill -9`` the server and reap it."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=30)
            if self._reader is not None:
                self._reader.join(timeout=30)
            assert process.stdout is not None
            process.stdout.close()


async def keys_of(url: str, prefix: str) -> set[bytes]:
    """Every key on the server at ``url`` that belongs to ``prefix`` (named ``{prefix}:...``)."""
    client = aioredis.Redis.from_url(url)
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"{{{prefix}}}:") + "*"
    try:
        return {key async for key in client.scan_iter(match=pattern, count=1000)}
    finally:
        await client.aclose()


def counted_call_ids(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call ids ``x.1``, ``x.2``, ... on ``backend``, so two backends that make the same calls write the same
    tokens, call logs and markers (for comparing two stores key by key, see :func:`stored_keys`)."""
    numbers = itertools.count(1)
    monkeypatch.setattr(backend, "_call_id", lambda: f"x.{next(numbers)}")


def settle_replies_lost(monkeypatch: pytest.MonkeyPatch, backend: RedisBackend) -> list[int]:
    """Make every settle call of ``backend`` run on the server and then fail on the client, as if each reply
    were lost (``monkeypatch.undo()``, or the test's end, ends it). Returns a list counting those calls."""
    runner = backend._run()
    real = runner.evalsha
    sha = SCRIPTS["settle"].sha
    ran: list[int] = []

    async def no_reply(called: str, *args: Any) -> Any:
        reply = await real(called, *args)
        if called == sha:
            ran.append(1)
            raise redis.exceptions.ConnectionError("Connection closed by server. (simulated)")
        return reply

    monkeypatch.setattr(runner, "evalsha", no_reply)
    return ran


async def stored_keys(client: aioredis.Redis, prefix: str) -> dict[str, tuple[str, Any, bool]]:
    """Every key of ``prefix`` (named without it) as ``(type, contents, has a TTL)``; a hash's ``c`` field
    (the id of the call that stored a record, which differs between two backends) left out."""
    found: dict[str, tuple[str, Any, bool]] = {}
    async for raw in client.scan_iter(match=f"{prefix}*", count=1000):
        name = bytes(raw).decode().removeprefix(prefix)
        kind: Any = await client.type(raw)
        kind = kind.decode()
        value: Any
        if kind == "hash":
            value = {k: v for k, v in (await client.hgetall(raw)).items() if k != b"c"}
        elif kind == "zset":
            value = await client.zrange(raw, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(await client.smembers(raw))
        elif kind == "list":
            value = await client.lrange(raw, 0, -1)
        else:
            value = await client.get(raw)
        found[name] = (kind, value, await client.ttl(raw) > 0)
    return found


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key of ``prefix`` with a plain client (works whatever state the keys are in)."""
    keys = await keys_of(url, prefix)
    if keys:
        client = aioredis.Redis.from_url(url)
        try:
            await client.unlink(*keys)
        finally:
            await client.aclose()


async def until_blocked(admin: aioredis.Redis, count: int) -> None:
    """Return once the server reports ``count`` clients blocked in a command such as BLPOP.

    The server's state has no event to wait on, so this asks it (bounded by the caller's ``fail_after``)."""
    while (await admin.info("clients"))["blocked_clients"] < count:
        await anyio.sleep(0.005)


class LocalCluster:
    """A private three-node Redis Cluster (no replicas, no persistence) on free loopback ports."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.servers = []
        for number in range(nodes):
            node_dir = directory / f"node-{number}"
            node_dir.mkdir()
            options = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--appendonly",
                "no",
            )
            self.servers.append(RedisServer(node_dir, *options))

    @property
    def url(self) -> str:
        """A URL of one node, with the backend's cluster option."""
        return f"{self.servers[0].url}?cluster=true"

    def start(self) -> None:
        """Start the nodes, join them into a cluster and return once every node reports it healthy."""
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for server in self.servers:
            # The nodes agree on the slots by gossip: ask each until it reports the cluster healthy (there
            # is no event to wait on). Bounded by the loop, and normally done within a second.
            for _ in range(400):
                info = subprocess.run(
                    [REDIS_CLI, "-p", str(server.port), "cluster", "info"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                if "cluster_state:ok" in info:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"the test cluster did not become healthy: {info}")

    def kill(self) -> None:
        """Kill every node."""
        for server in self.servers:
            server.kill()
