"""AsyncTasks runs end to end on RedisBackend: the public engine conformance suite, unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import EngineConformance

pytestmark = pytest.mark.redis


class TestRedisEngine(EngineConformance):
    """The engine's promises over Redis, under a fresh prefix per test."""

    @pytest.fixture
    def backend_factory(
        self, open_redis: Callable[..., Awaitable[RedisBackend]]
    ) -> Callable[[], Awaitable[RedisBackend]]:
        async def factory() -> RedisBackend:
            return await open_redis()

        return factory
