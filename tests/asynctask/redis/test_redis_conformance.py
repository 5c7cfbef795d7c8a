"""RedisBackend passes the public Backend conformance suite unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import Backend
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import BackendConformance
from lifecycle.asynctask.testing.backend._rules_damage import RawValue
from tests.asynctask.corruption import corrupt_redis

pytestmark = pytest.mark.redis


class TestRedisConformance(BackendConformance):
    """Every rule of the Backend protocol, against the shared server, under a fresh prefix per test."""

    @pytest.fixture
    def backend_factory(
        self, open_redis: Callable[..., Awaitable[RedisBackend]]
    ) -> Callable[[], Awaitable[RedisBackend]]:
        async def factory() -> RedisBackend:
            return await open_redis()

        return factory

    @pytest.fixture(autouse=True)
    async def raw_client(self, redis_url: str) -> AsyncIterator[None]:
        """A plain redis-py client for corrupt_field()."""
        self._client = aioredis.Redis.from_url(redis_url)
        yield
        await self._client.aclose()

    async def corrupt_field(self, backend: Backend, task_id: str, field: str, raw_value: RawValue) -> bool:
        assert isinstance(backend, RedisBackend)
        return await corrupt_redis(self._client, backend.key_prefix, task_id, field, raw_value)
