"""HealthServer over a real socket on 127.0.0.1: /livez, /readyz, /status, /metrics, on asyncio and trio."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest

import lifecycle
from lifecycle import EventKind, LifecycleEvent, ManagerState, Restart
from lifecycle.tasks import HealthServer
from tests.core.lifecycle_testkit import task_errors


async def http(
    port: int, path: str, method: str = "GET", raw: bytes | None = None
) -> tuple[int, dict[str, str], str]:
    """One HTTP request; returns (status, headers, body). The server closes the connection after it."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(raw or f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            data = b""
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == (
        len(body) if method != "HEAD" else int(headers["Content-Length"])
    )
    return int(status_line.split(" ")[1]), headers, body.decode()


class Recorder:
    """on_event that lets a test await an event kind."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []
        self._waiters: list[tuple[EventKind, anyio.Event]] = []

    def __call__(self, event: LifecycleEvent) -> None:
        self.events.append(event)
        for kind, waiter in self._waiters:
            if kind is event.kind:
                waiter.set()

    async def wait(self, kind: EventKind) -> None:
        if any(e.kind is kind for e in self.events):
            return
        waiter = anyio.Event()
        self._waiters.append((kind, waiter))
        with anyio.fail_after(10):
            await waiter.wait()


class GatedSleep:
    """A sleep (for the drain delay) that returns when the test says so."""

    def __init__(self) -> None:
        self.asleep = anyio.Event()
        self.gate = anyio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asleep.set()
        await self.gate.wait()


class Gate:
    """An initialize that waits until released, to hold the manager in INITIALIZING."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def initialize(self) -> None:
        self.entered.set()
        await self.release.wait()

    async def execute(self) -> None:
        await anyio.sleep_forever()

    async def cleanup(self) -> None:
        pass


async def run_in_background(
    manager: lifecycle.TaskManager, body: Callable[[], Awaitable[None]]
) -> BaseException | None:
    """Run ``body`` while the manager runs; returns what ``run()`` raised (``None`` when nothing)."""
    outcome: list[BaseException | None] = [None]

    async def run() -> None:
        try:
            await manager.run()
        except Exception as exc:
            outcome[0] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await body()
    return outcome[0]


async def test_probes_through_startup_running_drain_and_stop() -> None:
    events = Recorder()
    drain = GatedSleep()
    manager = lifecycle.TaskManager(name="svc", on_event=events, drain_delay=5, sleep=drain)
    server = HealthServer(manager, port=0)
    gate = Gate()
    manager.add_task("health", server)
    manager.add_task("db", gate)
    manager.add_execute_task("worker", anyio.sleep_forever)

    async def scenario() -> None:
        with anyio.fail_after(10):
            await gate.entered.wait()
        assert server.port != 0
        # starting: the server already answers while a later task initializes
        status, _, body = await http(server.port, "/readyz")
        assert (status, body) == (503, "not ready: starting (initializing)\n")
        assert (await http(server.port, "/livez"))[:3:2] == (200, "ok\n")
        gate.release.set()
        await events.wait(EventKind.READY)
        assert (await http(server.port, "/readyz"))[::2] == (200, "ready\n")

        status, headers, body = await http(server.port, "/status")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        document = json.loads(body)
        assert (document["manager"], document["state"], document["ready"], document["live"]) == (
            "svc",
            "running",
            True,
            True,
        )
        assert [(t["name"], t["kind"], t["stage"], t["state"]) for t in document["tasks"]] == [
            ("health", "task", "execute", "running"),
            ("db", "task", "execute", "running"),
            ("worker", "execute", "execute", "running"),
        ]

        status, headers, body = await http(server.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert 'lifecycle_manager_ready{manager="svc"} 1.0' in body

        # draining: readiness is false, the process is still live, the executes still run
        manager.shutdown()
        with anyio.fail_after(10):
            await drain.asleep.wait()
        assert (await http(server.port, "/readyz"))[::2] == (503, "not ready: draining (shutting down)\n")
        assert (await http(server.port, "/livez"))[0] == 200
        assert json.loads((await http(server.port, "/status"))[2])["draining"] is True
        drain.gate.set()

    assert await run_in_background(manager, scenario) is None
    assert manager.state is ManagerState.STOPPED
    with pytest.raises(OSError):  # cleaned up: the port is closed
        await http(server.port, "/livez")


async def test_livez_turns_503_when_a_task_failed_for_good() -> None:
    events = Recorder()
    manager = lifecycle.TaskManager(on_event=events, sleep=_no_wait)
    server = HealthServer(manager)
    manager.add_task("health", server)
    cleaning = anyio.Event()
    release = anyio.Event()

    class Db(Gate):
        async def cleanup(self) -> None:
            cleaning.set()
            await release.wait()

    db = Db()
    manager.add_task("db", db)
    broken = anyio.Event()

    async def worker() -> None:
        await broken.wait()
        raise RuntimeError("lost the database")

    manager.add_execute_task("worker", worker, restart=Restart(max_restarts=0))

    async def scenario() -> None:
        db.release.set()
        await events.wait(EventKind.READY)
        broken.set()
        with anyio.fail_after(10):
            await cleaning.wait()
        status, _, body = await http(server.port, "/livez")
        assert (status, body) == (503, "not live: tasks failed: worker\n")
        document = json.loads((await http(server.port, "/status"))[2])
        [worker_row] = [t for t in document["tasks"] if t["name"] == "worker"]
        assert worker_row["error"] == "RuntimeError: lost the database"
        release.set()

    assert isinstance(await run_in_background(manager, scenario), lifecycle.TaskManagerError)


async def _no_wait(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


async def test_head_unknown_paths_bad_methods_and_malformed_requests() -> None:
    manager = lifecycle.TaskManager()
    server = HealthServer(manager)
    await server.initialize()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.execute)
            status, headers, body = await http(server.port, "/livez", method="HEAD")
            assert (status, body, headers["Content-Length"]) == (200, "", "3")
            status, _, body = await http(server.port, "/nope?x=1")
            assert status == 404
            assert "/livez, /readyz, /status, /metrics" in body
            status, headers, _ = await http(server.port, "/livez", method="POST")
            assert (status, headers["Allow"]) == (405, "GET, HEAD")
            assert (await http(server.port, "", raw=b"garbage\r\n\r\n"))[0] == 400
            assert (await http(server.port, "/readyz?verbose"))[::2] == (503, "not ready: starting (new)\n")
            tg.cancel_scope.cancel()
    finally:
        await server.cleanup()


async def test_metrics_without_prometheus_client_is_a_404_that_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lifecycle.tasks._health as health_module

    monkeypatch.setattr(health_module, "metrics_available", lambda: False)
    manager = lifecycle.TaskManager()
    server = HealthServer(manager)
    assert server.metrics is None
    await server.initialize()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.execute)
            status, _, body = await http(server.port, "/metrics")
            assert status == 404
            assert "pip install 'anyio-lifecycle[metrics]'" in body
            tg.cancel_scope.cancel()
    finally:
        await server.cleanup()


async def test_a_port_in_use_fails_the_startup() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        manager = lifecycle.TaskManager()
        manager.add_task("health", HealthServer(manager, port=taken.getsockname()[1]))
        with pytest.raises(lifecycle.TaskManagerError) as caught:
            await manager.run()
    [error] = task_errors(caught.value)
    assert error.stage is lifecycle.Stage.INITIALIZE
    assert isinstance(error.__cause__, OSError)


def test_bad_arguments_are_refused() -> None:
    manager = lifecycle.TaskManager()
    with pytest.raises(TypeError, match=r"needs a lifecycle\.TaskManager"):
        HealthServer(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port must be an int from 0 to 65535"):
        HealthServer(manager, port=70000)
    with pytest.raises(ValueError, match="HealthServer port must be at least 0"):
        HealthServer(manager, port=-1)
    with pytest.raises(TypeError, match="HealthServer port must be a whole number"):
        HealthServer(manager, port="8080")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_timeout must be a finite number of seconds greater than"):
        HealthServer(manager, request_timeout=float("inf"))
    with pytest.raises(TypeError, match="request_timeout must be a number of seconds"):
        HealthServer(manager, request_timeout=None)  # type: ignore[arg-type]
    assert HealthServer(manager, host="::1", port=81).url == "http://[::1]:81"


async def test_readyz_is_503_while_a_task_restarts() -> None:
    events = Recorder()
    backoff = GatedSleep()
    manager = lifecycle.TaskManager(on_event=events, sleep=backoff)
    server = HealthServer(manager)
    manager.add_task("health", server)
    fail = anyio.Event()

    async def worker() -> None:
        await fail.wait()
        raise RuntimeError("hiccup")

    manager.add_execute_task("worker", worker, restart=Restart())

    async def scenario() -> None:
        await events.wait(EventKind.READY)
        fail.set()
        with anyio.fail_after(10):
            await backoff.asleep.wait()
        assert (await http(server.port, "/readyz"))[::2] == (503, "not ready: restarting worker\n")
        assert (await http(server.port, "/livez"))[0] == 200  # restarting within the policy is live
        row = json.loads((await http(server.port, "/status"))[2])["tasks"][1]
        assert (row["state"], row["restarts"], row["last_error"]) == ("restarting", 1, "RuntimeError: hiccup")
        manager.shutdown()

    assert await run_in_background(manager, scenario) is None


async def test_in_a_nested_manager_it_answers_while_the_nested_manager_starts() -> None:
    child = lifecycle.TaskManager(name="child")
    server = HealthServer(child)
    gate = Gate()
    child.add_task("health", server)
    child.add_task("db", gate)
    parent = lifecycle.TaskManager(name="parent")
    parent.add_task("child", child)

    async def scenario() -> None:
        with anyio.fail_after(10):
            await gate.entered.wait()
        assert (await http(server.port, "/readyz"))[::2] == (503, "not ready: starting (initializing)\n")
        gate.release.set()
        parent.shutdown()

    assert await run_in_background(parent, scenario) is None


async def waiting_for_payments() -> None:
    await anyio.sleep_forever()


@pytest.mark.parametrize("debug", [True, False])
async def test_debug_stacks_serves_the_stack_report_only_when_debug_is_on(debug: bool) -> None:
    events = Recorder()
    manager = lifecycle.TaskManager(name="svc", on_event=events)
    server = HealthServer(manager, port=0, debug=debug)
    manager.add_task("health", server)
    manager.add_execute_task("payments", waiting_for_payments)
    pages: list[tuple[int, str]] = []

    async def scenario() -> None:
        await events.wait(EventKind.READY)
        status, _, body = await http(server.port, "/debug/stacks")
        pages.append((status, body))
        pages.append((await http(server.port, "/nope"))[::2])
        manager.shutdown()

    assert await run_in_background(manager, scenario) is None
    [(status, body), (_, unknown)] = pages
    if not debug:
        assert (status, body) == (404, "/debug/stacks is served with HealthServer(debug=True)\n")
        assert "/debug/stacks" not in unknown
        return
    assert status == 200
    lines = body.splitlines()
    assert lines[0] == f"svc: stack report for {server.url}/debug/stacks"
    assert any(line.startswith("  task 'payments' (STRICT) still in execute") for line in lines)
    assert any(line.endswith("in waiting_for_payments") for line in lines)
    assert any(line.startswith("  every task of the event loop (") for line in lines)
    assert unknown.endswith("/metrics, /debug/stacks\n")
