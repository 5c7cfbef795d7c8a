"""ASGIServer: serve an ASGI application (FastAPI, Starlette, Quart...) with hypercorn or uvicorn as a Task.

The server runs inside the manager's event loop: ``initialize`` binds the listening socket, ``execute``
serves, and the shutdown is the manager's (signals, readiness, the drain), never the server's own. What each
server needs to fit is kept here:

- its signal handling is off: hypercorn gets a ``shutdown_trigger``, uvicorn's ``capture_signals()`` (and, in
  older releases, ``install_signal_handlers()``) does nothing;
- the socket is bound by us in ``initialize`` and handed over, so a port in use fails the startup;
- ``grace`` is enforced by us too: every HTTP and WebSocket call of the application runs under a cancel scope
  of this task, cancelled when ``grace`` is over. hypercorn's own ``graceful_timeout`` is not kept on Python
  3.12+ (``asyncio.Server.wait_closed()`` waits for every connection: pgjones/hypercorn#308), so without this
  one slow request would hold the shutdown forever.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import timedelta
from typing import Any, Literal

import anyio

from .._checks import check_count, check_name, check_seconds
from .._extras import raise_missing_extra
from .._redact import library_logger

__all__ = ["ASGIServer"]

logger = library_logger("lifecycle.tasks")

_SERVERS = ("hypercorn", "uvicorn")
# The server's own graceful timeout is a backstop behind ours: ours cancels the calls in flight when grace is
# over and the server then closes their connections; the server's would cut them off without a response.
_BACKSTOP = 5.0
_EXTRAS = {"hypercorn": "asgi", "uvicorn": "uvicorn"}
# Options the task owns: each has an argument of ASGIServer's own.
_OWNED = {
    "hypercorn": {
        "bind": "host= and port=",
        "insecure_bind": "host= and port=",
        "graceful_timeout": "grace=",
    },
    "uvicorn": {
        "host": "host=",
        "port": "port=",
        "uds": "host= and port=",
        "fd": "host= and port=",
        "timeout_graceful_shutdown": "grace=",
        "reload": "a process manager (the manager runs in this process)",
        "workers": "several processes (the manager runs in this process)",
    },
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _current_async_library() -> str:
    try:
        import sniffio
    except ImportError:  # pragma: no cover - trio depends on sniffio, so without it only asyncio runs
        return "asyncio"
    return str(sniffio.current_async_library())


class _InFlight:
    """The application, with each HTTP and WebSocket call under a cancel scope: what the end of ``grace``
    cancels. Lifespan calls pass through untouched (the server ends them itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.scopes: set[anyio.CancelScope] = set()
        self.closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "lifespan":
            await self.app(scope, receive, send)
            return
        with anyio.CancelScope() as cancel:
            if self.closing:
                cancel.cancel()
            self.scopes.add(cancel)
            try:
                await self.app(scope, receive, send)
            finally:
                self.scopes.discard(cancel)

    def cancel_all(self) -> int:
        """Cancel every call in progress, and every call that starts from now on; how many were running."""
        self.closing = True
        running = list(self.scopes)
        for scope in running:
            scope.cancel()
        return len(running)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, as the servers make theirs (non-blocking, address reuse, no
    Nagle delay), closed again when binding fails (hypercorn's own ``create_sockets()`` leaks it then)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)  # hypercorn's trio worker expects listening sockets; asyncio's listens again
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Hypercorn:
    """hypercorn: its ``worker_serve`` for asyncio or trio, on the socket bound by :func:`_listen`."""

    name = "hypercorn"

    def __init__(self, options: dict[str, Any], grace: float) -> None:
        try:
            from hypercorn.config import Config
        except ModuleNotFoundError as exc:
            raise_missing_extra(exc, "ASGIServer(server='hypercorn')", "asgi", ("hypercorn",))
        config = Config()
        for key, value in options.items():
            if key.startswith("_") or not hasattr(Config, key):
                raise TypeError(
                    f"ASGIServer(server='hypercorn'): unknown hypercorn option {key}={value!r}; the options "
                    "are the attributes of hypercorn.config.Config (e.g. keep_alive_timeout=5, certfile=...)"
                )
            setattr(config, key, value)
        if "errorlog" not in options:
            # Through logging like the rest of the service (hypercorn's default writes to stderr itself).
            config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = grace + _BACKSTOP
        self.config = config
        self.scheme = "https" if config.ssl_enabled else "http"
        self._sockets: Any = None

    def bind(self, host: str, port: int) -> list[socket.socket]:
        from hypercorn.config import Sockets

        sock = _listen(host, port, self.config.backlog)
        secure = self.config.ssl_enabled
        self._sockets = Sockets([sock] if secure else [], [] if secure else [sock], [])
        return [sock]

    async def serve(self, app: ASGIApp, stop: anyio.Event) -> None:
        from hypercorn.utils import wrap_app

        if _current_async_library() == "trio":
            from hypercorn.trio.run import worker_serve
        else:
            from hypercorn.asyncio.run import worker_serve  # type: ignore[assignment]
        wrapped = wrap_app(app, self.config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        await worker_serve(wrapped, self.config, sockets=self._sockets, shutdown_trigger=stop.wait)


class _Uvicorn:
    """uvicorn (asyncio only): a ``uvicorn.Server`` started on our socket, stopped through ``should_exit``."""

    name = "uvicorn"

    def __init__(self, app: ASGIApp, options: dict[str, Any], grace: float) -> None:
        try:
            import uvicorn
        except ModuleNotFoundError as exc:
            raise_missing_extra(exc, "ASGIServer(server='uvicorn')", "uvicorn", ("uvicorn",))
        options.setdefault("log_config", None)  # through logging like the rest of the service
        try:
            self.config = uvicorn.Config(
                app, timeout_graceful_shutdown=math.ceil(grace + _BACKSTOP), **options
            )
        except TypeError as exc:
            raise TypeError(
                f"ASGIServer(server='uvicorn'): {exc}; the options are the arguments of uvicorn.Config "
                "(e.g. timeout_keep_alive=5, ssl_certfile=...)"
            ) from None
        self.scheme = "https" if self.config.is_ssl else "http"
        self._server_class = _quiet_uvicorn_server(uvicorn.Server)
        self._sockets: list[socket.socket] = []

    def bind(self, host: str, port: int) -> list[socket.socket]:
        self._sockets = [_listen(host, port, self.config.backlog)]
        return self._sockets

    async def serve(self, app: ASGIApp, stop: anyio.Event) -> None:
        server = self._server_class(self.config)

        async def trigger() -> None:
            await stop.wait()
            server.should_exit = True

        async with anyio.create_task_group() as group:
            group.start_soon(trigger)
            try:
                await server.serve(sockets=self._sockets)
            except SystemExit as exc:  # uvicorn exits the process when the app's lifespan startup fails
                raise RuntimeError(
                    f"uvicorn stopped with exit status {exc.code}: the application's lifespan startup failed "
                    "(its error is in the log above)"
                ) from None
            finally:
                group.cancel_scope.cancel()


def _quiet_uvicorn_server(base: type[Any]) -> type[Any]:
    """``uvicorn.Server`` without its signal handlers: the manager owns the signals."""
    import contextlib
    from collections.abc import Iterator

    class QuietServer(base):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
            yield

        def install_signal_handlers(self) -> None:  # older uvicorn
            pass

    return QuietServer


class ASGIServer:
    """A :class:`~lifecycle.Task` serving an ASGI application (FastAPI, Starlette...) on ``host:port``.

    - ``initialize`` binds and listens (an ``OSError`` naming the address when the port is taken, so later
      tasks never start); after it, :attr:`port` is the bound port (useful with ``port=0``).
    - ``execute`` serves; the application's lifespan startup runs first, its lifespan shutdown last.
    - On shutdown the manager turns readiness false first and, with ``TaskManager(drain_delay=...)``, the
      server goes on serving during the drain (load balancers stop sending traffic meanwhile). Then
      ``execute`` is cancelled: the server stops accepting connections (new ones are refused), closes idle
      keep-alive connections, and gives the requests in flight ``grace`` seconds to finish; past it they are
      cancelled (a client waiting for a response gets a 500 or a closed connection) and every connection is
      closed. ``execute`` returns once the server is down.

    The server never installs signal handlers: SIGINT / SIGTERM are the manager's (:func:`lifecycle.run`).
    Its log goes through :mod:`logging` (``hypercorn.error``, ``uvicorn.error``) like the rest of the service.

    Args:
        app: the ASGI application.
        host: address to listen on; ``"0.0.0.0"`` (or ``"::"``) to be reachable from outside a container.
        port: TCP port; ``0`` picks a free one.
        server: ``"hypercorn"`` (asyncio and trio; extra ``asgi``) or ``"uvicorn"`` (asyncio only; extra
            ``uvicorn``).
        grace: seconds the requests in flight get to finish once the server stops accepting (``0``: cancel
            them at once).
        server_options: passed to the server's configuration: the attributes of ``hypercorn.config.Config``
            (``keep_alive_timeout=5``, ``certfile=...``) or the arguments of ``uvicorn.Config``
            (``timeout_keep_alive=5``, ``proxy_headers=True``...). The address, the port and the graceful
            timeout are this task's own arguments.

    Raises ``ValueError`` for an unknown ``server``, a port outside 0 to 65535, a negative or infinite
    ``grace``, or a server option that one of the arguments above sets; ``TypeError`` for an ``app`` that
    is not callable or an option the server does not know; ``ImportError`` with the ``pip install`` command
    when the server's extra is not installed. ``initialize`` raises ``RuntimeError`` for ``server="uvicorn"``
    under trio, ``OSError`` when the address cannot be bound.

    Example::

        app = FastAPI()
        manager = lifecycle.TaskManager(drain_delay=5, shutdown_timeout=30)
        manager.add_task("http", ASGIServer(app, host="0.0.0.0", port=8000, grace=10))
        raise SystemExit(lifecycle.run(manager))
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        server: Literal["hypercorn", "uvicorn"] = "hypercorn",
        grace: float | timedelta = 10.0,
        **server_options: Any,
    ) -> None:
        if server not in _SERVERS:
            raise ValueError(f"ASGIServer(server={server!r}): unknown server; use 'hypercorn' or 'uvicorn'")
        if not callable(app):
            raise TypeError(f"ASGIServer needs an ASGI application (a callable), got {app!r}")
        self.host: str = check_name(host, "ASGIServer host")
        if check_count(port, "ASGIServer port") > 65535:
            raise ValueError(f"ASGIServer port must be an int from 0 to 65535, got {port!r}")
        #: The TCP port: as given until ``initialize`` has bound it, then the bound one (useful with 0).
        self.port: int = port
        self._requested_port = port
        self.grace: float = check_seconds(grace, "ASGIServer grace", allow_zero=True)
        for key in server_options:
            owner = _OWNED[server].get(key)
            if owner is not None:
                raise ValueError(
                    f"ASGIServer(server={server!r}): the option {key!r} is set by ASGIServer's {owner}, not "
                    "through the server's options"
                )
        self.server: Literal["hypercorn", "uvicorn"] = server
        self.app = app
        self._in_flight = _InFlight(app)
        self._engine: _Hypercorn | _Uvicorn = (
            _Hypercorn(dict(server_options), self.grace)
            if server == "hypercorn"
            else _Uvicorn(self._in_flight, dict(server_options), self.grace)
        )
        self._sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        """``http://host:port`` of the server (``https`` with TLS options; bound port once initialized)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self._engine.scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"<ASGIServer {self.server} {self.url}>"

    # ------------------------------------------------------------------ the Task protocol

    async def initialize(self) -> None:
        """Bind and listen on ``host:port``; ``OSError`` when the address cannot be bound (port in use)."""
        if self.server == "uvicorn" and _current_async_library() != "asyncio":
            raise RuntimeError(
                f"ASGIServer(server='uvicorn') runs on asyncio only, and this service runs on "
                f"{_current_async_library()}: use server='hypercorn' (asyncio and trio), or run the manager "
                "on asyncio (lifecycle.run(manager, backend='asyncio'))"
            )
        try:
            self._sockets = self._engine.bind(self.host, self._requested_port)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"ASGIServer could not listen on {self.host}:{self._requested_port}: {exc.strerror or exc} "
                "(is another process using the port? port=0 picks a free one)",
            ) from exc
        self.port = int(self._sockets[0].getsockname()[1])
        logger.info("ASGI server (%s) listening on %s", self.server, self.url)

    async def execute(self) -> None:
        """Serve until cancelled; then stop accepting, give the requests in flight ``grace`` seconds, close
        every connection and return (re-raising the cancellation). Raises what the server raises (the
        application's lifespan startup failing, for one)."""
        if not self._sockets:
            raise RuntimeError("ASGIServer.execute() called before initialize()")
        self._in_flight.closing = False
        stop = anyio.Event()
        ended = anyio.Event()
        failures: list[Exception] = []
        async with anyio.create_task_group() as group:
            group.start_soon(self._serve, stop, ended, failures)
            group.start_soon(self._end_of_grace, stop, ended)
            try:
                await ended.wait()  # the server ended on its own: an error, or its own max_requests
            finally:
                stop.set()  # shutdown: the shielded _serve stops the server gracefully; we wait for it
        if failures:
            raise failures[0]

    async def cleanup(self) -> None:
        """Close the listening socket (already closed when ``execute`` ran)."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    # ------------------------------------------------------------------ serving

    async def _serve(self, stop: anyio.Event, ended: anyio.Event, failures: list[Exception]) -> None:
        # Shielded: the cancellation of execute() is the signal to stop, not a way to abandon the server. No
        # cancel scope of ours is cancelled in this task: the servers run asyncio code of their own here.
        with anyio.CancelScope(shield=True):
            try:
                await self._engine.serve(self._in_flight, stop)
            except Exception as exc:
                failures.append(exc)
            finally:
                ended.set()
            if stop.is_set():
                logger.info("ASGI server %s stopped", self.url)

    async def _end_of_grace(self, stop: anyio.Event, ended: anyio.Event) -> None:
        with anyio.CancelScope(shield=True):
            await stop.wait()
            if ended.is_set():
                return
            logger.info(
                "ASGI server %s: no new connections; %d request(s) in flight get up to %g s to finish",
                self.url,
                len(self._in_flight.scopes),
                self.grace,
            )
            with anyio.move_on_after(self.grace):
                await ended.wait()
                return
            cancelled = self._in_flight.cancel_all()
            if cancelled:
                logger.warning(
                    "ASGI server %s: the grace of %g s is over: cancelled %d request(s) still in flight",
                    self.url,
                    self.grace,
                    cancelled,
                )
