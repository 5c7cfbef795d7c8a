"""Connections for the Redis backend: URL checks, the clients (standalone or Redis Cluster), and scripts run
with reconnects.

Script calls are retried after a dropped connection or a server restart until ``reconnect_timeout`` has
passed. That is safe because every script is idempotent under a retry with the same arguments: enqueue and
admin calls carry a call id the records remember, claims log what they leased, and a settlement repeated with
the same token and verdict counts as applied. A script the server forgot (``NOSCRIPT`` after a restart) is
loaded again.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, NoScriptError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...._redact import library_logger, redact
from ..._errors import BackendError
from .._url_parts import join_url, split_url, unique_options
from ._lua import WORKER_SCRIPTS, LuaScript
from ._lua_admin import ADMIN_SCRIPTS
from ._lua_claim import CLAIM_SCRIPTS

__all__ = [
    "ready_for_reuse",
    "RETRYABLE",
    "SCRIPTS",
    "ScriptRunner",
    "check_url",
    "close_clients",
    "make_client",
    "safe_url",
    "take_url_options",
    "unread_check",
    "unusable",
]

_log = library_logger("lifecycle.asynctask.redis")

RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
)
"""Errors after which a call is repeated: a lost connection (redis-py's BusyLoadingError, raised while a
restarted server loads its data, is a ConnectionError), no reply within ``socket_timeout``, or a server that
refused the command without running it during a failover (cluster down, try again, read-only replica)."""

_FORBIDDEN_OPTIONS = ("decode_responses", "encoding", "protocol")

SCRIPTS: dict[str, LuaScript] = {**WORKER_SCRIPTS, **CLAIM_SCRIPTS, **ADMIN_SCRIPTS}
"""Every script of the backend, by name."""

_KEEP = 4
"""The most connections a :class:`ScriptRunner` keeps leased from its client's pool between calls."""

_RECHECK = 0.05
"""Seconds after which the runner's alarm looks again at a late call whose connection had no socket yet."""


def safe_url(url: str) -> str:
    """The URL with its passwords replaced by ``***`` (user information and ``password=`` options), for
    messages, logs and ``repr``: :func:`lifecycle._redact.redact`."""
    return redact(url, url)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def take_url_options(url: str) -> tuple[str, bool | None, float | None]:
    """Take the options the backend handles itself out of ``url``: ``cluster`` (not redis-py's) and
    ``socket_timeout`` (applied per call by the backend, see :func:`make_client`). Returns the rest of the
    URL and the two values (``None`` when absent)."""
    if not isinstance(url, str):
        raise TypeError(f"RedisBackend(url) takes a URL string, got {type(url).__name__}")
    parts = split_url(url, caller="RedisBackend")
    unique_options(url, caller="RedisBackend")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    found = {name: [value for key, value in pairs if key == name] for name in ("cluster", "socket_timeout")}
    cluster: bool | None = None
    if found["cluster"]:
        value = found["cluster"][0].lower()
        if len(found["cluster"]) > 1 or value not in _TRUE + _FALSE:
            raise ValueError(
                f"RedisBackend: give the URL option cluster once, as cluster=true or cluster=false, in "
                f"{safe_url(url)!r}"
            )
        cluster = value in _TRUE
    timeout: float | None = None
    if found["socket_timeout"]:
        try:
            timeout = float(found["socket_timeout"][-1])
        except ValueError:
            raise ValueError(
                "RedisBackend: the URL option socket_timeout must be a number of seconds, in "
                f"{safe_url(url)!r}"
            ) from None
    if cluster is None and timeout is None:
        return url, None, None
    kept = [(key, value) for key, value in pairs if key not in found]
    return join_url(parts._replace(query=urlencode(kept))), cluster, timeout


_URL_FORMS = (
    '"redis://[[user]:password@]host[:port][/db]", "rediss://..." for TLS, or "unix:///path.sock?db=0"'
)


def check_url(url: str, *, cluster: bool = False) -> None:
    """Raise ``ValueError`` naming the problem when redis-py cannot use ``url`` for this backend: a part it
    cannot parse, a database that is not a number (redis-py would silently use 0), an option given twice or
    unknown to redis-py (``cluster=True`` takes other options: they are not checked)."""
    if not isinstance(url, str):
        raise TypeError(f"RedisBackend(url) takes a URL string, got {type(url).__name__}")
    shown = safe_url(url)
    parts = split_url(url, caller="RedisBackend")
    try:
        options = parse_url(url)
    except ValueError as exc:
        raise ValueError(
            f"RedisBackend: bad Redis URL {shown!r}: {redact(str(exc), url)}; use {_URL_FORMS}"
        ) from None
    scheme = parts.scheme.lower()
    database = unquote(parts.path).strip("/")
    if scheme != "unix" and database and not (database.isdigit() and database.isascii()):
        raise ValueError(
            f"RedisBackend: the database in {shown!r} must be a number, got {database!r}; write it as "
            "redis://host:6379/0 (databases are numbered 0 to 15 by default), or leave it out for 0"
        )
    given = unique_options(url, caller="RedisBackend")
    for name in _FORBIDDEN_OPTIONS:
        if name in options:
            raise ValueError(
                f"RedisBackend: the URL option {name!r} is not supported (payloads and results are raw "
                f"bytes over RESP2); remove it from {shown!r}"
            )
    if cluster:
        return
    known = _known_options(scheme)
    unknown = sorted(name for name in given if name not in known)
    if unknown:
        raise ValueError(
            f"RedisBackend: unknown URL option {redact(unknown[0])!r} in {shown!r}; a {scheme}:// URL takes "
            "the keyword arguments of redis-py's connection as options (db, password, socket_timeout, "
            "socket_connect_timeout, health_check_interval, client_name, and ssl_ca_certs, ssl_cert_reqs, "
            "... for rediss://), plus cluster=true and, in backend_from_url, prefix=NAME"
        )


_CONNECTION_CLASSES: dict[str, type[AbstractConnection]] = {
    "redis": Connection,
    "rediss": SSLConnection,
    "unix": UnixDomainSocketConnection,
}


def _known_options(scheme: str) -> set[str]:
    """The URL options redis-py turns into keyword arguments the scheme's connection class accepts."""
    known = set(URL_QUERY_ARGUMENT_PARSERS) | {"cluster", "prefix"}
    for cls in _CONNECTION_CLASSES.get(scheme, Connection).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind is parameter.KEYWORD_ONLY or parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                known.add(parameter.name)
    known.discard("self")
    return known


def make_client(
    url: str,
    *,
    connect_timeout: float,
    max_connections: int | None,
    options: Mapping[str, Any],
    cluster: bool = False,
) -> Any:
    """A redis-py asyncio client with its own pool (a ``RedisCluster`` with ``cluster=True``). Retries are
    ours (see :class:`ScriptRunner`), so redis-py's own are switched off.

    redis-py's ``socket_timeout`` stays off: on Python < 3.12 it wraps every send in ``asyncio.wait_for``,
    which can swallow a cancellation that arrives as the send completes (the cancelled task then runs on).
    Reply timeouts are the :class:`ScriptRunner`'s instead: its alarm, or an anyio cancel scope around the
    call."""
    kwargs: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "lifecycle-asynctask",
        **options,
        "decode_responses": False,
    }
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if cluster:
        # RedisCluster follows MOVED/ASK redirections and re-reads the slot map itself (its own retries);
        # ours still cover the rest. Connections are per node, made as needed.
        del kwargs["retry"]
        kwargs.setdefault("max_connections", 1000)
        client = RedisCluster.from_url(url, **kwargs)
        shared = getattr(client.nodes_manager, "connection_kwargs", None)
        if isinstance(shared, dict) and isinstance(shared.get("connection_class"), type):
            shared["connection_class"] = _with_fast_packing(shared["connection_class"])
        return client
    if max_connections is not None:
        # Callers beyond max_connections wait for a free connection (bounded by each call's timeout).
        pool: aioredis.ConnectionPool = aioredis.BlockingConnectionPool.from_url(url, timeout=None, **kwargs)
    else:
        pool = aioredis.ConnectionPool.from_url(url, **kwargs)
    pool.connection_class = _with_fast_packing(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


async def close_clients(*clients: Any) -> None:
    """Close each client made by :func:`make_client` and disconnect its pool, shielded from cancellation."""
    for client in clients:
        with anyio.CancelScope(shield=True):
            await client.aclose()
            if hasattr(client, "connection_pool"):
                await client.connection_pool.disconnect()


def _with_fast_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` packing commands with hiredis (C) when it is installed: redis-py's asyncio connection packs in
    Python, which costs more than the rest of a large batch's round trip."""
    try:
        from hiredis import pack_command
    except ImportError:
        return base

    def pack(self: AbstractConnection, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD" and the like: separate words
            args = (*args[0].split(), *args[1:])
        try:
            return [pack_command(args)]
        except TypeError:  # a value hiredis does not take: let redis-py encode it, or explain the error
            return base.pack_command(self, *args)

    return type(f"FastPacking{base.__name__}", (base,), {"pack_command": pack})


def unread_check(
    connection_class: type[AbstractConnection],
) -> Callable[[AbstractConnection], Awaitable[bool]]:
    """The check ``ConnectionPool.ensure_connection`` makes of a connection it hands out (data unread, or the
    socket closed by the server), for ``connection_class``: ``can_read`` where it exists (redis-py 8, whose
    ``ensure_connection`` calls it), else ``can_read_destructive`` (redis-py 5 to 7 have only that one, and
    their ``ensure_connection`` calls it)."""
    check = getattr(connection_class, "can_read", None)
    if check is None:
        check = connection_class.can_read_destructive
    return cast("Callable[[AbstractConnection], Awaitable[bool]]", check)


async def ready_for_reuse(
    pool: aioredis.ConnectionPool,
    connection: AbstractConnection,
    has_unread: Callable[[AbstractConnection], Awaitable[bool]] | None,
) -> None:
    """Make a connection kept leased from ``pool`` ready for its next command: what
    ``pool.ensure_connection`` checks (connected, nothing unread, not closed by the server), asked directly
    with ``has_unread`` (see :func:`unread_check`), since its ``connect()`` of a connection already open goes
    through redis-py's retry helper, which costs more than the check. Anything else (a dropped connection,
    unread data, an error) is left to ``ensure_connection``, which reconnects. A connection found with data
    unread or closed is dropped first: redis-py 8.1's ``ensure_connection`` hands one with unread data back
    as it is when the pool has maintenance notifications on. The caller gives the connection back to the
    pool if this raises."""
    clean = False
    if connection.is_connected and has_unread is not None:
        try:
            clean = not await has_unread(connection)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass  # closed by the server: reconnected below
        if not clean:
            await connection.disconnect()
    if not clean:
        await pool.ensure_connection(connection)


class ScriptRunner:
    """Runs the backend's Lua scripts on one client: EVALSHA, reload on NOSCRIPT, retry on a lost
    connection until ``reconnect_timeout`` seconds have passed (then the redis-py error propagates).

    On a standalone client, script calls go straight to a connection the runner keeps leased from the
    client's pool (at most ``_KEEP`` of them, and never more than half the pool), instead of through
    ``Redis.execute_command``: that path takes two pool locks and runs redis-py's metrics hooks on every
    call, which cost more client CPU than the rest of a single enqueue. The connection is checked as the pool
    checks it before each use (connected, nothing unread, not closed by the server), and redis-py's
    connection drops itself on any error or cancellation while a command is sent or its reply read, so a
    kept connection never holds half a reply. A Redis Cluster client goes through ``evalsha`` as before.

    The reply timeout (``socket_timeout``) of a call on a kept connection is the runner's alarm: one timer
    for all its calls, which aborts the connection of a call still unanswered at its deadline (the call then
    raises :class:`TimeoutError`), instead of a cancel scope with a timer of its own per call. The first
    attempt of :meth:`run` takes that path when a kept connection is free; the other calls (no free kept
    connection, a cluster, the repeats after a lost connection) run under a cancel scope (:meth:`once`).
    """

    def __init__(
        self, client: aioredis.Redis, *, prefix: str, socket_timeout: float, reconnect_timeout: float
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._anchor = f"{prefix}seq"
        self._socket_timeout = socket_timeout
        self._reconnect_timeout = reconnect_timeout
        pool = getattr(client, "connection_pool", None)
        direct = (
            isinstance(client, aioredis.Redis)
            and isinstance(pool, aioredis.ConnectionPool)
            and not client.single_connection_client
        )
        self._pool: aioredis.ConnectionPool | None = pool if direct else None
        # Decided once for the pool's connection class, not looked up per call.
        self._has_unread = unread_check(self._pool.connection_class) if self._pool is not None else None
        limit = getattr(pool, "max_connections", _KEEP)
        # Half the pool at most: the client's other callers (and calls beyond the kept ones) share the rest.
        self._keep = max(1, min(_KEEP, limit // 2)) if isinstance(limit, int) else 1
        self._idle: list[AbstractConnection] = []
        # The calls on kept connections awaiting their reply, each with the loop time of its deadline; the
        # alarm fires at the earliest of them (see _expire). Empty when socket_timeout is infinite.
        self._deadlines: dict[AbstractConnection, float] = {}
        self._late: set[AbstractConnection] = set()
        self._alarm: asyncio.TimerHandle | None = None
        self._alarmed = self._pool is not None and math.isfinite(socket_timeout)

    async def load_all(self) -> None:
        """Load every script into the server's script cache (also proves the server runs Lua)."""
        for script in SCRIPTS.values():
            await self.client.script_load(script.source)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: str | bytes | int) -> Any:
        """``EVALSHA sha numkeys *keys_and_args`` once, on a kept connection (see the class docstring) or,
        for a cluster, through the client. On a kept connection, a reply not read within ``socket_timeout``
        raises :class:`TimeoutError` (the connection is aborted and reconnects at its next use)."""
        pool = self._pool
        if pool is None:
            return await self.client.evalsha(sha, numkeys, *keys_and_args)
        idle = self._idle
        deadlines = self._deadlines
        if idle:
            connection = idle.pop()
            if self._alarmed:
                self._arm(connection)
            try:
                await ready_for_reuse(pool, connection, self._has_unread)
            except BaseException:
                deadlines.pop(connection, None)
                self._late.discard(connection)
                await pool.release(connection)
                raise
        else:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            if self._alarmed:
                self._arm(connection)
        try:
            # send_command() without its extra coroutine and its health check (a no-op without
            # health_check_interval, which the pool's connections run when set).
            packed = connection.pack_command("EVALSHA", sha, numkeys, *keys_and_args)
            await connection.send_packed_command(packed, check_health=bool(connection.health_check_interval))
            return await connection.read_response()
        except RETRYABLE:
            if connection in self._late:  # aborted by the alarm: the server did not answer in time
                raise TimeoutError(f"no reply from Redis within {self._socket_timeout} s") from None
            raise
        finally:
            deadlines.pop(connection, None)
            self._late.discard(connection)
            # Clean (the whole reply was read) or disconnected by redis-py (reconnected at its next use).
            if len(idle) < self._keep:
                idle.append(connection)
            else:
                await pool.release(connection)

    def _arm(self, connection: AbstractConnection) -> None:
        """Give the call about to run on ``connection`` its reply deadline, and set the alarm if none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._socket_timeout
        self._deadlines[connection] = deadline
        if self._alarm is None:
            self._alarm = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """The alarm: abort the connection of every call past its deadline (its read or send then fails, and
        :meth:`evalsha` raises ``TimeoutError``), and set the alarm again for the earliest deadline left."""
        self._alarm = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = math.inf
        for connection, deadline in list(self._deadlines.items()):
            if deadline > now:
                earliest = min(earliest, deadline)
                continue
            self._late.add(connection)
            writer = getattr(connection, "_writer", None)
            if writer is None:  # still opening its socket: abort it as soon as it has one
                self._deadlines[connection] = now + _RECHECK
                earliest = min(earliest, now + _RECHECK)
                continue
            del self._deadlines[connection]
            writer.transport.abort()
        if earliest < math.inf:
            self._alarm = loop.call_at(earliest, self._expire)

    async def run(
        self,
        name: str,
        args: Sequence[str | bytes | int],
        *,
        retry_as: tuple[str, Sequence[str | bytes | int] | Callable[[], Sequence[str | bytes | int]]]
        | None = None,
    ) -> Any:
        """Run script ``name`` with ``ARGV = [prefix, *args]`` and return its reply. With ``retry_as``, a
        repeat of the call after a lost connection (when the first attempt may have run) runs that script
        with those arguments (or with what the callable returns, called only then) instead."""
        script = SCRIPTS[name]
        keys_and_args = (self._anchor, self.prefix, *args)
        # The first attempt inline (the call that almost always succeeds), the repeats in retrying().
        failed: BaseException
        if self._alarmed and self._idle:
            # A kept connection is free: evalsha takes it, under the alarm's reply timeout. What _script()
            # does, without its coroutine.
            try:
                try:
                    return await self.evalsha(script.sha, 1, *keys_and_args)
                except NoScriptError:
                    return await self._reload(script, keys_and_args)
            except RETRYABLE as exc:
                failed = exc
        else:
            scope = anyio.CancelScope(deadline=anyio.current_time() + self._socket_timeout)
            try:
                with scope:
                    return await self._script(script, keys_and_args)
            except RETRYABLE as exc:
                failed = exc
            else:
                # Reached only when the scope caught a cancellation: its own deadline's.
                if not (scope.cancelled_caught and anyio.current_time() >= scope.deadline):
                    return None
                failed = TimeoutError()
        if retry_as is not None:
            script = SCRIPTS[retry_as[0]]
            repeat = retry_as[1]
            keys_and_args = (self._anchor, self.prefix, *(repeat() if callable(repeat) else repeat))
        return await self.retrying(lambda: self._script(script, keys_and_args), name, failed=failed)

    async def load(self, name: str) -> None:
        """Load script ``name`` into the server's script cache (after the server said it lacks it)."""
        source = SCRIPTS[name].source
        await self.once(lambda: self.client.script_load(source))

    def command(self, name: str, args: Sequence[str | bytes | int]) -> tuple[str | bytes | int, ...]:
        """The ``EVALSHA`` command that :meth:`run` sends for script ``name`` with ``args``, for a caller that
        writes it on a connection of its own (behind another command)."""
        return ("EVALSHA", SCRIPTS[name].sha, 1, self._anchor, self.prefix, *args)

    async def _script(self, script: LuaScript, keys_and_args: tuple[str | bytes | int, ...]) -> Any:
        try:
            return await self.evalsha(script.sha, 1, *keys_and_args)
        except NoScriptError:
            return await self._reload(script, keys_and_args)

    async def _reload(self, script: LuaScript, keys_and_args: tuple[str | bytes | int, ...]) -> Any:
        """The server restarted or SCRIPT FLUSH ran, so the script did not run: load it, run it. Under a
        cancel scope of its own each: the call may have taken the alarm's path (see :meth:`run`)."""
        await self.once(lambda: self.client.script_load(script.source))
        return await self.once(lambda: self.evalsha(script.sha, 1, *keys_and_args))

    async def retrying(
        self, call: Callable[[], Awaitable[Any]], what: str, *, failed: BaseException | None = None
    ) -> Any:
        """Await ``call()``, repeated after a lost connection until ``reconnect_timeout`` has passed.
        ``failed``: the error of a first attempt already made (the next one follows after the usual pause)."""
        deadline = math.inf
        delay = 0.02
        while True:
            if failed is None:
                try:
                    result = await self.once(call)
                except RETRYABLE as exc:
                    failed = exc
                else:
                    if deadline != math.inf:
                        lost_for = time.monotonic() - (deadline - self._reconnect_timeout)
                        _log.info("Redis connection back for %s after %.2f s", what, lost_for)
                    return result
            now = time.monotonic()
            if deadline == math.inf:
                deadline = now + self._reconnect_timeout
                _log.warning("Redis connection lost during %s (%s); reconnecting", what, failed)
            if now >= deadline:
                raise failed
            failed = None
            await anyio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 1.0)

    async def once(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``call()``; raise :class:`TimeoutError` when the server has not answered within
        ``socket_timeout`` (the cancelled command's connection is dropped by redis-py).

        What ``anyio.fail_after`` does, written out: one cancel scope with a deadline, without its two
        generator-based context managers and their extra event-loop lookups (a quarter of its CPU)."""
        scope = anyio.CancelScope(deadline=anyio.current_time() + self._socket_timeout)
        with scope:
            return await call()
        # Reached only when the scope caught a cancellation: its own deadline's.
        if scope.cancelled_caught and anyio.current_time() >= scope.deadline:
            raise TimeoutError
        return None


def unusable(url: str, exc: BaseException) -> BackendError:
    """The error :meth:`RedisBackend.open` raises when the server cannot be used."""
    return BackendError(
        f"cannot use Redis at {safe_url(url)}: {redact(str(exc), url)}; check that the server runs and that "
        "the URL's host, port, database, user, password and TLS settings are right"
    )
