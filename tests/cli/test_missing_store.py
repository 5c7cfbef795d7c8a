"""``lifecycle tasks`` never creates storage: a URL naming no store (a typo in the schema, prefix or path) is
one line on stderr with status 2, for every read and write command, on every backend, with ``--backend`` and
with ``--app``; afterwards no file, key or schema exists. Passwords in the URL are never shown."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from tests.cli.cli_support import Result, lifecycle

COMMANDS = (
    ("stats",),
    ("list",),
    ("show", "some-id"),
    ("watch", "--interval", "0.1"),
    ("cancel", "some-id"),
    ("requeue", "--dead"),
    ("purge", "--state", "dead"),
)
SECRET = "pw-never-shown"


def _redis_keys(url: str, prefix: str) -> set[bytes]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return set(client.scan_iter(match=f"{{{prefix}}}:*", count=1000))
    finally:
        client.close()


def _nats_streams(url: str, prefix: str) -> set[str]:
    from tests.asynctask.nats.nats_servers import streams_of

    return anyio.run(streams_of, url, prefix, backend="asyncio")


def _schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None


@pytest.fixture(params=["sqlite", "redis", "postgres", "nats"])
def missing(request: pytest.FixtureRequest, tmp_path: Path, unique_name: str) -> Iterator[tuple[str, str]]:
    """``(url, what the error names)`` of a store that does not exist; afterwards it must still not exist."""
    kind = request.param
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'typo.db'}", "typo.db"
        assert not (tmp_path / "typo.db").exists()
        return
    if kind == "redis":
        base = request.getfixturevalue("redis_url")
        with_password = base.replace("redis://", f"redis://:{SECRET}@", 1) if "@" not in base else base
        yield f"{with_password}?prefix={unique_name}", f"prefix {unique_name!r}"
        assert _redis_keys(base, unique_name) == set()
        return
    if kind == "nats":
        base = request.getfixturevalue("nats_url")
        with_password = base.replace("nats://", f"nats://app:{SECRET}@", 1) if "@" not in base else base
        yield f"{with_password}?prefix={unique_name}", f"prefix {unique_name!r}"
        assert _nats_streams(base, unique_name) == set()
        return
    dsn = request.getfixturevalue("postgres_dsn")
    yield f"{dsn}?schema={unique_name}&password={SECRET}", f"schema {unique_name!r}"
    assert not _schema_exists(dsn, unique_name)


def _assert_refused(result: Result, names: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert names in lines[0]
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
def test_every_command_refuses_a_store_that_does_not_exist(
    missing: tuple[str, str], command: tuple[str, ...], tmp_path: Path
) -> None:
    url, names = missing
    _assert_refused(lifecycle("tasks", "--backend", url, *command, cwd=tmp_path), names)


def test_an_apps_worker_asynctasks_does_not_create_its_store_either(tmp_path: Path) -> None:
    (tmp_path / "worker_app.py").write_text(
        textwrap.dedent(
            """
            from lifecycle.asynctask import AsyncTasks, SQLiteBackend

            tasks = AsyncTasks(SQLiteBackend("app.db"))  # a worker's AsyncTasks: it would create app.db
            """
        )
    )
    _assert_refused(lifecycle("tasks", "--app", "worker_app:tasks", "stats", cwd=tmp_path), "app.db")
    # Listing schedules needs no store, and creates none.
    schedules = lifecycle("tasks", "--app", "worker_app:tasks", "schedules", cwd=tmp_path)
    assert schedules.returncode == 0, schedules.stderr
    assert not (tmp_path / "app.db").exists()


def test_a_worker_creates_the_store_the_commands_then_read(tmp_path: Path) -> None:
    from lifecycle.asynctask import AsyncTasks, SQLiteBackend

    async def start_worker_once() -> None:
        async with AsyncTasks(SQLiteBackend(tmp_path / "tasks.db")):
            pass

    anyio.run(start_worker_once)
    result = lifecycle("tasks", "--backend", f"sqlite:///{tmp_path / 'tasks.db'}", "stats")
    assert result.returncode == 0, result.stderr
