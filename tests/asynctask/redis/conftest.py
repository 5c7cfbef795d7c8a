"""Fixtures for the RedisBackend tests: asyncio only, one fresh key prefix per test, deleted afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from lifecycle.asynctask.redis import RedisBackend

OpenRedis = Callable[..., Awaitable[RedisBackend]]


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client is asyncio-only, so these tests run on asyncio alone."""
    return "asyncio"


@pytest.fixture
async def open_redis(redis_url: str, unique_name: str) -> AsyncIterator[OpenRedis]:
    """Open RedisBackend objects on the shared server under the test's own prefix (keyword options pass
    through); all are closed after the test and every key of the prefix is deleted."""
    opened: list[RedisBackend] = []

    async def factory(**options: Any) -> RedisBackend:
        options.setdefault("prefix", unique_name)
        backend = RedisBackend(options.pop("url", redis_url), **options)
        await backend.open()
        opened.append(backend)
        return backend

    yield factory
    cleaner = RedisBackend(redis_url, prefix=unique_name)
    await cleaner.open()
    try:
        await cleaner.clear()
    finally:
        await cleaner.close()
        for backend in opened:
            await backend.close()
