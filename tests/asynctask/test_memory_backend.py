"""MemoryBackend against the public Backend conformance suite (asyncio and trio)."""

from __future__ import annotations

import pytest

from lifecycle.asynctask import Backend, MemoryBackend
from lifecycle.asynctask.testing import BackendConformance, BackendFactory


class TestMemoryBackend(BackendConformance):
    """One MemoryBackend per test; every "new object over the same storage" is that same object, which is
    what the suite allows for an in-process backend."""

    @pytest.fixture
    def backend_factory(self) -> BackendFactory:
        backend = MemoryBackend()

        async def open_backend() -> Backend:
            await backend.open()
            return backend

        return open_backend
