"""Concurrent single enqueues coalesced into shared round trips on a real PostgreSQL server."""

from __future__ import annotations

from tests.asynctask.postgres._support import OpenPostgres
from tests.asynctask.test_coalesce import check_concurrent_enqueues_on


async def test_concurrent_enqueues_each_get_their_own_outcome(open_pg: OpenPostgres) -> None:
    await check_concurrent_enqueues_on(await open_pg())
