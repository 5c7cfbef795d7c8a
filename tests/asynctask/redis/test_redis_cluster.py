"""RedisBackend on a Redis Cluster: both public conformance suites, and every key of a prefix on one node.

The tests share one private three-node cluster (started once per module); each uses its own prefix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import NewTask, Settlement, TaskState, backend_from_url
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0, BackendConformance, EngineConformance
from tests.asynctask.redis.redis_servers import LocalCluster, OpenRedis

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class TestRedisClusterConformance(BackendConformance):
    """Every rule of the Backend protocol on the cluster."""

    @pytest.fixture
    def backend_factory(self, open_on_cluster: OpenRedis) -> Callable[[], Awaitable[RedisBackend]]:
        return open_on_cluster


class TestRedisClusterEngine(EngineConformance):
    """The engine's promises on the cluster."""

    @pytest.fixture
    def backend_factory(self, open_on_cluster: OpenRedis) -> Callable[[], Awaitable[RedisBackend]]:
        return open_on_cluster


async def test_all_keys_of_a_prefix_live_on_one_node(
    local_cluster: LocalCluster, open_on_cluster: OpenRedis, unique_name: str
) -> None:
    backend = await open_on_cluster()
    assert "cluster=True" in repr(backend)
    queues = [f"queue-{n}" for n in range(20)]  # names that would hash all over the cluster untagged
    await backend.enqueue_many([NewTask(f"t{n}", "job", queues[n], b"", 3, None, T0, T0) for n in range(20)])
    claimed = await backend.claim(queues, 20, now=T0, lease_until=T0 + 30)
    assert len(claimed) == 20
    done = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 1) for c in claimed]
    assert await backend.settle(done) == set()
    holders = []
    for server in local_cluster.servers:
        node = aioredis.Redis.from_url(server.url)
        try:
            found = [key async for key in node.scan_iter(match=f"{{{unique_name}}}:*")]
        finally:
            await node.aclose()
        if found:
            holders.append(len(found))
    assert len(holders) == 1, "one prefix, one slot: its keys must all be on a single node"
    assert holders[0] > 20


def test_the_cluster_option_comes_from_the_url_or_the_argument() -> None:
    from_url = backend_from_url("redis://10.0.0.1:7000/0?prefix=app&cluster=yes")
    assert isinstance(from_url, RedisBackend)
    assert repr(from_url) == "RedisBackend('redis://10.0.0.1:7000/0', prefix='app', cluster=True)"
    assert "cluster=True" in repr(RedisBackend("redis://10.0.0.1:7000/0", cluster=True))
    assert "cluster" not in repr(RedisBackend("redis://10.0.0.1:7000/0?cluster=false"))
    with pytest.raises(ValueError, match=r"cluster=true or cluster=false"):
        RedisBackend("redis://10.0.0.1:7000/0?cluster=maybe")
