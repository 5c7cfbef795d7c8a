"""Concurrent single enqueues coalesced into shared round trips on a real Redis server."""

from __future__ import annotations

from tests.asynctask.redis.redis_servers import OpenRedis
from tests.asynctask.test_coalesce import check_concurrent_enqueues_on


async def test_concurrent_enqueues_each_get_their_own_outcome(open_redis: OpenRedis) -> None:
    await check_concurrent_enqueues_on(await open_redis())
