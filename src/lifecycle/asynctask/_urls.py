"""backend_from_url(): pick and configure a backend from one URL string (for the CLI and configuration)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from .._redact import redact
from ._backend import Backend
from ._backends._url_parts import join_url, split_url, unique_options
from ._extras import raise_missing_extra

__all__ = ["backend_from_url"]

_ACCEPTED = (
    '"memory://", '
    '"sqlite:///relative/path.db" or "sqlite:////absolute/path.db" '
    "(options: ?poll_interval=0.1&busy_timeout=30&synchronous=NORMAL), "
    '"redis://[user:password@]host:port/db?prefix=NAME" (also "rediss://", and '
    '"unix:///path/redis.sock?db=0&prefix=NAME"), '
    '"postgresql://user@host:port/dbname?schema=NAME" (also "postgres://"), '
    '"nats://[user:password@]host:4222?prefix=NAME&replicas=N"'
)

_SQLITE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "poll_interval": float,
    "busy_timeout": float,
    "synchronous": str.upper,
}


def backend_from_url(url: str) -> Backend:
    """Build the backend a URL names. The backend is not opened yet (``AsyncTasks`` opens it).

    Accepted forms:

    - ``memory://``: a :class:`~lifecycle.asynctask.MemoryBackend` (one process, not durable).
    - ``sqlite:///tasks.db`` (relative to the working directory) or ``sqlite:////var/lib/app/tasks.db``
      (absolute: four slashes, as in SQLAlchemy); ``sqlite://`` alone is a private in-memory database.
      Query options ``poll_interval``, ``busy_timeout`` and ``synchronous`` go to
      :class:`~lifecycle.asynctask.SQLiteBackend`.
    - ``redis://...``, ``rediss://...`` or ``unix:///path/redis.sock`` (redis-py's form for a Unix socket):
      ``lifecycle.asynctask.redis.RedisBackend``; a ``prefix=NAME`` query option becomes its ``prefix``
      (the rest of the URL goes to redis-py unchanged).
    - ``postgresql://...`` / ``postgres://...``: ``lifecycle.asynctask.postgres.PostgresBackend``; a
      ``schema=NAME`` query option becomes its ``schema``.
    - ``nats://host:4222`` (a comma-separated list of ``nats://`` URLs for a cluster):
      ``lifecycle.asynctask.nats.NatsBackend``; the query options ``prefix=NAME`` and ``replicas=N`` become
      its ``prefix`` and ``replicas``.

    Every error message shows the URL with its passwords masked (``***``).

    Raises:
        ValueError: the URL has another scheme, or a malformed part, an option given twice or an unknown
            option; the message names it and lists the forms.
        ImportError: the backend's optional dependency is missing; the message says which extra to install.

    Example::

        backend = backend_from_url("sqlite:///var/tasks.db?synchronous=FULL")
    """
    if not isinstance(url, str):
        raise TypeError(f"backend_from_url() takes a URL string, got {type(url).__name__}")
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower()
    if scheme == "memory":
        return _memory(url)
    if scheme == "sqlite":
        return _sqlite(url)
    if scheme in ("redis", "rediss", "unix"):
        return _redis(url)
    if scheme in ("postgresql", "postgres"):
        return _postgres(url)
    if scheme == "nats":
        return _nats(url)
    shown = redact(url, url)
    if "://" not in url and url.endswith((".db", ".sqlite", ".sqlite3")):
        problem = f'{shown!r} is a file name, not a URL: for a SQLite file write "sqlite:///{shown}"'
    elif "://" not in url and "=" in url:
        problem = (
            f"{shown!r} looks like a libpq key=value DSN, which backend_from_url does not take: write it "
            "as a URL, postgresql://user@host:port/dbname, or pass it to PostgresBackend(dsn)"
        )
    elif colon and scheme and "://" in url:
        problem = f"the scheme {scheme!r} of {shown!r} is not supported"
    else:
        problem = f"{shown!r} is not a URL (no scheme://)"
    raise ValueError(f"unsupported task backend URL: {problem}; use one of: {_ACCEPTED}")


def _memory(url: str) -> Backend:
    parts = split_url(url)
    if parts.netloc or parts.path or parts.query:
        raise ValueError(
            'the memory backend URL takes no host, path or options: use "memory://", '
            f"got {redact(url, url)!r}"
        )
    from ._backends.memory._backend import MemoryBackend

    backend: Backend = MemoryBackend()
    return backend


def _sqlite(url: str) -> Backend:
    parts = split_url(url)
    shown = redact(url, url)
    if parts.netloc:
        raise ValueError(
            f"a sqlite URL has no host part, got {redact(parts.netloc, url)!r} in {shown!r}: use "
            '"sqlite:///relative/path.db" (three slashes) or "sqlite:////absolute/path.db" (four)'
        )
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    options: dict[str, Any] = {}
    for name, value in unique_options(url).items():
        convert = _SQLITE_OPTIONS.get(name)
        if convert is None:
            raise ValueError(
                f"unknown option {redact(name)!r} in sqlite URL {shown!r}; accepted: "
                f"{', '.join(_SQLITE_OPTIONS)}"
            )
        try:
            options[name] = convert(value)
        except ValueError:
            raise ValueError(
                f"option {name}={redact(value, url)!r} in sqlite URL {shown!r} is not a number"
            ) from None
    from ._backends.sqlite._backend import SQLiteBackend

    return SQLiteBackend(path or ":memory:", **options)


def _redis(url: str) -> Backend:
    unique_options(url)
    rest, prefix = _take_option(url, "prefix")
    module = _import_extra("lifecycle.asynctask.redis", extra="redis")
    if prefix is None:
        backend: Backend = module.RedisBackend(rest)
    else:
        backend = module.RedisBackend(rest, prefix=prefix)
    return backend


def _postgres(url: str) -> Backend:
    unique_options(url)
    rest, schema = _take_option(url, "schema")
    module = _import_extra("lifecycle.asynctask.postgres", extra="postgres")
    if schema is None:
        backend: Backend = module.PostgresBackend(rest)
    else:
        backend = module.PostgresBackend(rest, schema=schema)
    return backend


def _nats(url: str) -> Backend:
    servers = [server.strip() for server in url.split(",")]
    query = unique_options(servers[-1])  # the options follow the last server
    for name, value in query.items():
        if name not in ("prefix", "replicas"):
            raise ValueError(
                f"unknown option {redact(name)!r} in NATS URL {redact(url, url)!r}; accepted: prefix, "
                "replicas (pass nats-py's options as keyword arguments of NatsBackend)"
            )
        if not value:
            raise ValueError(
                f"option {name!r} in URL {redact(url, url)!r} is empty; give a value, as in ?prefix=myapp"
            )
    options: dict[str, Any] = {}
    if "prefix" in query:
        options["prefix"] = query["prefix"]
    if "replicas" in query:
        if not query["replicas"].isdigit():
            raise ValueError(
                f"option replicas={redact(query['replicas'], url)!r} in NATS URL {redact(url, url)!r} is "
                "not a whole number"
            )
        options["replicas"] = int(query["replicas"])
    servers[-1] = join_url(split_url(servers[-1])._replace(query=""))
    module = _import_extra("lifecycle.asynctask.nats", extra="nats")
    backend: Backend = module.NatsBackend(",".join(servers), **options)
    return backend


def _take_option(url: str, name: str) -> tuple[str, str | None]:
    """Remove the ``name`` query option from ``url``; return the rest of the URL and the option's value."""
    parts = split_url(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [value for key, value in pairs if key == name]
    if values and not values[0]:
        raise ValueError(
            f"option {name!r} in URL {redact(url, url)!r} is empty; give a name, as in ?{name}=myapp"
        )
    if not values:
        return url, None
    rest = urlencode([(key, value) for key, value in pairs if key != name])
    return join_url(parts._replace(query=rest)), values[0]


def _import_extra(module: str, *, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise_missing_extra(exc, extra)
