"""backend_from_url(): every accepted form, its options, and a clear error for everything else."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lifecycle.asynctask import backend_from_url
from lifecycle.asynctask._sqlite import SQLiteBackend


class FakeServerBackend:
    """Stands in for RedisBackend / PostgresBackend to check what backend_from_url passes on."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options


@pytest.fixture
def fake_server_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace lifecycle.asynctask.redis / .postgres with modules holding FakeServerBackend."""
    redis_module = types.ModuleType("lifecycle.asynctask.redis")
    redis_module.RedisBackend = FakeServerBackend  # type: ignore[attr-defined]
    postgres_module = types.ModuleType("lifecycle.asynctask.postgres")
    postgres_module.PostgresBackend = FakeServerBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lifecycle.asynctask.redis", redis_module)
    monkeypatch.setitem(sys.modules, "lifecycle.asynctask.postgres", postgres_module)


def test_memory_url_gives_a_memory_backend() -> None:
    memory = pytest.importorskip("lifecycle.asynctask._memory")
    assert isinstance(backend_from_url("memory://"), memory.MemoryBackend)
    assert backend_from_url("memory://") is not backend_from_url("memory://")  # nothing shared


@pytest.mark.parametrize("url", ["memory://somewhere", "memory:///path", "memory://?x=1"])
def test_memory_url_takes_nothing_else(url: str) -> None:
    with pytest.raises(ValueError, match='takes no host, path or options: use "memory://"'):
        backend_from_url(url)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///tasks.db", "tasks.db"),
        ("sqlite:///var/run/tasks.db", "var/run/tasks.db"),
        ("sqlite:////var/lib/app/tasks.db", "/var/lib/app/tasks.db"),
        ("sqlite:///my%20tasks.db", "my tasks.db"),
        ("SQLITE:///upper.db", "upper.db"),
        ("sqlite://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_urls_follow_the_sqlalchemy_convention(url: str, path: str) -> None:
    backend = backend_from_url(url)
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == path


def test_sqlite_url_options_reach_the_backend() -> None:
    backend = backend_from_url("sqlite:///t.db?poll_interval=0.25&busy_timeout=3&synchronous=full")
    assert isinstance(backend, SQLiteBackend)
    assert backend.poll_interval == 0.25
    assert backend._busy_timeout == 3.0
    assert backend._synchronous == "FULL"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/tasks.db", "a sqlite URL has no host part"),
        ("sqlite:///t.db?timeout=3", r"unknown option 'timeout' .* accepted: poll_interval, busy_timeout"),
        ("sqlite:///t.db?poll_interval=soon", r"option poll_interval='soon' .* is not a number"),
        ("sqlite:///t.db?poll_interval=1&poll_interval=2", "given twice"),
        ("sqlite:///t.db?synchronous=maybe", "synchronous must be one of"),
    ],
)
def test_bad_sqlite_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend_from_url(url)


async def test_a_sqlite_url_opens_a_working_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = backend_from_url("sqlite:///relative.db")
    await backend.open()
    try:
        assert await backend.stats() == {}
    finally:
        await backend.close()
    assert (tmp_path / "relative.db").exists()


@pytest.mark.usefixtures("fake_server_modules")
@pytest.mark.parametrize(
    ("url", "expected_url", "options"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", {}),
        ("redis://127.0.0.1:6379/0?prefix=app", "redis://127.0.0.1:6379/0", {"prefix": "app"}),
        (
            "rediss://user:secret@cache:6380/2?socket_timeout=5&prefix=jobs&ssl_cert_reqs=required",
            "rediss://user:secret@cache:6380/2?socket_timeout=5&ssl_cert_reqs=required",
            {"prefix": "jobs"},
        ),
    ],
)
def test_redis_urls_pass_the_url_on_and_take_out_the_prefix(
    url: str, expected_url: str, options: dict[str, str]
) -> None:
    backend = backend_from_url(url)
    assert isinstance(backend, FakeServerBackend)
    assert (backend.url, backend.options) == (expected_url, options)


@pytest.mark.usefixtures("fake_server_modules")
@pytest.mark.parametrize(
    ("url", "expected_url", "options"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test", {}),
        (
            "postgres://u@db/app?schema=jobs&sslmode=require",
            "postgres://u@db/app?sslmode=require",
            {"schema": "jobs"},
        ),
    ],
)
def test_postgres_urls_pass_the_dsn_on_and_take_out_the_schema(
    url: str, expected_url: str, options: dict[str, str]
) -> None:
    backend = backend_from_url(url)
    assert isinstance(backend, FakeServerBackend)
    assert (backend.url, backend.options) == (expected_url, options)


@pytest.mark.usefixtures("fake_server_modules")
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h?prefix=a&prefix=b", "option 'prefix' is given twice"),
        ("redis://h?prefix=", r"option 'prefix' .* is empty"),
        ("postgresql://h/db?schema=", r"option 'schema' .* is empty"),
    ],
)
def test_bad_server_options_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend_from_url(url)


@pytest.mark.parametrize(
    ("url", "missing", "extra"),
    [("redis://h", "redis", "redis"), ("postgresql://h/db", "psycopg", "postgres")],
)
def test_a_missing_extra_says_what_to_install(
    url: str, missing: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_import(name: str) -> types.ModuleType:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(importlib, "import_module", failing_import)  # what _urls calls
    with pytest.raises(ImportError, match=rf'pip install "anyio-lifecycle\[{extra}\]"'):
        backend_from_url(url)


def test_the_real_redis_module_without_redis_py_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lifecycle.asynctask.redis")
    monkeypatch.delitem(sys.modules, "lifecycle.asynctask.redis")
    for name in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail as if not installed
    importlib.invalidate_caches()
    with pytest.raises(ImportError, match=r'pip install "anyio-lifecycle\[redis\]"'):
        backend_from_url("redis://127.0.0.1:6379/0")


def test_other_import_errors_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_import(name: str) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'something_else'", name="something_else")

    monkeypatch.setattr(importlib, "import_module", failing_import)  # what _urls calls
    with pytest.raises(ModuleNotFoundError, match="something_else"):
        backend_from_url("redis://h")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/tasks", "unsupported task backend URL 'mysql://db/tasks'; use one of: \"memory://\""),
        ("", "unsupported task backend URL ''"),
        ("tasks.db", 'for a SQLite file write "sqlite:///tasks.db"'),
        ("amqp://guest@rabbit//", r"\"redis://\[user:password@\]host:port/db\?prefix=NAME\""),
    ],
)
def test_unsupported_urls_list_the_accepted_forms(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend_from_url(url)


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="takes a URL string, got PosixPath"):
        backend_from_url(Path("tasks.db"))  # type: ignore[arg-type]
