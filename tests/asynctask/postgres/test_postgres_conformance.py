"""PostgresBackend passes the public conformance suites unchanged: the Backend protocol, and the AsyncTasks
engine end to end."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask import Backend
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.asynctask.testing import BackendConformance, EngineConformance
from lifecycle.asynctask.testing.backend._rules_damage import RawValue
from tests.asynctask.corruption import corrupt_postgres

from ._support import OpenPostgres

# Marked at collection time (the root conftest marks anyio tests only after collection, too late for the
# anyio_backend override in conftest.py to take effect).
pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


class TestPostgresConformance(BackendConformance):
    """Every rule of the Backend protocol, against the shared server, in a fresh schema per test."""

    @pytest.fixture
    def backend_factory(self, open_pg: OpenPostgres) -> Callable[[], Awaitable[PostgresBackend]]:
        async def factory() -> PostgresBackend:
            return await open_pg()

        return factory

    @pytest.fixture(autouse=True)
    def raw_dsn(self, postgres_dsn: str) -> None:
        self._dsn = postgres_dsn

    async def corrupt_field(self, backend: Backend, task_id: str, field: str, raw_value: RawValue) -> bool:
        assert isinstance(backend, PostgresBackend)
        return await corrupt_postgres(self._dsn, backend.schema, task_id, field, raw_value)


class TestPostgresEngine(EngineConformance):
    """AsyncTasks end to end on PostgresBackend, in a fresh schema per test."""

    @pytest.fixture
    def backend_factory(self, open_pg: OpenPostgres) -> Callable[[], Awaitable[PostgresBackend]]:
        async def factory() -> PostgresBackend:
            return await open_pg()

        return factory
