"""The engine conformance suite on MemoryBackend (asyncio and trio)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lifecycle.asynctask import Backend, MemoryBackend
from lifecycle.asynctask.testing import EngineConformance


class TestMemoryEngine(EngineConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[], Awaitable[Backend]]:
        backend = MemoryBackend()

        async def open_backend() -> Backend:
            await backend.open()
            return backend

        return open_backend
