"""A small service with one well-behaved main(): a database, an HTTP server, a health reporter.

    python examples/service.py --seconds 5      # stops by itself after 5 seconds
    python examples/service.py --port 8080      # runs until Ctrl-C or SIGTERM; try: curl 127.0.0.1:8080

Start-up is ordered (the database connects before the HTTP server listens), everything then runs together,
every connection is served by an execute task added while the service runs, and the shutdown is clean and
in reverse order: the server stops listening before the database disconnects.

It needs nothing but the package and runs on asyncio or trio (``--backend trio``). For a service built on a
web framework and a real database, see ``examples/fastapi_service.py``.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import lifecycle
from lifecycle.tasks import Repeat, Timer

#: What ends a connection early; the client is gone, the service carries on.
CLIENT_GONE = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.DelimiterNotFound,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    TimeoutError,
)


def say(message: str) -> None:
    print(message, flush=True)


class FakeDatabase:
    """Stands in for a connection pool: connects in initialize, disconnects in cleanup."""

    def __init__(self) -> None:
        self.connected = False
        self.visits = 0

    async def initialize(self) -> None:
        await anyio.sleep(0.05)  # pretend to connect
        self.connected = True
        say("database: connected")

    async def execute(self) -> None:
        await anyio.sleep_forever()  # a pool has no work of its own; it waits for the shutdown

    async def cleanup(self) -> None:
        self.connected = False
        say("database: disconnected")

    async def record_visit(self) -> int:
        if not self.connected:
            raise RuntimeError("the database is not connected")
        self.visits += 1
        return self.visits


class HttpServer:
    """A tiny HTTP/1.0 server on anyio's TCP listener; each connection becomes its own execute task."""

    def __init__(self, manager: lifecycle.TaskManager, database: FakeDatabase, port: int) -> None:
        self.manager = manager
        self.database = database
        self.port = port
        self.numbers = itertools.count(1)
        self.open_connections = 0

    async def initialize(self) -> None:
        self.listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = self.listener.extra(SocketAttribute.local_port)
        say(f"http: listening on http://127.0.0.1:{self.port}/")

    async def execute(self) -> None:
        await self.listener.serve(self.accept)

    async def cleanup(self) -> None:
        await self.listener.aclose()
        say("http: stopped listening")

    async def accept(self, stream: SocketStream) -> None:
        name = f"connection-{next(self.numbers)}"
        try:
            # ERROR: a connection task that returns is fine; the manager cancels open ones at shutdown.
            self.manager.add_execute_task(
                name, functools.partial(self.respond, name, stream), lifecycle.TaskType.ERROR
            )
        except RuntimeError:  # shutdown has begun: no new work is accepted
            await stream.aclose()

    async def respond(self, name: str, stream: SocketStream) -> None:
        self.open_connections += 1
        try:
            async with stream:
                with anyio.fail_after(10):
                    request = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", 65536)
                method, _, rest = request.decode("latin-1").partition(" ")
                path = rest.split(" ", 1)[0]
                visit = await self.database.record_visit()
                body = f"hello from the example service, visit {visit}\n".encode()
                head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                await stream.send(head.encode() + body)
                say(f"http: {name}: {method} {path} -> 200")
        except CLIENT_GONE:
            pass
        finally:
            self.open_connections -= 1


def build(port: int, seconds: float | None) -> lifecycle.TaskManager:
    """The service: tasks are initialized in the order added and cleaned up in reverse."""
    manager = lifecycle.TaskManager(name="service", cleanup_timeout=10, shutdown_timeout=30)
    database = FakeDatabase()
    server = HttpServer(manager, database, port)
    manager.add_task("database", database)
    manager.add_task("http", server)

    async def report_health() -> None:
        say(f"health: ok, {database.visits} visit(s), {server.open_connections} open connection(s)")

    manager.add_execute_task("health", Repeat(report_health, interval=2.0))
    if seconds is not None:
        manager.add_execute_task("run-for", Timer(seconds), lifecycle.TaskType.STOP_GROUP)
    return manager


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8080, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--seconds", type=float, help="stop by itself after this many seconds")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    status = lifecycle.run(build(args.port, args.seconds), backend=args.backend)
    say("service: stopped cleanly" if status == 0 else f"service: stopped with errors (exit status {status})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
