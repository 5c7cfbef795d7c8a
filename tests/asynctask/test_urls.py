"""backend_from_url(): every accepted form, its options, and a clear error for everything else."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lifecycle.asynctask import backend_from_url
from lifecycle.asynctask._backends.sqlite._backend import SQLiteBackend


class FakeServerBackend:
    """Stands in for RedisBackend / PostgresBackend to check what backend_from_url passes on."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options


@pytest.fixture
def fake_server_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace lifecycle.asynctask.redis / .postgres / .nats with modules holding FakeServerBackend."""
    redis_module = types.ModuleType("lifecycle.asynctask.redis")
    redis_module.RedisBackend = FakeServerBackend  # type: ignore[attr-defined]
    postgres_module = types.ModuleType("lifecycle.asynctask.postgres")
    postgres_module.PostgresBackend = FakeServerBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lifecycle.asynctask.redis", redis_module)
    monkeypatch.setitem(sys.modules, "lifecycle.asynctask.postgres", postgres_module)
    nats_module = types.ModuleType("lifecycle.asynctask.nats")
    nats_module.NatsBackend = FakeServerBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lifecycle.asynctask.nats", nats_module)


def test_memory_url_gives_a_memory_backend() -> None:
    memory = pytest.importorskip("lifecycle.asynctask._backends.memory._backend")
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
    ("url", "expected_url", "options"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222", {}),
        ("nats://127.0.0.1:4222?prefix=app", "nats://127.0.0.1:4222", {"prefix": "app"}),
        (
            "nats://u:secret@a:4222, nats://b:4222?replicas=3&prefix=jobs",
            "nats://u:secret@a:4222,nats://b:4222",
            {"prefix": "jobs", "replicas": 3},
        ),
    ],
)
def test_nats_urls_take_out_the_prefix_and_the_replicas(
    url: str, expected_url: str, options: dict[str, object]
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
        ("nats://h?prefix=", r"option 'prefix' .* is empty"),
        ("nats://h?replicas=three", r"option replicas='three' .* is not a whole number"),
        ("nats://h?max_reconnect_attempts=3", r"unknown option 'max_reconnect_attempts' .* accepted: prefix"),
    ],
)
def test_bad_server_options_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend_from_url(url)


@pytest.mark.parametrize(
    ("url", "missing", "extra"),
    [
        ("redis://h", "redis", "redis"),
        ("postgresql://h/db", "psycopg", "postgres"),
        ("nats://h", "nats", "nats"),
    ],
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
    packages = ("redis", "lifecycle.asynctask.redis", "lifecycle.asynctask._backends.redis")
    for name in [name for name in sys.modules if name.startswith(tuple(f"{p}." for p in packages))]:
        monkeypatch.delitem(sys.modules, name)
    for name in [name for name in packages if name in sys.modules]:
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
        ("mysql://db/tasks", "unsupported task backend URL: the scheme 'mysql' of 'mysql://db/tasks' is not"),
        ("", "unsupported task backend URL: '' is not a URL"),
        ("tasks.db", 'is a file name, not a URL: for a SQLite file write "sqlite:///tasks.db"'),
        ("amqp://guest@rabbit//", r"\"redis://\[user:password@\]host:port/db\?prefix=NAME\""),
        ("host=db dbname=app", "looks like a libpq key=value DSN, which backend_from_url does not take"),
    ],
)
def test_unsupported_urls_list_the_accepted_forms(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        backend_from_url(url)
    assert 'use one of: "memory://"' in str(raised.value)
    assert "\n" not in str(raised.value)


# -- item 8 of issue 10: every URL mistake is one clear line naming the part, passwords masked ---------------

SECRET = "Hunter2-url-secret"


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"redis+sentinel://user:{SECRET}@sentinel:26379/0", "the scheme 'redis+sentinel'"),
        (f"mysql://root:{SECRET}@db/tasks", "the scheme 'mysql'"),
        (f"host=db dbname=app password={SECRET}", "key=value DSN"),
        (f"host=db password='{SECRET} with spaces' dbname=app", "key=value DSN"),
    ],
)
def test_an_unsupported_scheme_names_it_and_masks_the_password(url: str, named: str) -> None:
    with pytest.raises(ValueError, match="unsupported task backend URL") as raised:
        backend_from_url(url)
    message = str(raised.value)
    assert named in message
    assert SECRET not in message
    assert "***" in message


@pytest.mark.usefixtures("fake_server_modules")
@pytest.mark.parametrize(
    ("url", "option"),
    [
        (f"redis://:{SECRET}@h/0?prefix=a&prefix=b", "prefix"),
        (f"redis://h/0?password={SECRET}&password=other", "password"),
        ("redis://h/0?db=1&db=2", "db"),
        (f"unix:///run/redis.sock?db=0&db=1&password={SECRET}", "db"),
        (f"postgresql://app:{SECRET}@db/app?sslmode=require&sslmode=disable", "sslmode"),
        (f"postgres://db/app?schema=a&schema=b&password={SECRET}", "schema"),
        (f"sqlite:///t.db?poll_interval=1&poll_interval=2&password={SECRET}", "poll_interval"),
    ],
)
def test_an_option_given_twice_is_named_once_with_the_password_masked(url: str, option: str) -> None:
    with pytest.raises(ValueError, match=f"the option '{option}' is given twice") as raised:
        backend_from_url(url)
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://[bad", f"postgresql://app:{SECRET}@[bad/db", "redis://[::1/0", f"redis://:{SECRET}@h]/0"],
)
def test_an_unbalanced_bracket_names_the_problem_and_the_fix(url: str) -> None:
    with pytest.raises(ValueError, match="cannot parse the URL") as raised:
        backend_from_url(url)
    message = str(raised.value)
    assert "Invalid IPv6 URL" not in message
    assert "an IPv6 host goes in closed brackets" in message
    assert "percent-encoded (%5B, %5D)" in message
    assert SECRET not in message


def test_a_port_that_is_not_a_number_is_named() -> None:
    with pytest.raises(ValueError, match="its port is not a number") as raised:
        backend_from_url(f"postgresql://app:{SECRET}@db:fivefourthreetwo/app")
    assert SECRET not in str(raised.value)


def test_the_postgres_backend_names_an_unparsable_dsn_and_the_fix() -> None:
    postgres = pytest.importorskip("lifecycle.asynctask.postgres")
    with pytest.raises(ValueError, match="cannot parse the connection string") as raised:
        postgres.PostgresBackend("postgresql://[bad")
    assert "percent-encode special characters" in str(raised.value)
    with pytest.raises(ValueError, match=r'invalid URI query parameter: "nosuch"') as raised:
        postgres.PostgresBackend(f"postgresql://app:{SECRET}@db/app?nosuch=1")
    assert SECRET not in str(raised.value)
    with pytest.raises(ValueError, match="put a value with spaces in single quotes") as raised:
        # an unquoted password with a space: libpq reports the word after the space
        postgres.PostgresBackend(f"host=db password=Hunter2 {SECRET} dbname=app")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("redis://127.0.0.1:6379/notadb", "'notadb'"),
        (f"redis://:{SECRET}@127.0.0.1/zero?prefix=app", "'zero'"),
        ("rediss://cache:6380/0/1", "'0/1'"),
        ("redis://h/-1", "'-1'"),
    ],
)
def test_a_redis_database_that_is_not_a_number_is_refused(url: str, database: str) -> None:
    pytest.importorskip("lifecycle.asynctask.redis")
    with pytest.raises(ValueError, match=f"the database in .* must be a number, got {database}") as raised:
        backend_from_url(url)
    assert SECRET not in str(raised.value)


def test_an_unknown_redis_option_is_named_before_anything_connects() -> None:
    redis = pytest.importorskip("lifecycle.asynctask.redis")
    with pytest.raises(ValueError, match="unknown URL option 'sockettimeout'") as raised:
        backend_from_url(f"redis://:{SECRET}@h/0?sockettimeout=5&prefix=app")
    assert "socket_timeout" in str(raised.value)  # the options it does take
    assert SECRET not in str(raised.value)
    # what redis-py takes still passes: TLS files, timeouts, the database as an option
    redis.RedisBackend("rediss://h:6380?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem&db=2&health_check_interval=5")
    redis.RedisBackend("unix:///run/redis.sock?db=0&password=x&client_name=me")
    redis.RedisBackend("redis://h/0?anything=1", cluster=True)  # RedisCluster takes other options


@pytest.mark.usefixtures("fake_server_modules")
def test_socket_urls_keep_their_form_when_the_option_is_taken_out() -> None:
    redis = backend_from_url("unix:///run/redis/redis.sock?db=0&prefix=app")
    assert isinstance(redis, FakeServerBackend)
    assert (redis.url, redis.options) == ("unix:///run/redis/redis.sock?db=0", {"prefix": "app"})
    postgres = backend_from_url("postgresql:///app?host=/run/postgresql&schema=jobs")
    assert isinstance(postgres, FakeServerBackend)
    assert postgres.url == "postgresql:///app?host=%2Frun%2Fpostgresql"
    assert postgres.options == {"schema": "jobs"}


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="takes a URL string, got PosixPath"):
        backend_from_url(Path("tasks.db"))  # type: ignore[arg-type]
