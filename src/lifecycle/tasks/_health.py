"""HealthServer: a tiny HTTP server for Kubernetes probes, status and metrics (anyio TCP, no framework)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream

from .._checks import check_count, check_seconds
from .._core._background import current_background
from .._core._readiness import Health
from .._core._task import ManagerState
from .._metrics import Metrics, metrics_available
from .._redact import library_logger, redact_tree

if TYPE_CHECKING:
    from .._core._manager import TaskManager
    from ..asynctask import AsyncTasks, Backend

    _ASGIApp = Callable[
        [
            MutableMapping[str, Any],
            Callable[[], Awaitable[MutableMapping[str, Any]]],
            Callable[[MutableMapping[str, Any]], Awaitable[None]],
        ],
        Awaitable[None],
    ]

__all__ = ["HealthServer"]

logger = library_logger("lifecycle.tasks")

_MAX_REQUEST = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_PATHS = "/livez, /readyz, /status, /metrics"
_DASHBOARD = "/tasks"  # where the dashboard is served, when there is one
_MAX_BODY = 16 * 1024
_DEBUG_PATHS = _PATHS + ", /debug/stacks"


class HealthServer:
    """A :class:`~lifecycle.Task` serving a manager's health over HTTP/1.1 on ``host:port``.

    - ``GET /livez``: 200 while :meth:`TaskManager.health` says live, else 503 (a task failed for good, a
      shutdown is stuck, the manager stopped). For a liveness probe.
    - ``GET /readyz``: 200 while ready, 503 while starting, restarting a task or draining. For a readiness
      probe; with ``TaskManager(drain_delay=...)`` it answers 503 during the whole drain.
    - ``GET /status``: JSON: the manager's state, ready / live / draining, and every row of
      :meth:`TaskManager.status` (errors as ``"Type: message"``, with the passwords of any URL or DSN in
      them masked as ``***``).
    - ``GET /metrics``: Prometheus text exposition of ``metrics`` (default: a :class:`~lifecycle.Metrics`
      of ``manager``) when ``prometheus-client`` is installed (extra ``metrics``), else 404 saying so.
    - ``GET /debug/stacks`` (only with ``debug=True``): :meth:`TaskManager.stack_report` as text: each task
      stage and every task of the event loop, with where it waits (passwords of URLs and DSNs masked). For
      debugging a live service that hangs; keep it off, or on an address only operators reach, in
      production: it shows the service's code paths.
    - ``/tasks/``: the web dashboard of ``dashboard``, when given (:func:`lifecycle.asynctask.web.dashboard`).

    ``HEAD`` is answered too; other methods get 405 (the dashboard's actions are ``POST``). Every response
    closes the connection. A request must arrive within ``request_timeout`` seconds and its head fit in
    8 KiB (a dashboard action's body in 16 KiB).

    It starts listening in ``initialize`` (so a port in use fails the startup). Run by
    :meth:`TaskManager.run`, it answers from then on, while later tasks initialize (``/readyz``: 503) and
    until its ``cleanup``, through the drain: add it **first**, so it is cleaned up last. (Outside ``run()``,
    it answers once its ``execute`` runs.)

    Args:
        manager: the manager to report on (usually the one it is added to).
        host: address to listen on; ``"0.0.0.0"`` to be reachable from outside a container.
        port: TCP port; ``0`` picks a free one, readable from :attr:`port` after ``initialize``.
        metrics: what ``/metrics`` serves; ``None``: a new :class:`~lifecycle.Metrics` of ``manager`` when
            ``prometheus-client`` is installed.
        request_timeout: seconds a client has to send its request (a number or ``timedelta``).
        dashboard: serve the task dashboard at ``/tasks/`` on the same port: an ``AsyncTasks`` or a
            ``Backend`` (read-only), or the app of :func:`lifecycle.asynctask.web.dashboard` to choose its
            token. Its live updates poll, so the one-request-per-connection server is enough.
        debug: serve ``/debug/stacks`` too.

    Raises ``TypeError`` for a ``manager`` without ``health()`` and ``status()``, a ``port`` that is not an
    ``int`` or a ``request_timeout`` that is not a number (``bool`` is neither); ``ValueError`` for a port
    outside 0 to 65535 or a ``request_timeout`` that is not a finite number greater than zero.

    Example::

        manager = lifecycle.TaskManager(drain_delay=5)
        manager.add_task("health", HealthServer(manager, host="0.0.0.0", port=8081))
    """

    def __init__(
        self,
        manager: TaskManager,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metrics: Metrics | None = None,
        request_timeout: float | timedelta = 5.0,
        dashboard: AsyncTasks | Backend | _ASGIApp | None = None,
        debug: bool = False,
    ) -> None:
        if not hasattr(manager, "health") or not hasattr(manager, "status"):
            raise TypeError(f"HealthServer needs a lifecycle.TaskManager, got {type(manager).__name__}")
        if check_count(port, "HealthServer port") > 65535:
            raise ValueError(f"HealthServer port must be an int from 0 to 65535, got {port!r}")
        self._manager = manager
        self.host = host
        #: The TCP port: as given until ``initialize`` has bound it, then the bound one (useful with 0).
        self.port: int = port
        if metrics is None and metrics_available():
            metrics = Metrics(manager)
        self.metrics = metrics
        self._request_timeout = check_seconds(request_timeout, "HealthServer request_timeout")
        self._dashboard = None if dashboard is None else _dashboard_app(dashboard)
        self.debug: bool = bool(debug)
        self._paths = _DEBUG_PATHS if self.debug else _PATHS
        self._listener: Listener[SocketStream] | None = None
        self._serving: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the server (the bound port once initialized)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"<HealthServer {self.url}>"

    # ------------------------------------------------------------------ the Task protocol

    async def initialize(self) -> None:
        """Listen on ``host:port`` (``OSError`` when it cannot) and, under ``run()``, start answering."""
        listeners = (await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)).listeners
        for extra in listeners[1:]:  # a name resolving to several addresses: serve the first one only
            await extra.aclose()
        listener = self._listener = listeners[0]
        self.port = int(listener.extra(SocketAttribute.local_port))
        logger.info("health server listening on %s (%s)", self.url, self._paths)
        background = current_background()
        if background is not None:
            # Created here, entered by the background task: a cleanup that comes before that task has
            # started still stops it (a scope cancelled before it is entered cancels at once).
            self._serving = anyio.CancelScope()
            self._stopped = anyio.Event()
            background.start_soon(self._serve_in_background, self._serving, self._stopped)

    async def execute(self) -> None:
        """Answer requests until cancelled (when already answering since ``initialize``, just wait)."""
        if self._stopped is not None:
            await anyio.sleep_forever()
        await self._serve()

    async def cleanup(self) -> None:
        """Stop answering and close the listening socket."""
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        if self._stopped is not None:
            await self._stopped.wait()
            self._stopped = None
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        close = getattr(self._dashboard, "aclose", None)
        if close is not None:  # a dashboard over a bare Backend opened it
            await close()

    # ------------------------------------------------------------------ serving

    async def _serve_in_background(self, scope: anyio.CancelScope, stopped: anyio.Event) -> None:
        try:
            with scope:
                await self._serve()
        except Exception:
            logger.exception("health server %s stopped answering", self.url)
        finally:
            stopped.set()

    async def _serve(self) -> None:
        listener = self._listener
        if listener is None:
            raise RuntimeError("HealthServer.execute() called before initialize()")
        async with anyio.create_task_group() as connections:
            await listener.serve(self._handle, task_group=connections)

    async def _handle(self, stream: SocketStream) -> None:
        try:
            async with stream:
                response = None
                with anyio.move_on_after(self._request_timeout):
                    request = await _read_request(stream)
                    response = await self._respond(request, stream)
                if response is not None:
                    await stream.send(response)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            logger.exception("health server %s: a request failed", self.url)

    async def _respond(self, request: tuple[bytes, bytes] | None, stream: SocketStream) -> bytes:
        if request is None:
            return _response(400, b"malformed or too large request\n", _TEXT)
        head_bytes, body = request
        line = head_bytes.split(b"\n", 1)[0].rstrip(b"\r")
        method, _, rest = line.partition(b" ")
        target = rest.split(b" ", 1)[0].decode("latin-1")
        path = target.split("?", 1)[0]
        head = method == b"HEAD"
        if self._dashboard is not None and (path == _DASHBOARD or path.startswith(_DASHBOARD + "/")):
            return await _serve_asgi(self._dashboard, method, target, head_bytes, body, stream)
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD are supported\n", _TEXT, allow=True)
        try:
            status, body, content_type = await self._endpoint(path)
        except Exception:
            logger.exception("health server %s: %s failed", self.url, path)
            status, body, content_type = 500, b"internal error (see the service's log)\n", _TEXT
        return _response(status, body, content_type, head=head)

    async def _endpoint(self, path: str) -> tuple[int, bytes, str]:
        manager = self._manager
        if path == "/livez":
            health = manager.health()
            if health.live:
                return 200, b"ok\n", _TEXT
            failed = [t.name for t in health.tasks if not t.live]
            why = f"tasks failed: {', '.join(failed)}" if failed else f"manager is {health.state.value}"
            return 503, f"not live: {why}\n".encode(), _TEXT
        if path == "/readyz":
            health = manager.health()
            if health.ready:
                return 200, b"ready\n", _TEXT
            return 503, f"not ready: {_not_ready_reason(health)}\n".encode(), _TEXT
        if path == "/status":
            health = manager.health()
            document = health.to_dict()
            document["tasks"] = [row.to_dict() for row in manager.status()]  # the full rows, errors included
            # An error's text can quote a connection string: its passwords never reach the page.
            document = redact_tree(json.loads(json.dumps(document, default=str)))
            return 200, json.dumps(document, indent=2).encode() + b"\n", "application/json"
        if path == "/metrics":
            if self.metrics is None:
                text = "metrics need prometheus-client: pip install 'anyio-lifecycle[metrics]'\n"
                return 404, text.encode(), _TEXT
            body, content_type = await self.metrics.exposition()
            return 200, body, content_type
        if path == "/debug/stacks":
            if not self.debug:
                return 404, b"/debug/stacks is served with HealthServer(debug=True)\n", _TEXT
            report = manager.stack_report(f"stack report for {self.url}/debug/stacks")
            return 200, report.encode() + b"\n", _TEXT
        return 404, f"unknown path {path!r}; try {self._paths}\n".encode(), _TEXT


def _not_ready_reason(health: Health) -> str:
    if health.draining:
        return "draining (shutting down)"
    restarting = [t.name for t in health.tasks if t.restarting]
    if restarting:
        return f"restarting {', '.join(restarting)}"
    if health.state in (ManagerState.NEW, ManagerState.INITIALIZING, ManagerState.RUNNING):
        return f"starting ({health.state.value})"
    return str(health.state.value)


async def _read_request(stream: ByteStream) -> tuple[bytes, bytes] | None:
    """The request line and headers (up to the blank line) and the bytes received after them, or ``None``
    when malformed or too large."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > _MAX_REQUEST:
            return None
        data += await stream.receive(4096)
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if line.count(b" ") < 2:
        return None
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    end, size = (crlf, 4) if crlf != -1 and (lf == -1 or crlf < lf) else (lf, 2)
    return data[:end], data[end + size :]


def _dashboard_app(dashboard: object) -> _ASGIApp:
    """The ASGI app to serve at ``/tasks/``: ``dashboard`` itself when it is one, else a read-only dashboard
    of the ``AsyncTasks`` or ``Backend``."""
    from ..asynctask import AsyncTasks, Backend
    from ..asynctask.web import dashboard as make_dashboard

    if isinstance(dashboard, AsyncTasks | Backend):
        return make_dashboard(dashboard)
    if not callable(dashboard):
        raise TypeError(
            "HealthServer dashboard= must be an AsyncTasks, a Backend or the ASGI app of "
            f"lifecycle.asynctask.web.dashboard(), got {dashboard!r}"
        )
    return dashboard


async def _serve_asgi(
    app: _ASGIApp, method: bytes, target: str, head: bytes, body: bytes, stream: SocketStream
) -> bytes:
    """One request to the ASGI ``app`` (mounted at ``/tasks``), its whole response as bytes."""
    headers = []
    for raw in head.split(b"\n")[1:]:
        name, colon, value = raw.rstrip(b"\r").partition(b":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    length = next((value for name, value in headers if name == b"content-length"), b"0")
    if not length.isdigit() or int(length) > _MAX_BODY:
        return _response(400, b"bad or too large Content-Length\n", _TEXT)
    while len(body) < int(length):
        body += await stream.receive(4096)
    path, _, query = target.partition("?")
    client = stream.extra(SocketAttribute.remote_address, None)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.decode("latin-1"),
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": _DASHBOARD,
        "headers": headers,
        "client": client[:2] if isinstance(client, tuple) else None,
        "server": None,
    }
    received = False
    status = 500
    response_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body[: int(length)], "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, response_headers
        if message["type"] == "http.response.start":
            status, response_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    content = b"".join(chunks)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in response_headers if name.lower() != b"content-length"]
    lines += [f"Content-Length: {len(content)}".encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + content


def _response(
    status: int, body: bytes, content_type: str, *, head: bool = False, allow: bool = False
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head else body)
