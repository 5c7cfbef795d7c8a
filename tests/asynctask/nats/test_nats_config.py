"""NatsBackend configuration and input checks: URLs, options, credentials in reprs and errors, the
asyncio-only rule, an unreachable server, the layout version and streams lifecycle did not create."""

from __future__ import annotations

import json
import socket

import nats
import pytest
from nats.js.api import StreamConfig

from lifecycle.asynctask import BackendError, backend_from_url
from lifecycle.asynctask.nats import NatsBackend
from tests.asynctask.nats.nats_servers import delete_streams

pytestmark = pytest.mark.nats


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_open_under_trio_raises_a_backend_error_that_says_to_use_asyncio() -> None:
    backend = NatsBackend()
    with pytest.raises(BackendError, match=r"NatsBackend needs asyncio, but it runs under trio") as raised:
        await backend.open()
    assert "SQLiteBackend" in str(raised.value), "the message should name a backend that works under trio"
    await backend.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:4222", r"takes nats://host:port"),
        ("127.0.0.1:4222", r"takes nats://host:port"),
        ("nats://127.0.0.1:4222?prefix=x", r"takes no path or options in the URL.*pass prefix="),
        ("nats://127.0.0.1:4222/db", r"takes no path or options"),
        ("nats://a:4222,redis://b:6379", r"takes nats://host:port"),
    ],
)
def test_a_url_that_is_not_a_nats_server_is_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NatsBackend(url)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"prefix": ""}, ValueError, r"prefix=...\) must be letters, digits, '-' and '_'"),
        ({"prefix": "a.b"}, ValueError, r"must be letters, digits.*got 'a\.b'"),
        ({"prefix": "a b"}, ValueError, r"must be letters, digits"),
        ({"prefix": 7}, TypeError, r"NatsBackend\(prefix=...\) must be a string, got 7"),
        ({"replicas": 0}, ValueError, r"NatsBackend\(replicas=...\) must be at least 1, got 0"),
        ({"replicas": 7}, ValueError, r"must be 1 to 5"),
        ({"replicas": 1.5}, TypeError, r"NatsBackend\(replicas=...\) must be a whole number"),
        ({"servers": ["nats://x:4222"]}, ValueError, r"servers in url"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        NatsBackend(**options)  # type: ignore[arg-type]


def test_repr_and_backend_from_url_hide_the_password() -> None:
    backend = NatsBackend("nats://app:s3cret-pw@nats.internal:4222", prefix="shop", replicas=3)
    assert repr(backend) == "NatsBackend('nats://app:***@nats.internal:4222', prefix='shop', replicas=3)"
    assert backend.streams == ("shop_tasks_log", "shop_tasks_snap")
    built = backend_from_url("nats://app:s3cret-pw@nats.internal:4222?prefix=shop")
    assert isinstance(built, NatsBackend)
    assert "s3cret-pw" not in repr(built)


async def test_an_unreachable_server_is_a_backend_error_naming_it_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe is closed
    backend = NatsBackend(f"nats://app:s3cret-pw@127.0.0.1:{port}")
    backend.connect_timeout = 1.0
    with pytest.raises(
        BackendError, match=rf"cannot connect to NATS at nats://app:\*\*\*@127\.0\.0\.1:{port}"
    ) as raised:
        await backend.open()
    assert "s3cret-pw" not in str(raised.value)
    await backend.close()


async def test_calls_before_open_say_to_open_first() -> None:
    backend = NatsBackend()
    with pytest.raises(RuntimeError, match=r"not open: call `await backend.open\(\)` first"):
        await backend.get("x")


async def test_a_newer_layout_is_refused(nats_url: str, unique_name: str) -> None:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(
                name=f"{unique_name}_tasks_log",
                subjects=[f"{unique_name}.tasks.log"],
                description="lifecycle tasks, layout 99",
            )
        )
        backend = NatsBackend(nats_url, prefix=unique_name)
        with pytest.raises(
            BackendError, match=r"use layout version 99, newer than .* upgrade anyio-lifecycle"
        ):
            await backend.open()
        await backend.close()
    finally:
        await client.close()
        await delete_streams(nats_url, unique_name)


async def test_a_stream_lifecycle_did_not_create_is_left_alone(nats_url: str, unique_name: str) -> None:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(
                name=f"{unique_name}_tasks_log", subjects=[f"{unique_name}.orders"], description="orders"
            )
        )
        await js.publish(f"{unique_name}.orders", json.dumps({"order": 1}).encode())
        backend = NatsBackend(nats_url, prefix=unique_name)
        with pytest.raises(BackendError, match=r"was not created by lifecycle .*choose another prefix"):
            await backend.open()
        await backend.close()
        assert (await js.stream_info(f"{unique_name}_tasks_log")).state.messages == 1, "nothing was changed"
    finally:
        await client.close()
        await delete_streams(nats_url, unique_name)


async def test_a_server_without_jetstream_is_a_backend_error_that_says_to_enable_it(
    nats_server_without_jetstream: str,
) -> None:
    backend = NatsBackend(nats_server_without_jetstream)
    with pytest.raises(
        BackendError, match=r"has no JetStream: start it with JetStream enabled \(nats-server -js"
    ):
        await backend.open()
    await backend.close()
