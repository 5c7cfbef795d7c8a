"""Fixtures for the RedisBackend tests: asyncio only, one fresh key prefix per test (deleted afterwards), and
private redis-server processes for tests that restart, kill or reconfigure a server."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import (
    REDIS_CLI,
    REDIS_SERVER,
    LocalCluster,
    OpenRedis,
    RedisServer,
    delete_prefix,
)


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client is asyncio-only, so these tests run on asyncio alone."""
    return "asyncio"


@pytest.fixture
async def open_redis(redis_url: str, unique_name: str) -> AsyncIterator[OpenRedis]:
    """Open RedisBackend objects on the shared server under the test's own prefix (keyword options pass
    through, ``url=`` included); all are closed after the test and every key of the test's prefix, and of
    each prefix given as ``prefix=`` (such as ``f"{unique_name}-plain"``), is deleted from the shared
    server."""
    opened: list[RedisBackend] = []
    prefixes = {unique_name}  # those used on the shared server

    async def factory(**options: Any) -> RedisBackend:
        options.setdefault("prefix", unique_name)
        url = options.pop("url", redis_url)
        backend = RedisBackend(url, **options)
        if url == redis_url:
            prefixes.add(backend.prefix)
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        await backend.close()
    for prefix in sorted(prefixes):
        await delete_prefix(redis_url, prefix)


def _require_binary(path: str) -> None:
    if shutil.which(path) is None:
        message = f"{path} is not installed; install the Redis server package to run this test"
        if os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Make private redis-servers (extra command-line options as arguments); all are killed afterwards.
    Skips when the redis-server binary is missing (fails under LIFECYCLE_REQUIRE_SERVICES=1)."""
    _require_binary(REDIS_SERVER)
    servers: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, *extra)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
async def own_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """One private, running redis-server (AOF with ``appendfsync always``)."""
    return await anyio.to_thread.run_sync(redis_server_factory)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A private three-node Redis Cluster shared by the tests of a module (each uses its own prefix)."""
    _require_binary(REDIS_SERVER)
    _require_binary(REDIS_CLI)
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture
async def open_on_cluster(local_cluster: LocalCluster, unique_name: str) -> AsyncIterator[OpenRedis]:
    """Like ``open_redis``, on the private cluster."""
    opened: list[RedisBackend] = []

    async def factory(**options: Any) -> RedisBackend:
        options.setdefault("prefix", unique_name)
        backend = RedisBackend(local_cluster.url, **options)
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        await backend.close()
    cleaner = RedisBackend(local_cluster.url, prefix=unique_name)
    await cleaner.open()
    try:
        await cleaner.clear()
    finally:
        await cleaner.close()
