"""Shared fixtures: every async test runs on asyncio and trio (anyio_mode = "auto" in pyproject.toml);
server fixtures skip or fail clearly."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

REQUIRE_SERVICES = os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1"
REDIS_URL = os.environ.get("LIFECYCLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("LIFECYCLE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("LIFECYCLE_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once on asyncio and once on trio (modules may override it to asyncio only)."""
    return str(request.param)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the test when the server is unreachable, or fail it when LIFECYCLE_REQUIRE_SERVICES=1."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and LIFECYCLE_REQUIRE_SERVICES=1 is set: start the server", pytrace=False)
    pytest.skip(f"{message}; start it to run this test")


@pytest.fixture
def redis_url() -> str:
    """The shared Redis server's URL (skips or fails when it is down)."""
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def postgres_dsn() -> str:
    """The shared PostgreSQL server's DSN (skips or fails when it is down)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_DSN


@pytest.fixture
def nats_url() -> str:
    """The shared NATS server's URL (skips or fails when it is down); it runs with JetStream."""
    require_service("NATS", "127.0.0.1", 4222)
    return NATS_URL


@pytest.fixture
def unique_name() -> str:
    """A name unique to this test, for Redis key prefixes and PostgreSQL schemas."""
    return f"t_{uuid.uuid4().hex[:12]}"
