"""Passwords never show (issue 10, item 6): a unique secret is put in the password position of every URL and
DSN form the library takes, malformed ones included, and every output that can show a URL is searched for
it: reprs, the errors of backend_from_url, of the backend constructors and of open() against a closed port
(with their causes, as tracebacks print them), every log record, the CLI's stdout and stderr (``tasks``
commands in-process, ``worker`` as a real process) and HealthServer's ``/status`` over a real socket.

Also the rules of :func:`lifecycle._redact.redact` itself: what is masked and what stays visible."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest

import lifecycle
from lifecycle import Backoff, EventKind, LifecycleEvent, Restart
from lifecycle._redact import redact, redact_tree
from lifecycle.asynctask import backend_from_url
from lifecycle.cli import main
from lifecycle.tasks import HealthServer

MARK = "Sw33pMark"
"""In every secret below: finding it anywhere in an output is a leak."""
SECRET = f"{MARK}42"
SPECIAL = f"p@ss/{MARK}:w0rd [x]"  # characters that must be percent-encoded in a URL
SPACED = f"two {MARK} words"  # for a quoted key=value DSN value


def url_forms(redis_port: int, postgres_port: int) -> list[str]:
    """Every form, with the secret as the password; the servers' ports refuse connections."""
    r = f"127.0.0.1:{redis_port}"
    p = f"127.0.0.1:{postgres_port}"
    return [
        # Redis
        f"redis://:{SECRET}@{r}/0",
        f"redis://worker:{SECRET}@{r}/0?prefix=sweep",
        f"rediss://worker:{SECRET}@{r}/0?ssl_cert_reqs=none&prefix=sweep",
        f"redis://{r}/0?password={SECRET}",
        f"redis://worker:{quote(SPECIAL, safe='')}@{r}/1",
        f"redis://worker:{MARK}@home@{r}/0",  # an unencoded "@" in the password
        f"unix://:{SECRET}@/nonexistent/sweep/redis.sock?db=0",
        f"unix:///nonexistent/sweep/redis.sock?db=0&password={SECRET}&prefix=sweep",
        f"redis://{r}/0?cluster=true&password={SECRET}",
        # PostgreSQL
        f"postgresql://app:{SECRET}@{p}/app",
        f"postgres://app:{SECRET}@{p}/app?schema=sweep",
        f"postgresql://app@{p}/app?password={SECRET}&sslmode=disable",
        f"postgresql://app:{quote(SPECIAL, safe='')}@{p}/app",
        f"host=127.0.0.1 port={postgres_port} dbname=app user=app password={SECRET}",
        f"host=127.0.0.1 port={postgres_port} dbname=app password='{SPACED}'",
        f"host=127.0.0.1 port={postgres_port} dbname=app sslpassword={SECRET} password = {SECRET}",
        # NATS
        f"nats://worker:{SECRET}@{r}",
        f"nats://worker:{SECRET}@{r}?prefix=sweep",
        f"nats://worker:{quote(SPECIAL, safe='')}@{r}",
        f"nats://a:{SECRET}@{r}, nats://b:{SECRET}@{p}?prefix=sweep&replicas=3",
        f"nats://{r}?prefix=sweep&password={SECRET}",
        f"nats://worker:{SECRET}@{r}/path",
        # SQLite and memory (no passwords of their own, but a URL can still carry one by mistake)
        f"sqlite:///sweep.db?password={SECRET}",
        f"sqlite://app:{SECRET}@host/sweep.db",
        f"memory://app:{SECRET}@host",
        # unsupported schemes
        f"redis+sentinel://user:{SECRET}@sentinel:26379/0",
        f"mysql://root:{SECRET}@db/tasks",
        f"amqp://guest:{SECRET}@rabbit//",
        # malformed
        f"postgresql://app:{SECRET}@[bad/app",
        f"redis://:{SECRET}@[::1/0",
        f"redis://:{SECRET}@{r}:notaport/0",
        f"redis://:{SECRET}@{r}/notadb",
        f"redis://{r}/0?password={SECRET}&password={SECRET}",
        f"redis://:{SECRET}@{r}/0?nosuchoption=1",
        f"postgresql://app:{SECRET}@{p}/app?nosuchoption=1",
        f"postgres://app:{SECRET}@{p}/app?schema=a&schema=b",
        f"host=127.0.0.1 password={SECRET} junk dbname=app",
        f"host=127.0.0.1 password=Hunter2 {SECRET} dbname=app",  # an unquoted space in the password
        f"host=127.0.0.1 dbname=app password='{SECRET}",  # an unterminated quote
        f"postgresql://app:{SECRET}@{p}/app%zz",
    ]


@pytest.fixture
def closed_ports() -> Iterator[tuple[int, int]]:
    """Two loopback ports that refuse connections (bound, never listening) for the whole test."""
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        yield first.getsockname()[1], second.getsockname()[1]


def error_text(exc: BaseException) -> str:
    """The message of an error and of every error it chains to, as a traceback prints them."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        parts += [str(note) for note in getattr(current, "__notes__", ())]
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return "\n".join(parts)


def leaks(outputs: list[tuple[str, str]]) -> list[str]:
    return [f"{where}: {text}" for where, text in outputs if MARK in text or quote(MARK) in text]


def records_text(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [(f"log {record.name}", formatter.format(record)) for record in caplog.records]


# -- the backends: repr, construction errors, open() errors, logs --------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the Redis, PostgreSQL and NATS clients need asyncio
async def test_no_backend_output_shows_a_password(
    closed_ports: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("lifecycle.asynctask.redis")
    postgres = pytest.importorskip("lifecycle.asynctask.postgres")
    nats = pytest.importorskip("lifecycle.asynctask.nats")
    from lifecycle.asynctask.redis import RedisBackend

    caplog.set_level(logging.DEBUG)
    outputs: list[tuple[str, str]] = []
    opened = 0

    async def exercise(where: str, build: Callable[[str], Any], index: int, url: str) -> None:
        nonlocal opened
        try:
            backend = build(url)
        except Exception as exc:
            outputs.append((f"{where} error for form {index}", error_text(exc)))
            return
        outputs.append((f"repr of {where}", repr(backend)))
        outputs.append((f"str of {where}", str(backend)))
        try:
            with anyio.fail_after(30):
                await backend.open()
        except Exception as exc:
            opened += 1
            outputs.append((f"open() of {backend!r}", error_text(exc)))
        finally:
            await backend.close()

    for index, url in enumerate(url_forms(*closed_ports)):
        await exercise("backend_from_url", backend_from_url, index, url)
        if url.startswith(("redis", "unix")):
            await exercise("RedisBackend", RedisBackend, index, url)
        if url.startswith("postgres") or "=" in url.partition("://")[0]:
            await exercise("PostgresBackend", postgres.PostgresBackend, index, url)
        if url.startswith("nats"):
            await exercise("NatsBackend", nats.NatsBackend, index, url)
    outputs += records_text(caplog)

    assert opened >= 15, "too few forms reached open(): the sweep would prove little"
    assert not leaks(outputs), "\n".join(leaks(outputs))
    shown = "\n".join(text for _, text in outputs)
    assert "***" in shown
    assert f"127.0.0.1:{closed_ports[0]}" in shown  # hosts and ports stay visible
    assert "worker:***@" in shown  # and user names


# -- the CLI -------------------------------------------------------------------------------------------------


def test_no_tasks_command_output_shows_a_password(
    closed_ports: tuple[int, int],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    caplog.set_level(logging.DEBUG)
    outputs: list[tuple[str, str]] = []
    statuses: set[int] = set()
    for index, url in enumerate(url_forms(*closed_ports)):
        for argv in (
            ["tasks", "--backend", url, "stats"],
            ["tasks", "list", "--backend", url, "--debug"],
            ["tasks", "--json", "--backend", url, "show", "some-id"],
        ):
            statuses.add(main(argv))
            captured = capsys.readouterr()
            outputs += [(f"stdout of form {index} {argv[1:]}", captured.out)]
            outputs += [(f"stderr of form {index} {argv[1:]}", captured.err)]
    outputs += records_text(caplog)
    assert statuses <= {1, 2}  # every form fails: unreachable, or a usage error
    assert not leaks(outputs), "\n".join(leaks(outputs))
    assert "***" in "".join(text for _, text in outputs)


WORKER_APP = textwrap.dedent(
    """
    import os
    from lifecycle.asynctask import AsyncTasks, backend_from_url

    tasks = AsyncTasks(backend_from_url(os.environ["SWEEP_URL"]))

    @tasks.register(name="sweep.noop")
    async def noop() -> None: ...
    """
)


def test_no_worker_output_shows_a_password(closed_ports: tuple[int, int], tmp_path: Path) -> None:
    pytest.importorskip("lifecycle.asynctask.redis")
    pytest.importorskip("lifecycle.asynctask.postgres")
    (tmp_path / "sweep_app.py").write_text(WORKER_APP)
    redis_port, postgres_port = closed_ports
    forms = [
        f"redis://worker:{SECRET}@127.0.0.1:{redis_port}/0?prefix=sweep",  # the banner, then open() fails
        f"redis://127.0.0.1:{redis_port}/0?password={SECRET}",
        f"unix:///nonexistent/sweep/redis.sock?password={SECRET}",
        f"postgresql://app:{SECRET}@127.0.0.1:{postgres_port}/app",
        f"postgresql://app@127.0.0.1:{postgres_port}/app?password={SECRET}",
        f"redis+sentinel://user:{SECRET}@sentinel:26379/0",  # the target cannot be loaded
    ]
    outputs: list[tuple[str, str]] = []
    for url in forms:
        env = {**os.environ, "SWEEP_URL": url, "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
        env.pop("LIFECYCLE_TASKS_BACKEND", None)
        result = subprocess.run(
            [sys.executable, "-m", "lifecycle.cli", "worker", "sweep_app:tasks"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode in (1, 2), result.stderr
        outputs += [(f"worker stdout ({redact(url)})", result.stdout)]
        outputs += [(f"worker stderr ({redact(url)})", result.stderr)]
    assert not leaks(outputs), "\n".join(leaks(outputs))
    stderr = "".join(text for _, text in outputs)
    assert "worker: RedisBackend('redis://worker:***@127.0.0.1" in stderr  # the banner, masked
    assert "***" in stderr


# -- HealthServer /status ------------------------------------------------------------------------------------


async def test_status_page_masks_passwords_in_task_errors(closed_ports: tuple[int, int]) -> None:
    forms = url_forms(*closed_ports)
    restarting = anyio.Event()
    failed: set[str] = set()

    def on_event(event: LifecycleEvent) -> None:
        if event.kind is EventKind.TASK_RESTARTING and event.task_name is not None:
            failed.add(event.task_name)
            if len(failed) == len(forms):
                restarting.set()

    manager = lifecycle.TaskManager(on_event=on_event)
    server = HealthServer(manager)
    manager.add_task("health", server)
    for index, url in enumerate(forms):

        async def lose(url: str = url) -> None:
            raise ConnectionError(f"lost the connection to {url} (after {{'password': '{SECRET}'}})")

        # a long backoff keeps every task in "restarting" with its last error while the page is read
        manager.add_execute_task(
            f"client-{index}", lose, restart=Restart(backoff=Backoff(initial=600, cap=600))
        )

    body = ""

    async def read_status() -> None:
        nonlocal body
        with anyio.fail_after(20):
            await restarting.wait()
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(b"GET /status HTTP/1.1\r\nHost: probe\r\n\r\n")
                data = b""
                while True:
                    try:
                        data += await stream.receive()
                    except anyio.EndOfStream:
                        break
        body = data.decode().partition("\r\n\r\n")[2]
        manager.shutdown()

    async with anyio.create_task_group() as group:
        group.start_soon(read_status)
        await manager.run()
    document = json.loads(body)
    errors = [row["last_error"] for row in document["tasks"] if row["name"].startswith("client-")]
    assert len(errors) == len(forms)
    assert all(error and "ConnectionError: lost the connection to" in error for error in errors)
    assert MARK not in body, body
    assert f"127.0.0.1:{closed_ports[0]}" in body
    assert "'password': '***'" in body


# -- the rules of redact() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://user:pw@cache.internal:6380/2?prefix=x", "redis://user:***@cache.internal:6380/2?prefix=x"),
        ("redis://:pw@h/0", "redis://:***@h/0"),
        ("redis://:p@ss@h/0", "redis://:***@h/0"),
        ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
        ("rediss://h/0?ssl_password=pw", "rediss://h/0?ssl_password=***"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        (
            "postgresql://app:pw@db:5432/app?sslmode=require",
            "postgresql://app:***@db:5432/app?sslmode=require",
        ),
        ("host=db user=app password=pw dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password = 'a b' dbname=app", "host=db password = '***' dbname=app"),
        ("host=db password='it\\'s' dbname=app", "host=db password='***' dbname=app"),
        ("PGPASSWORD=pw psql", "PGPASSWORD=*** psql"),
        ("{'password': 'pw', 'host': 'db'}", "{'password': '***', 'host': 'db'}"),
        ('{"token": "pw"}', '{"token": "***"}'),
        ("Password: pw", "Password: ***"),
        (
            "RedisBackend('redis://h/0?pass=pw', prefix='x')",
            "RedisBackend('redis://h/0?pass=***', prefix='x')",
        ),
        # left alone: no password in them
        ("redis://cache.internal:6379/0", "redis://cache.internal:6379/0"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("sqlite:////home/me@work/tasks.db", "sqlite:////home/me@work/tasks.db"),
        ('"redis://[user:password@]host:port/db"', '"redis://[user:password@]host:port/db"'),
        ("password authentication failed for user app", "password authentication failed for user app"),
        ("compass: north", "compass: north"),
    ],
)
def test_redact_masks_passwords_and_keeps_the_rest(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_masks_the_secrets_of_a_source_wherever_they_appear() -> None:
    dsn = "host=db password=Hunter2 spaced-part dbname=app"
    message = 'missing "=" after "spaced-part" in connection info string'
    assert redact(message) == message  # nothing says it is a password...
    assert (
        redact(message, dsn) == 'missing "=" after "***" in connection info string'
    )  # ...but the source does
    assert redact(dsn, dsn) == "host=db password=*** dbname=app"
    url = f"redis://:{quote('p@ss/w0rd')}@h/0"
    assert redact("AUTH failed for p@ss/w0rd", url) == "AUTH failed for ***"
    assert redact("no secret here", "redis://:ab@h") == "no secret here"  # short secrets only by position


def test_redact_tree_masks_every_string_of_a_document() -> None:
    document = {"tasks": [{"error": "lost redis://:pw@h/0", "n": 1}], "url=": ("password=pw",)}
    assert redact_tree(document) == {
        "tasks": [{"error": "lost redis://:***@h/0", "n": 1}],
        "url=": ("password=***",),
    }


def test_library_loggers_mask_secrets_in_messages_and_tracebacks_for_any_handler() -> None:
    import io
    import logging

    from lifecycle._redact import library_logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = library_logger("lifecycle.secret-sweep-test")
    assert library_logger("lifecycle.secret-sweep-test").filters.count(logger.filters[0]) == 1
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise OSError(f"refused by redis://user:{SECRET}@cache:6379/0")
        except OSError:
            logger.exception("could not use %s", f"postgresql://app:{SECRET}@db/app")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert SECRET not in output, output
    assert "could not use postgresql://app:***@db/app" in output
    assert "OSError: refused by redis://user:***@cache:6379/0" in output
