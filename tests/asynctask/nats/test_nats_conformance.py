"""NatsBackend passes the public Backend conformance suite unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask import Backend
from lifecycle.asynctask.nats import NatsBackend
from lifecycle.asynctask.testing import BackendConformance
from lifecycle.asynctask.testing.backend._rules_damage import RawValue
from tests.asynctask.corruption import corrupt_nats

pytestmark = pytest.mark.nats


class TestNatsConformance(BackendConformance):
    """Every rule of the Backend protocol, against the shared server, under a fresh prefix per test."""

    @pytest.fixture
    def backend_factory(
        self, open_nats: Callable[..., Awaitable[NatsBackend]], nats_url: str
    ) -> Callable[[], Awaitable[NatsBackend]]:
        self._url = nats_url

        async def factory() -> NatsBackend:
            return await open_nats()

        return factory

    async def corrupt_field(self, backend: Backend, task_id: str, field: str, raw_value: RawValue) -> bool:
        assert isinstance(backend, NatsBackend)
        return await corrupt_nats(self._url, backend.prefix, task_id, field, raw_value)
