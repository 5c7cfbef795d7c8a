"""ASGIServer with real servers on 127.0.0.1 and httpx as the client: hypercorn on asyncio and trio, uvicorn
on asyncio. The port is bound in initialize, the drain still serves, the requests in flight get ``grace``,
then every connection closes; the servers install no signal handlers.

No test sleeps to hope something happened: each step waits for an event (a request entering the app, a
manager event, a gated drain) or polls one observable with a bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

import lifecycle
from lifecycle import EventKind, LifecycleEvent, TaskManagerError
from lifecycle.tasks import ASGIServer
from tests.core.lifecycle_testkit import task_errors

SERVERS = ["hypercorn", "uvicorn"]
WAIT = 20.0


@pytest.fixture(
    params=[("asyncio", "hypercorn"), ("trio", "hypercorn"), ("asyncio", "uvicorn")],
    ids=["asyncio-hypercorn", "trio-hypercorn", "asyncio-uvicorn"],
)
def backend_and_server(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Each server on each backend it supports (uvicorn is asyncio-only: its refusal of trio has a test)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(backend_and_server: tuple[str, str]) -> str:
    return backend_and_server[0]


@pytest.fixture
def server_name(backend_and_server: tuple[str, str]) -> str:
    return backend_and_server[1]


class App:
    """A raw ASGI app: ``/`` answers at once, ``/slow`` waits until ``release`` is set (or is cancelled)."""

    def __init__(self, *, lifespan_fails: bool = False) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()
        self.lifespan: list[str] = []
        self.lifespan_fails = lifespan_fails

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.lifespan.append("startup")
                    if self.lifespan_fails:
                        await send({"type": "lifespan.startup.failed", "message": "no database"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b"hello"
        if scope["path"] == "/slow":
            self.entered.set()
            try:
                await self.release.wait()
            except BaseException:
                self.cancelled.set()
                raise
            body = b"slow done"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Events:
    """on_event that lets a test await a kind of event."""

    def __init__(self) -> None:
        self.seen: list[EventKind] = []
        self._waiting: dict[EventKind, anyio.Event] = {}

    def __call__(self, event: LifecycleEvent) -> None:
        self.seen.append(event.kind)
        waiter = self._waiting.get(event.kind)
        if waiter is not None:
            waiter.set()

    async def wait(self, kind: EventKind) -> None:
        if kind in self.seen:
            return
        waiter = self._waiting.setdefault(kind, anyio.Event())
        with anyio.fail_after(WAIT):
            await waiter.wait()


class GatedSleep:
    """The manager's sleep (the drain delay): returns when the test opens the gate."""

    def __init__(self) -> None:
        self.asleep = anyio.Event()
        self.gate = anyio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asleep.set()
        await self.gate.wait()


class Service:
    """A manager running an ASGIServer in the background, and what the test reads from it."""

    def __init__(self, manager: lifecycle.TaskManager, server: ASGIServer, events: Events) -> None:
        self.manager = manager
        self.server = server
        self.events = events
        self.error: BaseException | None = None
        self.stopped = anyio.Event()

    async def run(self) -> None:
        try:
            await self.manager.run()
        except TaskManagerError as exc:
            self.error = exc
        finally:
            self.stopped.set()

    async def wait_stopped(self) -> None:
        with anyio.fail_after(WAIT):
            await self.stopped.wait()

    async def wait_not_accepting(self) -> None:
        """Until a new connection is refused: the server stops accepting a few loop turns after the stop."""
        with anyio.fail_after(WAIT):
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", self.server.port)
                except OSError:
                    return
                await stream.aclose()
                await anyio.sleep(0.01)


@asynccontextmanager
async def running(
    app: App, server_name: str, *, grace: float = 10.0, **manager_options: Any
) -> AsyncIterator[Service]:
    events = Events()
    manager = lifecycle.TaskManager(name="web", on_event=events, **manager_options)
    server = ASGIServer(app, port=0, server=server_name, grace=grace)  # type: ignore[arg-type]
    manager.add_task("http", server)
    service = Service(manager, server, events)
    async with anyio.create_task_group() as group:
        group.start_soon(service.run)
        await events.wait(EventKind.READY)
        try:
            yield service
        finally:
            manager.shutdown()
            await service.wait_stopped()


async def test_port_zero_picks_a_free_port_reported_after_initialize(server_name: str) -> None:
    server = ASGIServer(App(), port=0, server=server_name)  # type: ignore[arg-type]
    assert server.port == 0
    await server.initialize()
    try:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        with socket.socket() as probe:  # the port is bound and listening already
            probe.connect(("127.0.0.1", server.port))
    finally:
        await server.cleanup()


async def test_requests_are_served_and_the_lifespan_runs_around_them(server_name: str) -> None:
    app = App()
    async with running(app, server_name) as service, httpx.AsyncClient() as client:
        response = await client.get(service.server.url + "/")
        assert (response.status_code, response.text) == (200, "hello")
        assert app.lifespan == ["startup"]
    assert app.lifespan == ["startup", "shutdown"]
    assert service.error is None


async def test_a_taken_port_fails_initialize_so_later_tasks_never_start(server_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        later: list[str] = []

        class Later:
            async def initialize(self) -> None:
                later.append("initialize")

            async def execute(self) -> None:
                await anyio.sleep_forever()

            async def cleanup(self) -> None:
                later.append("cleanup")

        manager = lifecycle.TaskManager(name="web")
        manager.add_task("http", ASGIServer(App(), port=port, server=server_name))  # type: ignore[arg-type]
        manager.add_task("later", Later())
        with anyio.fail_after(WAIT), pytest.raises(TaskManagerError) as caught:
            await manager.run()
    [error] = task_errors(caught.value)
    assert error.task_name == "http"
    assert error.stage is lifecycle.Stage.INITIALIZE
    assert isinstance(error.__cause__, OSError)
    assert f"could not listen on 127.0.0.1:{port}" in str(error.__cause__)
    assert later == [], "a task added after the server never starts"


async def test_a_request_during_the_drain_is_still_served_while_readiness_is_false(server_name: str) -> None:
    drain = GatedSleep()
    async with running(App(), server_name, drain_delay=30, sleep=drain) as service:
        service.manager.shutdown()
        with anyio.fail_after(WAIT):
            await drain.asleep.wait()
        health = service.manager.health()
        assert (health.ready, health.draining) == (False, True)
        async with httpx.AsyncClient() as client:
            response = await client.get(service.server.url + "/")
        assert (response.status_code, response.text) == (200, "hello")
        drain.gate.set()
        await service.wait_stopped()
    assert service.error is None


async def test_a_slow_request_in_flight_completes_during_shutdown_within_grace(server_name: str) -> None:
    app = App()
    responses: list[httpx.Response] = []
    async with running(app, server_name, grace=30) as service, httpx.AsyncClient() as client:

        async def slow_request() -> None:
            responses.append(await client.get(service.server.url + "/slow", timeout=WAIT))

        async with anyio.create_task_group() as group:
            group.start_soon(slow_request)
            with anyio.fail_after(WAIT):
                await app.entered.wait()
            service.manager.shutdown()
            await service.wait_not_accepting()  # new connections are refused while the request runs on
            assert not service.stopped.is_set()
            app.release.set()
        await service.wait_stopped()
    [response] = responses
    assert (response.status_code, response.text) == (200, "slow done")
    assert not app.cancelled.is_set()
    assert service.error is None
    assert app.lifespan == ["startup", "shutdown"]


async def test_connections_are_closed_once_grace_is_over(
    server_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle.tasks")
    app = App()  # /slow is never released: only the end of grace ends it
    outcome: list[object] = []
    async with running(app, server_name, grace=0.2) as service:
        # An idle keep-alive connection, after one answered request.
        idle = await anyio.connect_tcp("127.0.0.1", service.server.port)
        await idle.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        with anyio.fail_after(WAIT):
            while not answer.endswith(b"hello"):
                answer += await idle.receive()
        async with httpx.AsyncClient() as client:

            async def slow_request() -> None:
                try:
                    outcome.append((await client.get(service.server.url + "/slow", timeout=WAIT)).status_code)
                except httpx.TransportError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(slow_request)
                with anyio.fail_after(WAIT):
                    await app.entered.wait()
                started = anyio.current_time()
                service.manager.shutdown()
                await service.wait_stopped()
                stopped_after = anyio.current_time() - started
        with anyio.fail_after(WAIT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await idle.receive()  # the server closed the idle connection
        await idle.aclose()
    assert app.cancelled.is_set(), "the request still in flight was cancelled when grace was over"
    [result] = outcome
    assert result == 500 or isinstance(result, httpx.TransportError), result
    assert stopped_after >= 0.2
    assert "the grace of 0.2 s is over: cancelled 1 request(s) still in flight" in caplog.text
    assert service.error is None


async def test_the_server_installs_no_signal_handlers(server_name: str, anyio_backend: str) -> None:
    watched = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in watched}
    loop_handlers: Callable[[], set[int]] = lambda: set()  # noqa: E731
    if anyio_backend == "asyncio":
        loop = asyncio.get_running_loop()
        loop_handlers = lambda: set(getattr(loop, "_signal_handlers", {}))  # noqa: E731
    in_loop_before = loop_handlers()
    async with running(App(), server_name) as service, httpx.AsyncClient() as client:
        assert (await client.get(service.server.url + "/")).status_code == 200
        assert {signum: signal.getsignal(signum) for signum in watched} == before
        assert loop_handlers() == in_loop_before
    assert {signum: signal.getsignal(signum) for signum in watched} == before


async def test_a_failing_lifespan_startup_fails_the_task_not_the_process(server_name: str) -> None:
    manager = lifecycle.TaskManager(name="web")
    manager.add_task("http", ASGIServer(App(lifespan_fails=True), port=0, server=server_name))  # type: ignore[arg-type]
    with anyio.fail_after(WAIT), pytest.raises(TaskManagerError) as caught:
        await manager.run()
    [error] = task_errors(caught.value)
    assert (error.task_name, error.stage) == ("http", lifecycle.Stage.EXECUTE)
    assert isinstance(error.__cause__, Exception), "never a SystemExit that would end the process"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_uvicorn_on_trio_fails_initialize_with_what_to_do(anyio_backend: str) -> None:
    server = ASGIServer(App(), port=0, server="uvicorn")
    with pytest.raises(RuntimeError, match=r"runs on asyncio only.*use server='hypercorn'"):
        await server.initialize()


def test_an_unknown_server_is_a_value_error_at_construction() -> None:
    with pytest.raises(ValueError, match=r"ASGIServer\(server='gunicorn'\): unknown server"):
        ASGIServer(App(), server="gunicorn")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("server", "option"),
    [("hypercorn", "bind"), ("hypercorn", "graceful_timeout"), ("uvicorn", "uds"), ("uvicorn", "workers")],
)
def test_options_the_task_owns_are_refused(server: str, option: str) -> None:
    with pytest.raises(ValueError, match=f"the option '{option}' is set by ASGIServer"):
        ASGIServer(App(), server=server, **{option: 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("server", SERVERS)
def test_an_option_the_server_does_not_know_is_a_type_error(server: str) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        ASGIServer(App(), server=server, no_such_option=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (65536, ValueError), (True, TypeError), ("80", TypeError)]
)
def test_a_bad_port_is_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="ASGIServer port"):
        ASGIServer(App(), port=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (float("inf"), ValueError), ("5", TypeError)])
def test_a_bad_grace_is_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="ASGIServer grace"):
        ASGIServer(App(), grace=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("server", "extra"), [("hypercorn", "asgi"), ("uvicorn", "uvicorn")])
def test_a_missing_extra_names_the_pip_command(
    server: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(sys.modules):
        if name == server or name.startswith(f"{server}."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, server, None)  # what a missing package looks like to an import
    with pytest.raises(ImportError, match=rf'pip install "anyio-lifecycle\[{extra}\]"'):
        ASGIServer(App(), server=server)  # type: ignore[arg-type]


def test_the_repr_names_the_server_and_the_address() -> None:
    assert repr(ASGIServer(App(), port=8123)) == "<ASGIServer hypercorn http://127.0.0.1:8123>"
