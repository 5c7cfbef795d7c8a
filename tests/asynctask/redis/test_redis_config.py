"""RedisBackend configuration and input checks: URLs, options, credentials, TLS, the asyncio-only rule, the
layout version, and arguments refused before anything reaches the server."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import BackendError, NewTask, Settlement, TaskState, backend_from_url
from lifecycle.asynctask._backends.redis._lua import LAYOUT_VERSION
from lifecycle.asynctask._records import Notice
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer

pytestmark = pytest.mark.redis


def _task(task_id: str, queue: str = "default") -> NewTask:
    return NewTask(task_id, "job", queue, b"", 3, None, T0, T0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_open_under_trio_raises_a_backend_error_that_says_to_use_asyncio() -> None:
    backend = RedisBackend()
    with pytest.raises(BackendError, match=r"needs asyncio, but it runs under trio") as raised:
        await backend.open()
    assert "SQLiteBackend" in str(raised.value), "the message should name a backend that works under trio"
    await backend.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379/0", r"bad Redis URL.*redis://"),
        ("127.0.0.1:6379", r"bad Redis URL"),
        ("redis://127.0.0.1:6379/0?decode_responses=true", r"'decode_responses' is not supported"),
        ("redis://127.0.0.1:6379/0?protocol=3", r"'protocol' is not supported"),
    ],
)
def test_a_url_redis_py_cannot_use_is_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisBackend(url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": ""}, r"RedisBackend\(prefix=...\) must be a non-empty string"),
        ({"prefix": "a{b}"}, r"must not contain '\{' or '\}'"),
        ({"socket_timeout": 0}, r"RedisBackend\(socket_timeout=...\) must be a finite number of seconds"),
        ({"reconnect_timeout": float("inf")}, r"reconnect_timeout=...\) must be a finite number of seconds"),
        ({"max_connections": 1}, r"RedisBackend\(max_connections=...\) must be at least 2, got 1"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisBackend(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": 7}, r"RedisBackend\(prefix=...\) must be a non-empty string, got 7"),
        ({"connect_timeout": "10"}, r"connect_timeout=...\) must be a number of seconds"),
        ({"max_connections": 2.5}, r"max_connections=...\) must be a whole number"),
    ],
)
def test_options_of_the_wrong_type_are_a_type_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        RedisBackend(**options)  # type: ignore[arg-type]


def test_repr_hides_the_password() -> None:
    backend = RedisBackend("redis://app:s3cret@redis.internal:6380/2", prefix="shop")
    assert repr(backend) == "RedisBackend('redis://app:***@redis.internal:6380/2', prefix='shop')"
    assert backend.prefix == "shop"
    assert backend.key_prefix == "{shop}:"


def test_backend_from_url_builds_a_redis_backend_with_the_prefix_option() -> None:
    backend = backend_from_url("redis://127.0.0.1:6379/0?prefix=X")
    assert isinstance(backend, RedisBackend)
    assert backend.prefix == "X"
    assert repr(backend) == "RedisBackend('redis://127.0.0.1:6379/0', prefix='X')"
    tls = backend_from_url("rediss://:pw@cache.internal:6380/1?prefix=app&ssl_cert_reqs=none")
    assert isinstance(tls, RedisBackend)
    assert tls.prefix == "app"


async def test_open_fails_fast_and_clearly_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", connect_timeout=2)
        with pytest.raises(BackendError, match=rf"cannot use Redis at redis://127.0.0.1:{port}/0"):
            await backend.open()
    await backend.close()


async def test_password_and_user_come_from_the_url(own_redis_with_password: RedisServer) -> None:
    server = own_redis_with_password
    good = RedisBackend(f"redis://:hunter2@127.0.0.1:{server.port}/0", prefix="auth")
    await good.open()
    try:
        assert await good.enqueue_many([_task("a")]) == ["a"]
        assert (await good.stats()) == {"default": {TaskState.PENDING: 1}}
    finally:
        await good.close()
    acl = RedisBackend(f"redis://worker:w0rker@127.0.0.1:{server.port}/0", prefix="auth")
    await acl.open()
    try:  # everything a worker and an operator do, with the least rights
        (claimed,) = await acl.claim(["default"], 5, now=T0, lease_until=T0 + 30)
        assert await acl.extend_leases([("a", claimed.token)], lease_until=T0 + 60) == set()
        assert await acl.settle([Settlement("a", claimed.token, TaskState.SUCCEEDED, at=T0 + 1)]) == set()
        await acl.wait_for_work(["default"], timeout=0.05)
        assert [r.id for r in await acl.list_records(states={TaskState.SUCCEEDED})] == ["a"]
        assert await acl.reclaim_expired(now=T0 + 100, lease_until=T0 + 130, limit=5) == []
        assert await acl.purge(states={TaskState.SUCCEEDED}) == 1
        # Without rights on the notices channel, cancelling a running task and settling it still work
        # (publishing is best effort), and waiting for notices just waits.
        assert await acl.enqueue_many([_task("b")]) == ["b"]
        (running,) = await acl.claim(["default"], 5, now=T0 + 2, lease_until=T0 + 30)
        assert await acl.cancel(["b"], now=T0 + 3) == ["b"]
        assert await acl.cancel_requests(["b"]) == {"b"}
        assert await acl.wait_for_notices(timeout=0.05) == []
        cancelled = Settlement("b", running.token, TaskState.CANCELLED, at=T0 + 4)
        assert await acl.settle([cancelled]) == set()
        assert await acl.purge(states={TaskState.CANCELLED}) == 1
        # the counter, the layout version, the last claim's log and the two settle calls' markers
        assert await acl.clear() == 5
    finally:
        await acl.close()
    listener = RedisBackend(f"redis://listener:l1stener@127.0.0.1:{server.port}/0", prefix="auth")
    await listener.open()
    try:  # with the documented rights for notices, they arrive
        assert await listener.wait_for_notices(timeout=0) == []
        assert await listener.enqueue_many([_task("c")]) == ["c"]
        (leased,) = await listener.claim(["default"], 5, now=T0 + 5, lease_until=T0 + 30)
        assert await listener.cancel(["c"], now=T0 + 6) == ["c"]
        with anyio.fail_after(10):
            assert await listener.wait_for_notices(timeout=10) == [Notice("cancel", "c")]
        # Those rights do not include PUBSUB, with which a settle leaves out the notice nobody else would
        # read: the backend found that out once, and its settles send their notice (a pattern subscriber,
        # not counted among the channel's, sees it) without being refused PUBSUB each time.
        admin = aioredis.Redis.from_url(f"redis://:hunter2@127.0.0.1:{server.port}/0")
        watcher = admin.pubsub(ignore_subscribe_messages=True)
        try:
            await watcher.psubscribe("{auth}:notices")
            settled = Settlement("c", leased.token, TaskState.CANCELLED, at=T0 + 7)
            assert await listener.settle([settled]) == set()
            with anyio.fail_after(10):
                while (message := await watcher.get_message(timeout=10)) is None:
                    pass
            assert message["data"].split(b"\0")[1:] == [b"c"]
            assert await listener.enqueue_many([_task("d")]) == ["d"]
            (again,) = await listener.claim(["default"], 5, now=T0 + 8, lease_until=T0 + 30)
            assert (
                await listener.settle([Settlement("d", again.token, TaskState.SUCCEEDED, at=T0 + 9)]) == set()
            )
            with anyio.fail_after(10):
                while (message := await watcher.get_message(timeout=10)) is None:
                    pass
            assert message["data"].split(b"\0")[1:] == [b"d"]
            refusals = 0
            for entry in await admin.acl_log():
                if "pubsub" in str(entry.get("object", "")):
                    refusals += int(str(entry.get("count", 1)))
            assert refusals == 1  # the one check, not each settle
        finally:
            await watcher.aclose()
            await admin.aclose()
        await listener.clear()
    finally:
        await listener.close()
    bad = RedisBackend(f"redis://:wrong@127.0.0.1:{server.port}/0", prefix="auth")
    with pytest.raises(BackendError) as raised:
        await bad.open()
    assert "wrong" not in str(raised.value), "the message must not show the password"
    assert "***" in str(raised.value)
    await bad.close()


async def test_an_acl_user_without_time_still_waits_and_claims(own_redis_with_password: RedisServer) -> None:
    """The documented least rights leave out TIME, which a claim behind a wait measures the wait with: the
    claim then uses the caller's now unadvanced, and work due by it is still leased in the wait's call."""
    server = own_redis_with_password
    acl = RedisBackend(f"redis://worker:w0rker@127.0.0.1:{server.port}/0", prefix="auth")
    await acl.open()
    try:
        assert await acl.enqueue_many([_task("due")]) == ["due"]
        with anyio.fail_after(10):
            claimed = await acl.wait_and_claim(
                ["default"], 5, now=T0 + 1, lease_until=T0 + 31, timeout=60, woken=anyio.Event()
            )
        assert claimed is not None
        assert [c.record.id for c in claimed] == ["due"]
        assert claimed[0].record.started_at is not None
        assert T0 + 1 <= claimed[0].record.started_at < T0 + 2
        with anyio.fail_after(10):  # nothing due: the wait times out, the claim behind it finds nothing
            assert (
                await acl.wait_and_claim(
                    ["default"], 5, now=T0 + 2, lease_until=T0 + 32, timeout=0.05, woken=anyio.Event()
                )
                == []
            )
        await acl.clear()
    finally:
        await acl.close()


@pytest.fixture
def own_redis_with_password(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private server with a default-user password, an ACL user ``worker`` (password ``w0rker``) with
    the least rights the documentation lists: the prefix's keys, and no INFO (the backend then skips its
    courtesy checks); and a user ``listener`` (``l1stener``) with the rights it lists for notices too."""
    return redis_server_factory(
        "--requirepass", "hunter2",
        "--user", "worker", "on", ">w0rker", "~{auth}:*", "+@read", "+@write", "+@scripting", "+@connection",
        "--user", "listener", "on", ">l1stener", "~{auth}:*", "&{auth}:*", "+@read", "+@write", "+@scripting",
        "+@connection", "+publish", "+subscribe",
    )  # fmt: skip


async def test_a_newer_key_layout_is_refused(open_redis: OpenRedis, redis_url: str, unique_name: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(f"{{{unique_name}}}:layout", "99")
        with pytest.raises(BackendError, match=r"layout version 99, newer than"):
            await open_redis()
    finally:
        await client.aclose()


async def test_open_records_the_layout_and_open_again_is_harmless(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await backend.open()
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.get(f"{{{unique_name}}}:layout") == str(LAYOUT_VERSION).encode()
    finally:
        await client.aclose()


async def test_calls_before_open_say_to_open_first() -> None:
    backend = RedisBackend()
    with pytest.raises(RuntimeError, match=r"not open: call `await backend.open\(\)` first"):
        await backend.get("x")


async def test_a_server_that_evicts_keys_is_reported(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    backend = RedisBackend(server.url, prefix="evict")
    await backend.open()
    await backend.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "lifecycle.asynctask.redis"]
    assert any("maxmemory-policy allkeys-lru" in message for message in warnings), warnings


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    names = ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    ca_key, ca, key, csr, cert = (directory / name for name in names)
    # The key usage extensions a strict verifier (Python 3.13's default VERIFY_X509_STRICT) requires.
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid:always\n"
    )
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=lifecycle test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


async def test_tls_through_a_rediss_url(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ca, cert, key = _certificates(tmp_path)
    server = redis_server_factory(
        "--port", "0", "--tls-port", "{port}", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    backend = backend_from_url(f"{url}&prefix=tls")
    await backend.open()
    try:
        assert await backend.enqueue_many([_task("secure")]) == ["secure"]
        record = await backend.get("secure")
        assert record is not None
        assert record.state is TaskState.PENDING
    finally:
        await backend.close()
    untrusted = RedisBackend(f"rediss://127.0.0.1:{server.port}/0", prefix="tls", connect_timeout=5)
    with pytest.raises(BackendError, match=r"(?i)certificate"):
        await untrusted.open()  # the server's certificate is not signed by a CA the system trusts
    await untrusted.close()


async def test_a_settlement_to_active_is_refused_before_anything_is_sent(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("a")])
    (claimed,) = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    with pytest.raises(ValueError, match=r"cannot settle task 'a' as 'active'"):
        await backend.settle([Settlement("a", claimed.token, TaskState.ACTIVE, at=T0 + 1)])
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.lease_until) == (TaskState.ACTIVE, T0 + 30)


def test_socket_timeout_in_the_url_is_the_backends_own_reply_timeout() -> None:
    backend = RedisBackend("redis://127.0.0.1:6379/0?socket_timeout=5&health_check_interval=10")
    assert backend._socket_timeout == 5.0
    assert (
        repr(backend)
        == "RedisBackend('redis://127.0.0.1:6379/0?health_check_interval=10', prefix='lifecycle')"
    )
    with pytest.raises(ValueError, match=r"socket_timeout must be a number of seconds"):
        RedisBackend("redis://127.0.0.1:6379/0?socket_timeout=soon")
    with pytest.raises(ValueError, match=r"socket_timeout=...\) must be a finite number of seconds greater"):
        RedisBackend("redis://127.0.0.1:6379/0?socket_timeout=0")
