"""AsyncTasks runs end to end on NatsBackend: the public engine conformance suite, unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask.nats import NatsBackend
from lifecycle.asynctask.testing import EngineConformance

pytestmark = pytest.mark.nats


class TestNatsEngine(EngineConformance):
    """The engine's promises over NATS JetStream, under a fresh prefix per test."""

    @pytest.fixture
    def backend_factory(
        self, open_nats: Callable[..., Awaitable[NatsBackend]]
    ) -> Callable[[], Awaitable[NatsBackend]]:
        async def factory() -> NatsBackend:
            return await open_nats()

        return factory
