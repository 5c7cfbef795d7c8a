"""The dashboard as a plain ASGI application (no framework): a handful of routes, the access checks of
``_access``, and the pages of ``_pages``."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import anyio

from ..._redact import redact
from ...asynctask import AsyncTasks, Backend, TaskState
from .._backend import is_backend, supports_flow_control
from ._access import Access, access_for
from ._data import (
    FINAL_STATES,
    Throughput,
    read_overview,
    read_task,
    read_tasks,
    read_throughput,
)
from ._html import Markup
from ._pages import Layout, error_page, not_found_page, overview_page, task_page, tasks_page

__all__ = ["ASGIApp", "Dashboard", "dashboard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application: ``await app(scope, receive, send)``."""

#: An action's JSON body may not be larger than this.
_MAX_BODY = 16 * 1024
#: The chart is read again at most this often (it reads up to thousands of records).
_CHART_TTL = 10.0
#: Every response carries these: no framing, no sniffing, no referrer, scripts and styles only from here.
_SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Send, *, head: bool = False) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            *_SECURITY_HEADERS,
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def _html(status_and_page: tuple[int, Markup]) -> _Response:
    status, page = status_and_page
    return _Response(status, page.encode("utf-8"), "text/html; charset=utf-8")


def _json(status: int, document: dict[str, Any]) -> _Response:
    return _Response(status, json.dumps(document).encode(), "application/json")


class Dashboard:
    """The ASGI application :func:`dashboard` returns (see there)."""

    def __init__(self, source: AsyncTasks | Backend, *, access: Access, title: str) -> None:
        if isinstance(source, AsyncTasks):
            self._tasks = source
            self._owned = False
        else:
            # A bare store: an enqueue-only AsyncTasks over it, opened at the first request (never creating
            # storage) and closed at the ASGI lifespan's shutdown.
            self._tasks = AsyncTasks(source, execution=False)
            self._owned = True
        self._access = access
        self._title = title
        self._opened = False
        self._opening: anyio.Lock | None = None
        self._throughput: tuple[float, Throughput] | None = None
        self._static = {name: _read_static(name) for name in _STATIC}
        self._asset_version = hashlib.sha256(b"".join(self._static.values())).hexdigest()[:12]

    @property
    def tasks(self) -> AsyncTasks:
        """The ``AsyncTasks`` the dashboard reads and acts through."""
        return self._tasks

    def __repr__(self) -> str:
        return f"<lifecycle dashboard of {self._tasks.backend!r}, {self._access.mode.value}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (``http``; ``lifespan`` closes a store the dashboard opened)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not served
            await receive()
            await send({"type": "websocket.close", "code": 1003})
            return
        method = scope["method"]
        path = _route_path(scope)
        try:
            response = await self._respond(scope, receive, method, path)
        except Exception as exc:  # one failed request never takes the app down; its page says why
            response = _html(
                error_page(
                    self._layout(scope),
                    "Error",
                    f"the request failed: {type(exc).__name__}: {redact(str(exc))}",
                    500,
                )
            )
        await response.send(send, head=method == "HEAD")

    async def aclose(self) -> None:
        """Close the store if the dashboard opened it (a ``Backend`` source); idempotent."""
        if self._owned and self._opened:
            self._opened = False
            await self._tasks.cleanup()

    # -- routing ------------------------------------------------------------------------------------------

    async def _respond(self, scope: Scope, receive: Receive, method: str, path: str) -> _Response:
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name not in self._static:
                return _Response(404, b"not found\n", "text/plain; charset=utf-8")
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            return _Response(
                200,
                self._static[name],
                _STATIC[name],
                [(b"cache-control", b"public, max-age=86400, immutable")],
            )
        if path.startswith("/api/"):
            return await self._api(scope, receive, method, path)
        if method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        layout = self._layout(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path not in ("/", "/tasks", "/task"):
            return _html(error_page(layout, "Not found", f"there is no page {path!r} here", 404))
        try:
            await self._open()
        except Exception as exc:
            return _html(error_page(layout, "Store unavailable", _store_error(exc), 503))
        try:
            return await self._page(layout, path, query)
        except Exception as exc:  # the store failed (or is not open yet): say so, keep serving
            return _html(error_page(layout, "Store unavailable", _store_error(exc), 503))

    async def _page(self, layout: Layout, path: str, query: dict[str, list[str]]) -> _Response:
        if path == "/":
            overview = await read_overview(self._tasks, await self._chart(), time.time())
            return _html(overview_page(layout, overview))
        if path == "/tasks":
            return await self._list(layout, query)
        task_id = _one(query, "id").strip()
        if not task_id or "\x00" in task_id:
            return _html(error_page(layout, "Find a task", "enter a task id in the search box", 400))
        detail = await read_task(self._tasks, task_id)
        if detail is None:
            return _html(not_found_page(layout, task_id))
        return _html(task_page(layout, detail, time.time()))

    async def _list(self, layout: Layout, query: dict[str, list[str]]) -> _Response:
        queue = _one(query, "queue") or None
        state = _one(query, "state") or None
        name = _one(query, "name").strip() or None
        offset_text = _one(query, "offset") or "0"
        if state is not None and state not in {s.value for s in TaskState}:
            return _html(error_page(layout, "Bad filter", f"unknown state {state!r}", 400))
        if not offset_text.isdigit():
            return _html(
                error_page(layout, "Bad page", f"offset must be a whole number, got {offset_text!r}", 400)
            )
        if queue is not None and "\x00" in queue:
            return _html(error_page(layout, "Bad filter", "a queue name cannot contain NUL", 400))
        stats = await self._tasks.stats()
        page = await read_tasks(
            self._tasks,
            queue=queue,
            states=None if state is None else [TaskState(state)],
            name=name,
            offset=int(offset_text),
        )
        return _html(
            tasks_page(
                layout,
                page,
                queues=stats,
                queue=queue,
                state=state,
                name=name,
                stats=None if queue is None else stats.get(queue),
            )
        )

    async def _chart(self) -> Throughput:
        now = time.monotonic()
        if self._throughput is not None and now - self._throughput[0] < _CHART_TTL:
            return self._throughput[1]
        throughput = await read_throughput(self._tasks, time.time())
        self._throughput = (now, throughput)
        return throughput

    # -- actions ------------------------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, method: str, path: str) -> _Response:
        if path not in ("/api/action", "/api/token"):
            return _json(404, {"ok": False, "message": f"there is no API {path!r}"})
        headers = _headers(scope)
        client = scope.get("client")
        refusal = self._access.check(method, headers, client[0] if client else None)
        if refusal is not None:
            return _json(refusal.status, {"ok": False, "message": refusal.message})
        body = await _read_body(receive)
        if path == "/api/token":
            return _json(200, {"ok": True, "message": "token accepted: actions unlocked"})
        try:
            request = json.loads(body) if body is not None else None
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return _json(400, {"ok": False, "message": "the body must be a JSON object of at most 16 KiB"})
        try:
            await self._open()
            status, message = await self._act(request)
        except (TypeError, ValueError) as exc:
            return _json(400, {"ok": False, "message": redact(str(exc))})
        except Exception as exc:
            return _json(503, {"ok": False, "message": _store_error(exc)})
        self._throughput = None
        return _json(status, {"ok": status == 200, "message": message})

    async def _act(self, request: dict[str, Any]) -> tuple[int, str]:
        """Do one action; returns the HTTP status and the sentence for the page."""
        action = request.get("action")
        tasks = self._tasks
        if action in ("requeue", "cancel"):
            task_id = _text(request, "task")
            info = await tasks.info(task_id)
            if info is None:
                return 404, f"there is no task {task_id!r}"
            if action == "requeue":
                if await tasks.requeue(task_id):
                    return 200, f"requeued task {task_id}: it is pending again"
                return (
                    409,
                    f"task {task_id} is {info.state.value}: only dead or cancelled tasks can be requeued",
                )
            try:
                cancelled = await tasks.cancel(task_id)
            except RuntimeError as exc:  # a running task on a store that cannot cancel one
                return 409, str(exc)
            if cancelled:
                if info.state is TaskState.ACTIVE:
                    return 200, f"asked the running task {task_id} to stop: it ends cancelled"
                return 200, f"cancelled task {task_id}"
            return (
                409,
                f"task {task_id} is {info.state.value}: only pending or running tasks can be cancelled",
            )
        if action == "requeue_dead":
            queue = _text(request, "queue")
            moved = await tasks.requeue_dead(queue)
            return 200, f"requeued {moved} dead task(s) of queue {queue!r}"
        if action == "purge_finished":
            queue = _text(request, "queue")
            state = request.get("state")
            states = list(FINAL_STATES) if state is None else [TaskState(_text(request, "state"))]
            if not all(s.is_final for s in states):
                return 400, "only finished tasks (succeeded, dead, cancelled) can be purged here"
            deleted = await tasks.purge(states, queue=queue)
            names = "/".join(s.value for s in states)
            return 200, f"deleted {deleted} {names} task(s) of queue {queue!r}"
        if action in ("pause", "resume"):
            queue = _text(request, "queue")
            if not supports_flow_control(tasks.backend):
                return 400, "this version of the store cannot pause queues"
            was_paused = queue in await tasks.paused()
            if action == "pause":
                await tasks.pause(queue)
                if was_paused:
                    return 200, f"queue {queue!r} was paused already"
                return 200, f"paused queue {queue!r}: no worker starts its tasks until it is resumed"
            await tasks.resume(queue)
            if not was_paused:
                return 200, f"queue {queue!r} was not paused"
            return 200, f"resumed queue {queue!r}: workers start its tasks again"
        return 400, f"unknown action {action!r}"

    # -- the store ----------------------------------------------------------------------------------------

    async def _open(self) -> None:
        """Open the store the dashboard owns (once); an ``AsyncTasks`` given to it is opened by its owner."""
        if not self._owned or self._opened:
            return
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if not self._opened:
                await self._tasks.initialize()
                self._opened = True

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _layout(self, scope: Scope) -> Layout:
        return Layout(
            title=self._title,
            base=str(scope.get("root_path", "")).rstrip("/"),
            mode=self._access.mode,
            backend=redact(repr(self._tasks.backend)),
            asset_version=self._asset_version,
        )


def dashboard(
    source: AsyncTasks | Backend,
    *,
    token: str | None = None,
    read_only: bool | None = None,
    title: str = "lifecycle",
) -> ASGIApp:
    """A web dashboard of the tasks in ``source``'s store, as an ASGI application.

    ``source`` is an :class:`~lifecycle.asynctask.AsyncTasks` (its encoding decodes arguments and results,
    its schedules are listed; it is opened by its owner, e.g. its ``TaskManager``) or a bare
    :class:`~lifecycle.asynctask.Backend` (opened at the first request without creating storage, closed
    at the ASGI lifespan's shutdown; decoded with JSON).

    The pages show the counts per queue and state, the tasks finished in the last hour, running tasks with
    their leases, recent failures, schedules, task lists per queue and state (newest first, paginated from
    the store's indexes, filtered by name) and each task's arguments, result, error and chain; they update
    themselves every second while the tab is visible and read without JavaScript.

    Actions (requeue, cancel, requeue all dead of a queue, purge finished) are off unless ``token`` is
    given: then each needs the token in the ``X-Lifecycle-Token`` header (the page asks for it and keeps
    it for the tab). ``read_only=True`` turns actions off even with a token; ``read_only=False`` without a
    token allows them from loopback clients only. Cross-site requests can never act. No password of a
    connection URL is ever shown; every value is HTML-escaped.

    Mount it in a Starlette or FastAPI app (``app.mount("/tasks", dashboard(tasks, token=...))``), serve it
    on its own with any ASGI server, or from ``HealthServer(..., dashboard=...)`` or
    ``lifecycle tasks --backend URL web``.

    Raises ``TypeError`` for a ``source`` that is neither, a ``token`` that is not a string, or a
    ``read_only`` that is not a bool or ``None``; ``ValueError`` for an empty token or one with spaces or
    control characters.

    Example::

        app.mount("/tasks", dashboard(tasks, token=os.environ["DASHBOARD_TOKEN"]))
    """
    if not isinstance(source, AsyncTasks) and not is_backend(source):  # flow control aside, as AsyncTasks
        raise TypeError(
            f"dashboard() needs an AsyncTasks or a Backend (e.g. SQLiteBackend('tasks.db')), got {source!r}"
        )
    if not isinstance(title, str):
        raise TypeError(f"dashboard(): title must be a str, got {type(title).__name__}")
    return Dashboard(source, access=access_for(token, read_only), title=title)


# -- helpers ------------------------------------------------------------------------------------------------


def _route_path(scope: Scope) -> str:
    """The request path below the mount point (servers and routers differ on whether ``path`` includes
    ``root_path``: both are accepted)."""
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return path or "/"


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    return headers


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` when it is larger than :data:`_MAX_BODY`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _one(query: dict[str, list[str]], key: str) -> str:
    values = query.get(key)
    return values[0] if values else ""


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ValueError(f"the action needs {key!r}: a non-empty string without NUL, got {value!r}")
    return value


def _not_allowed(allow: str) -> _Response:
    return _Response(405, b"method not allowed\n", "text/plain; charset=utf-8", [(b"allow", allow.encode())])


def _store_error(exc: BaseException) -> str:
    return f"the task store cannot be read: {type(exc).__name__}: {redact(str(exc))}"


def _read_static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()
