"""RedisBackend passes the public Backend conformance suite unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import BackendConformance

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
