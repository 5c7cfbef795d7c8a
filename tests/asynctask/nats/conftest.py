"""Fixtures for the NatsBackend tests: asyncio only, one fresh prefix per test (its streams are deleted
afterwards), and private nats-server processes for tests that restart a server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from lifecycle.asynctask.nats import NatsBackend
from tests.asynctask.nats.nats_servers import NatsServer, OpenNats, delete_streams, require_binary


@pytest.fixture
def anyio_backend() -> str:
    """nats-py is asyncio-only, so these tests run on asyncio alone."""
    return "asyncio"


@pytest.fixture
async def open_nats(nats_url: str, unique_name: str) -> AsyncIterator[OpenNats]:
    """Open NatsBackend objects on the shared server under the test's own prefix (keyword options pass
    through, ``url=`` included); all are closed after the test and the prefix's streams are deleted."""
    opened: list[NatsBackend] = []
    urls = {nats_url}

    async def factory(**options: Any) -> NatsBackend:
        options.setdefault("prefix", unique_name)
        url = options.pop("url", nats_url)
        urls.add(url)
        backend = NatsBackend(url, **options)
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        await backend.close()
    for url in urls:
        await delete_streams(url, unique_name)


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[[], NatsServer]]:
    """Make private nats-servers with JetStream (file storage in the test's directory); all are stopped
    afterwards. Skips when the binary is missing (fails under LIFECYCLE_REQUIRE_SERVICES=1)."""
    require_binary()
    servers: list[NatsServer] = []

    def make() -> NatsServer:
        directory = tmp_path / f"nats-{len(servers)}"
        directory.mkdir()
        server = NatsServer(directory)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
async def own_nats(nats_server_factory: Callable[[], NatsServer]) -> NatsServer:
    """One private, running nats-server with JetStream on file storage."""
    return await anyio.to_thread.run_sync(nats_server_factory)


@pytest.fixture
def nats_server_without_jetstream(tmp_path: Path) -> Iterator[str]:
    """The URL of a private nats-server started without JetStream (stopped afterwards)."""
    require_binary()
    server = NatsServer(tmp_path, jetstream=False)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()
