"""``lifecycle tasks web``: serve the web dashboard of the store (``lifecycle.asynctask.web.dashboard``) until
Ctrl-C or SIGTERM, on 127.0.0.1:8181 by default, and print its URL.

Actions (requeue, cancel, purge) need ``--token TOKEN`` or ``--token-file FILE``; without one the dashboard
is read-only (``--read-only`` also turns them off with a token). The server is hypercorn (extra ``web``).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from ..._redact import redact
from ...asynctask.web import dashboard
from ._format import CliError
from ._session import Session, with_tasks

__all__ = ["register"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_PORT = 8181


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``web``."""
    web = commands.add_parser(
        "web", help="serve the web dashboard (127.0.0.1:8181; actions need --token) until Ctrl-C"
    )
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: a free one)"
    )
    tokens = web.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token", help="the token that unlocks actions (other users can see it in ps: prefer --token-file)"
    )
    tokens.add_argument("--token-file", metavar="FILE", help="read the token from FILE (its first line)")
    web.add_argument("--read-only", action="store_true", help="no actions, even with a token")
    web.set_defaults(handler=with_tasks(_web))


async def _web(args: argparse.Namespace, session: Session) -> int:
    token = _token(args)
    try:
        app = dashboard(session.tasks, token=token, read_only=True if args.read_only else None)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc).replace("dashboard(): token", "--token")) from None
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be from 0 to 65535, got {args.port}")
    with _listening(args.host, args.port) as listener:
        port = listener.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{port}/"
        if token is None or args.read_only:
            mode = "read-only" + ("" if args.read_only else ": pass --token or --token-file to allow actions")
        else:
            mode = "actions need the token"
        backend = redact(repr(session.tasks.backend), *([args.backend] if args.backend else []))
        session.console.print(f"dashboard of {backend} at {url} ({mode}); Ctrl-C to stop", soft_wrap=True)
        if not _is_loopback(args.host):
            session.console.print(
                f"note: listening on {args.host}: whoever reaches this address can read the task store; "
                "put it behind a reverse proxy with TLS and authentication (docs/dashboard.md)",
                soft_wrap=True,
            )
        served = app if not _is_loopback(args.host) else _LoopbackHosts(app)
        await _serve(served, listener)
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return args.token  # type: ignore[no-any-return]
    try:
        lines = Path(args.token_file).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read --token-file {args.token_file!r}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise CliError(f"--token-file {args.token_file!r} is empty: put the token on its first line")
    return token


@contextmanager
def _listening(host: str, port: int) -> Iterator[socket.socket]:
    """A listening TCP socket on ``host:port`` (bound here, so a port in use is one clear error)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another --port?)") from None
    try:
        yield listener
    finally:
        listener.close()


async def _serve(app: ASGIApp, listener: socket.socket) -> None:
    """Serve ``app`` on ``listener`` with hypercorn until SIGINT or SIGTERM."""
    try:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config
    except ModuleNotFoundError as exc:
        raise CliError(
            f"the web command needs the ASGI server hypercorn ({exc.name!r} is not installed): "
            'pip install "anyio-lifecycle[web]"'
        ) from None
    config = Config()
    config.bind = [f"fd://{listener.fileno()}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 2.0
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    stop.set()
                    return

            group.start_soon(stop_on_signal)
            # hypercorn wraps the fd in a socket object of its own and closes it: ours must not close it too.
            listener.detach()
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
            group.cancel_scope.cancel()


class _LoopbackHosts:
    """Answer only requests addressed to a loopback name (``Host: localhost:8181``, ``127.0.0.1``,
    ``[::1]``): a page of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding) gets a
    421 instead of the task store."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if not _is_loopback_host(host):
                body = b"this dashboard answers requests for localhost only\n"
                start: Message = {
                    "type": "http.response.start",
                    "status": 421,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        await self._app(scope, receive, send)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_host(header: str) -> bool:
    name = header.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return _is_loopback(name)
