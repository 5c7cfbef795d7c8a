"""What every library adapter shares: the run configuration, the probe inside the worker, a tiny Redis
admin client, and the driver that runs one scenario for one library.

Standard library only: this module is imported by each peer's own virtualenv as well as by ours.

One run = one *producer* process (this driver) that prepares the storage, enqueues, and for the worker
scenarios spawns exactly one *worker* process (the same adapter module with ``--role worker``). The
worker's tasks report to the producer through an inherited pipe:

- ``count`` mode (drain, mix): the task body calls :meth:`Probe.start` / :meth:`Probe.finish`; the worker
  notes the time and its own CPU time (``time.process_time``: every thread of the worker process) at the
  first start and at the N-th finish, and writes one JSON line. Nothing per task crosses the pipe.
- ``latency`` mode: every start writes ``"<index> <time.monotonic()> <time.process_time()>"`` (CLOCK_MONOTONIC
  is system-wide on Linux, so the producer can subtract its own send time; the worker's CPU time between
  the first and the last measured start, over the tasks between them, is its CPU per task when tasks come
  one at a time, every thread included).

The adapter module prints one line ``BENCH-RESULT {json}`` on stdout; ``benchmarks/run.py`` reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
#: The key that marks a Redis database as the benchmark's own (it held nothing when the benchmark took it).
OWNED_MARK = "lifecycle-bench:owned"
SCENARIOS = (
    "drain",
    "enqueue",
    "latency",
    "mix",
    "sqlite_drain",
    "sqlite_enqueue",
    "nats_drain",
    "nats_enqueue",
    "nats_latency",
    "pg_drain",
    "pg_enqueue",
    "pg_latency",
)
#: The comment that marks a PostgreSQL schema as the benchmark's own (it created the schema).
OWNED_SCHEMA_COMMENT = "lifecycle-bench: created by benchmarks/run.py, dropped after each run"
WORKER_START_TIMEOUT = 60.0
DELAY = 0.1  # seconds: the delay of the delayed-start samples (NATS latency scenario, adapters that delay)
DELAYED_SAMPLES = 100


@dataclass
class Config:
    """Everything one run needs; passed from run.py to the producer and from the producer to its worker."""

    library: str
    scenario: str
    n: int
    concurrency: int
    redis_url: str
    sqlite_path: str
    bulk_size: int
    timeout: float
    role: str = "producer"
    workload: str = "noop"  # "noop" or "sleep" (await a 10 ms sleep)
    probe: str = "count"  # "count" or "latency"
    nats_url: str = ""
    nats_monitor: str = ""  # the private server's monitoring URL (its /varz counts messages)
    postgres_url: str = ""
    pg_schema: str = ""  # the run's own schema (created and dropped by the producer), for every library

    @property
    def storage(self) -> str:
        """``"sqlite"``, ``"nats"`` or ``"postgres"`` for those scenarios, else ``"redis"``."""
        if self.scenario.startswith("pg_"):
            return "postgres"
        for storage in ("sqlite", "nats"):
            if self.scenario.startswith(storage):
                return storage
        return "redis"

    def argv(self) -> list[str]:
        """This configuration as command-line arguments for :func:`parse_config`."""
        out: list[str] = []
        for key, value in asdict(self).items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Read a :class:`Config` from the command line (see :meth:`Config.argv`)."""
    parser = argparse.ArgumentParser(description="Run one benchmark scenario for one library.")
    parser.add_argument("--library", required=True)
    parser.add_argument("--scenario", required=True, choices=SCENARIOS)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--sqlite-path", default="/tmp/lifecycle-bench.db")
    parser.add_argument("--bulk-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--role", default="producer", choices=("producer", "worker"))
    parser.add_argument("--workload", default="noop", choices=("noop", "sleep"))
    parser.add_argument("--probe", default="count", choices=("count", "latency"))
    parser.add_argument("--nats-url", default="")
    parser.add_argument("--nats-monitor", default="")
    parser.add_argument("--postgres-url", default="")
    parser.add_argument("--pg-schema", default="")
    return Config(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------- probe


class Probe:
    """Measures the worker from inside its tasks; configured by the producer through the environment."""

    def __init__(self) -> None:
        self.n = int(os.environ.get("BENCH_N", "0"))
        self.fd = int(os.environ.get("BENCH_FD", "-1"))
        self.latency = os.environ.get("BENCH_PROBE") == "latency"
        # next() on itertools.count is atomic under the GIL: safe from the thread-pool workers too.
        self._started = itertools.count()
        self._finished = itertools.count()
        self._first = (0.0, 0.0)
        # Tasks running at once, to check that the worker keeps to its concurrency (exact for event-loop
        # workers; for thread pools the unlocked += may be off by a little).
        self._running = 0
        self._peak = 0

    def start(self, index: int) -> None:
        """Call first thing in the task body."""
        if self.latency:
            os.write(self.fd, f"{index} {time.monotonic()!r} {time.process_time()!r}\n".encode())
            return
        if next(self._started) == 0:
            self._first = (time.monotonic(), time.process_time())
        self._running += 1
        if self._running > self._peak:
            self._peak = self._running

    def finish(self) -> None:
        """Call last thing in the task body."""
        if self.latency:
            return
        self._running -= 1
        if next(self._finished) == self.n - 1:
            end, cpu = time.monotonic(), time.process_time()
            line = {"first_start": self._first[0], "last_finish": end, "cpu": cpu - self._first[1]}
            line["peak_running"] = self._peak
            os.write(self.fd, (json.dumps(line) + "\n").encode())


PROBE = Probe()


def noop_body(index: int) -> None:
    """The whole body of a no-op task, for synchronous task functions."""
    PROBE.start(index)
    PROBE.finish()


async def sleep_body(index: int) -> None:
    """The body of the realistic-mix task: await a 10 ms asyncio sleep."""
    PROBE.start(index)
    await asyncio.sleep(0.01)
    PROBE.finish()


def thread_sleep_body(index: int) -> None:
    """The realistic-mix task for thread-pool workers (their equivalent of awaiting a sleep)."""
    PROBE.start(index)
    time.sleep(0.01)
    PROBE.finish()


# --------------------------------------------------------------------------------------- redis admin


_UNLINK_A_SCAN_PAGE = """
local page = redis.call('SCAN', ARGV[1], 'COUNT', 1000)
if #page[2] > 0 then redis.call('UNLINK', unpack(page[2])) end
return page[1]
"""


class RedisAdmin:
    """A minimal RESP2 client for the producer's bookkeeping (emptying its own database, INFO), independent
    of every peer."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.db = int((parts.path or "/0").lstrip("/") or "0")
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=30)
        self._file = self._sock.makefile("rb")
        if parts.password:
            user = urllib.parse.unquote(parts.username or "default")
            self.command("AUTH", user, urllib.parse.unquote(parts.password))
        self.command("SELECT", str(self.db))

    def command(self, *args: str) -> Any:
        """Send one command and return its decoded reply; a Redis error raises ``RuntimeError``."""
        chunks = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            chunks.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(chunks))
        return self._read()

    def _read(self) -> Any:
        line = self._file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._file.read(size + 2)[:-2].decode()
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected Redis reply {line!r}")

    def claim_own_db(self) -> None:
        """Make this database the benchmark's own: one that holds no key (it then gets :data:`OWNED_MARK`),
        or one the benchmark made its own before (it holds the mark). Anything else exits with a message, so
        the benchmark never deletes data it did not write."""
        if self.command("EXISTS", OWNED_MARK) == 1:
            return
        keys = self.command("DBSIZE")
        if keys:
            raise SystemExit(
                f"refusing to use Redis database {self.db}: it holds {keys} key(s) the benchmark did not "
                "write, and the benchmark empties its database between runs; leave --redis-url out (the "
                "harness then starts a redis-server of its own), or give it an empty database"
            )
        self.command("SET", OWNED_MARK, "1")

    def flush_own_db(self, *, keep_mark: bool = True) -> None:
        """Empty the benchmark's own database (see :meth:`claim_own_db`); ``keep_mark=False`` at the end,
        which leaves it empty. Every key in it goes, the peers' included (they name their keys themselves,
        so no prefix bounds them): a key someone else wrote into the marked database would go too, which is
        why only a database that was empty when claimed, or the harness's private server, is ever used."""
        self.claim_own_db()
        cursor = "0"
        while True:  # SCAN + UNLINK of this database's keys (never FLUSHDB), binary key names included
            cursor = self.command("EVAL", _UNLINK_A_SCAN_PAGE, "0", cursor)
            if cursor == "0":
                break
        if keep_mark:
            self.command("SET", OWNED_MARK, "1")

    def counters(self) -> tuple[int, int]:
        """The server's ``total_commands_processed`` (commands run inside Lua scripts included) and
        ``total_reads_processed`` (socket reads: about one per round trip, a pipeline often in one read).
        Both are server-wide: run on a quiet server."""
        info: str = self.command("INFO", "stats")
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return int(fields["total_commands_processed"]), int(fields.get("total_reads_processed", "0"))

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()


# ---------------------------------------------------------------------------------------- nats admin


class NatsAdmin:
    """A minimal NATS client for the producer's bookkeeping on the private server (deleting every stream
    between runs, reading the message counters), independent of every peer's nats-py."""

    def __init__(self, url: str, monitor: str = "") -> None:
        parts = urllib.parse.urlsplit(url)
        self.monitor = monitor
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=30)
        self._file = self._sock.makefile("rb")
        if not self._file.readline().startswith(b"INFO "):
            raise RuntimeError(f"{url} is not a NATS server")
        self._sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nPING\r\n')
        self._sid = 0
        while (line := self._line()) != b"PONG":
            if line.startswith(b"-ERR"):
                raise RuntimeError(f"NATS refused the connection: {line.decode()}")

    def _line(self) -> bytes:
        line = self._file.readline()
        if not line:
            raise RuntimeError("the NATS server closed the connection")
        return line.rstrip(b"\r\n")

    def request(self, subject: str, payload: bytes = b"") -> Any:
        """Send a request and return its decoded JSON reply."""
        self._sid += 1
        inbox = f"_INBOX.bench.{self._sid}"
        self._sock.sendall(
            b"SUB %s %d\r\nPUB %s %s %d\r\n%s\r\n"
            % (inbox.encode(), self._sid, subject.encode(), inbox.encode(), len(payload), payload)
        )
        while True:
            line = self._line()
            if line == b"PING":
                self._sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RuntimeError(f"NATS error: {line.decode()}")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                data = self._file.read(size + 2)[:-2]
                self._sock.sendall(b"UNSUB %d\r\n" % self._sid)
                return json.loads(data)

    def delete_all_streams(self) -> None:
        """Delete every stream of the (private) server: the benchmark's and the peers'."""
        names = self.request("$JS.API.STREAM.NAMES", b"{}").get("streams") or []
        for name in names:
            self.request(f"$JS.API.STREAM.DELETE.{name}")

    def counters(self) -> tuple[int, int]:
        """The server's ``in_msgs`` (messages clients sent: publishes, requests, acknowledgements) and
        ``out_msgs`` (messages it delivered), from the monitoring port; server-wide."""
        if not self.monitor:
            return 0, 0
        import urllib.request

        with urllib.request.urlopen(f"{self.monitor}/varz", timeout=10) as reply:
            varz = json.loads(reply.read())
        return int(varz["in_msgs"]), int(varz["out_msgs"])

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()


# ------------------------------------------------------------------------------------ postgres admin


class PostgresAdmin:
    """A minimal PostgreSQL client (protocol 3, simple queries; trust, cleartext or MD5 authentication) for
    the producer's bookkeeping: creating and dropping the run's own schema, reading the server version.
    Independent of every peer's driver (asyncpg, psycopg)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.user = urllib.parse.unquote(parts.username or os.environ.get("USER", "postgres"))
        self._password = urllib.parse.unquote(parts.password or "")
        database = urllib.parse.unquote(parts.path.lstrip("/")) or self.user
        self._ready = False
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=30)
        params = f"user\0{self.user}\0database\0{database}\0application_name\0lifecycle-bench-admin\0\0"
        body = (196608).to_bytes(4, "big") + params.encode()
        self._sock.sendall((len(body) + 4).to_bytes(4, "big") + body)
        self._until_ready()

    def _message(self) -> tuple[bytes, bytes]:
        head = self._exactly(5)
        return head[:1], self._exactly(int.from_bytes(head[1:], "big") - 4)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise RuntimeError("the PostgreSQL server closed the connection")
            data += chunk
        return data

    def _send(self, kind: bytes, body: bytes) -> None:
        self._sock.sendall(kind + (len(body) + 4).to_bytes(4, "big") + body)

    def _until_ready(self) -> list[list[str | None]]:
        rows: list[list[str | None]] = []
        error = ""
        while True:
            kind, body = self._message()
            if kind == b"R":
                self._authenticate(int.from_bytes(body[:4], "big"), body[4:])
            elif kind == b"D":
                row: list[str | None] = []
                at = 2
                for _ in range(int.from_bytes(body[:2], "big")):
                    size = int.from_bytes(body[at : at + 4], "big", signed=True)
                    at += 4
                    row.append(None if size < 0 else body[at : at + size].decode())
                    at += max(size, 0)
                rows.append(row)
            elif kind == b"E":
                fields = {item[:1]: item[1:].decode() for item in body.split(b"\0") if item}
                error = f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '')}: {fields.get(b'M', '')}"
                if not self._ready:  # refused at startup: no ReadyForQuery follows
                    raise RuntimeError(f"PostgreSQL refused the connection: {error}")
            elif kind == b"Z":
                self._ready = True
                if error:
                    raise RuntimeError(f"PostgreSQL error: {error}")
                return rows

    def _authenticate(self, code: int, data: bytes) -> None:
        if code == 0:
            return
        if code == 3:
            self._send(b"p", self._password.encode() + b"\0")
        elif code == 5:
            import hashlib

            inner = hashlib.md5((self._password + self.user).encode()).hexdigest()
            self._send(b"p", b"md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest().encode() + b"\0")
        else:
            raise RuntimeError(
                f"PostgresAdmin: the server asks for authentication method {code} (SCRAM is 10), which this "
                "bookkeeping client does not speak; give --postgres-url a role with trust or md5 "
                "authentication"
            )

    def query(self, sql: str) -> list[list[str | None]]:
        """Run ``sql`` (one or more statements) and return the rows, as text; an error raises
        ``RuntimeError``."""
        self._send(b"Q", sql.encode() + b"\0")
        return self._until_ready()

    def reset_schema(self, schema: str) -> None:
        """Make ``schema`` an empty schema of the benchmark's own: created here when it does not exist, or
        dropped and created again when it carries :data:`OWNED_SCHEMA_COMMENT` (the benchmark created it).
        A schema of that name that the benchmark did not create exits with a message: never dropped."""
        self.drop_own_schema(schema)
        self.query(f'CREATE SCHEMA "{schema}"; COMMENT ON SCHEMA "{schema}" IS \'{OWNED_SCHEMA_COMMENT}\'')

    def drop_own_schema(self, schema: str) -> None:
        """Drop ``schema`` (and all it holds) when it exists and the benchmark created it."""
        if not schema.replace("_", "").isalnum() or not schema.isascii():
            raise ValueError(f"PostgresAdmin: schema name {schema!r} must be letters, digits and _ only")
        rows = self.query(
            f"SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = '{schema}'"
        )
        if not rows:
            return
        if rows[0][0] != OWNED_SCHEMA_COMMENT:
            raise SystemExit(
                f"refusing to drop PostgreSQL schema {schema!r}: the benchmark did not create it (its "
                f"comment is {rows[0][0]!r}); choose another --pg-schema or leave it out for a generated one"
            )
        self.query(f'DROP SCHEMA "{schema}" CASCADE')

    def version(self) -> str:
        """The server's version string."""
        return str(self.query("SHOW server_version")[0][0])

    def close(self) -> None:
        """Close the connection (with a Terminate message)."""
        with contextlib.suppress(OSError):
            self._send(b"X", b"")
        self._sock.close()


# ------------------------------------------------------------------------------------------- adapter


class Adapter:
    """The common shape of a library adapter; subclasses fill in the library calls.

    Producer side (async or plain methods, see ``is_async``): ``open``, ``enqueue(index)`` (one awaited,
    durable enqueue), ``enqueue_bulk(indices)`` (the library's bulk API; leave ``bulk_api = None`` when it
    has none), ``close``. Worker side: ``work()`` runs the library's worker in this process until the
    process is terminated. ``cfg.workload`` says which task to enqueue and ``cfg.concurrency`` how many
    tasks the worker runs at once.
    """

    is_async = True
    delayed = False  # whether enqueue_delayed() is implemented
    bulk_api: str | None = None  # the name of the bulk call, for the report
    storages: frozenset[str] = frozenset({"redis"})
    settings = ""  # non-default settings the adapter uses, for the report

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def open(self) -> Any:
        """Connect the producer."""

    def enqueue(self, index: int) -> Any:
        """Enqueue one task with argument ``index`` and wait until the library says it is stored."""
        raise NotImplementedError

    def enqueue_bulk(self, indices: range) -> Any:
        """Enqueue all ``indices`` with the library's bulk API."""
        raise NotImplementedError

    def enqueue_delayed(self, index: int, delay: float) -> Any:
        """Enqueue one task to start ``delay`` seconds from now (when ``delayed`` is true)."""
        raise NotImplementedError

    def close(self) -> Any:
        """Disconnect the producer."""

    def work(self) -> None:
        """Run the worker in this process until it is terminated."""
        raise NotImplementedError


async def _call(adapter: Adapter, method: Callable[..., Any], *args: Any) -> Any:
    result = method(*args)
    if adapter.is_async:
        return await result
    return result


# -------------------------------------------------------------------------------------------- driver


def _die_with_parent() -> None:
    # The worker must never outlive its producer (for example when run.py times a run out).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkerProcess:
    """The one worker process of a run, with the read end of its probe pipe."""

    def __init__(self, cfg: Config, module: str, probe: str, n: int) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, BENCH_N=str(n), BENCH_FD=str(write_fd), BENCH_PROBE=probe)
        worker_cfg = Config(**{**asdict(cfg), "role": "worker", "probe": probe})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *worker_cfg.argv()],
            env=env,
            pass_fds=(write_fd,),
            preexec_fn=_die_with_parent,
            cwd=Path(__file__).resolve().parents[2],
        )
        os.close(write_fd)
        self._fd = read_fd
        self._buffer = b""

    def read_line(self, timeout: float) -> str:
        """The next line the worker's probe wrote; raises ``TimeoutError`` or ``RuntimeError`` (exited)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the worker reported nothing for {timeout:.0f} s")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the worker exited (status {self.proc.wait()}) before reporting")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        """SIGTERM (the library's graceful stop), SIGKILL after 5 s: the measurement is already taken."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._fd)


Admin = RedisAdmin | NatsAdmin | PostgresAdmin | None


def _prepare_storage(cfg: Config) -> Admin:
    if cfg.storage == "postgres":
        postgres = PostgresAdmin(cfg.postgres_url)
        postgres.reset_schema(cfg.pg_schema)
        return postgres
    if cfg.storage == "sqlite":
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(cfg.sqlite_path + suffix).unlink(missing_ok=True)
        return None
    if cfg.storage == "nats":
        nats = NatsAdmin(cfg.nats_url, cfg.nats_monitor)
        nats.delete_all_streams()
        return nats
    admin = RedisAdmin(cfg.redis_url)
    admin.flush_own_db()
    return admin


def _counters(admin: Admin) -> tuple[int, int]:
    return admin.counters() if isinstance(admin, (RedisAdmin, NatsAdmin)) else (0, 0)


def _release(admin: Admin, cfg: Config) -> None:
    """Close the producer's admin connection; on PostgreSQL first drop the run's own schema."""
    if isinstance(admin, PostgresAdmin):
        admin.drop_own_schema(cfg.pg_schema)
    if admin is not None:
        admin.close()


def _redis_metrics(
    admin: RedisAdmin | NatsAdmin | PostgresAdmin,
    prefix: str,
    before: tuple[int, int],
    after: tuple[int, int],
    n: int,
) -> dict[str, float]:
    if isinstance(admin, PostgresAdmin):  # no per-run counters: the server's statistics are database-wide
        return {}
    if isinstance(admin, NatsAdmin):  # the monitoring port's counters: the admin sends nothing meanwhile
        return {
            f"{prefix}nats_msgs_in_per_task": (after[0] - before[0]) / n,
            f"{prefix}nats_msgs_out_per_task": (after[1] - before[1]) / n,
        }
    # The admin's own INFO between the two readings is one command and one read: not the library's.
    return {
        f"{prefix}redis_cmds_per_task": (after[0] - before[0] - 1) / n,
        f"{prefix}redis_reads_per_task": (after[1] - before[1] - 1) / n,
    }


async def _enqueue_all(adapter: Adapter, n: int, bulk: bool) -> None:
    if bulk:
        for start in range(0, n, adapter.cfg.bulk_size):
            await _call(adapter, adapter.enqueue_bulk, range(start, min(n, start + adapter.cfg.bulk_size)))
    else:
        for index in range(n):
            await _call(adapter, adapter.enqueue, index)


async def _drain(factory: Callable[[Config], Adapter], cfg: Config, module: str) -> dict[str, Any]:
    admin = _prepare_storage(cfg)
    adapter = factory(cfg)
    await _call(adapter, adapter.open)
    await _enqueue_all(adapter, cfg.n, bulk=adapter.bulk_api is not None)
    await _call(adapter, adapter.close)
    before = _counters(admin)
    worker = WorkerProcess(cfg, module, "count", cfg.n)
    try:
        report = json.loads(worker.read_line(cfg.timeout))
        after = _counters(admin)
    finally:
        worker.stop()
    elapsed = report["last_finish"] - report["first_start"]
    metrics = {
        "tasks_per_s": cfg.n / elapsed if elapsed > 0 else float("inf"),
        "seconds": elapsed,
        "cpu_ms_per_task": report["cpu"] * 1000 / cfg.n,
        "peak_running": report["peak_running"],
    }
    if admin is not None:
        metrics.update(_redis_metrics(admin, "", before, after, cfg.n))
    _release(admin, cfg)
    return metrics


async def _enqueue(factory: Callable[[Config], Adapter], cfg: Config) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    variants = [("single", False)] + ([("bulk", True)] if factory(cfg).bulk_api is not None else [])
    for label, bulk in variants:
        admin = _prepare_storage(cfg)
        adapter = factory(cfg)  # after the storage was reset: some libraries create their schema here
        await _call(adapter, adapter.open)
        before, cpu, start = _counters(admin), time.process_time(), time.perf_counter()
        await _enqueue_all(adapter, cfg.n, bulk=bulk)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = _counters(admin)
        await _call(adapter, adapter.close)
        metrics[f"{label}_per_s"] = cfg.n / elapsed
        metrics[f"{label}_cpu_ms_per_task"] = cpu * 1000 / cfg.n
        if admin is not None:
            metrics.update(_redis_metrics(admin, f"{label}_", before, after, cfg.n))
        _release(admin, cfg)
    return metrics


async def _latency(factory: Callable[[Config], Adapter], cfg: Config, module: str) -> dict[str, Any]:
    admin = _prepare_storage(cfg)
    adapter = factory(cfg)
    await _call(adapter, adapter.open)
    worker = WorkerProcess(cfg, module, "latency", cfg.n)
    samples: list[float] = []
    late: list[float] = []
    first_cpu = last_cpu = 0.0  # the worker's CPU time at the first and at the last measured start
    try:
        # Warm-up: the first task waits for the worker to start; a few more warm connections and caches.
        for index in range(-20, cfg.n):
            sent = time.monotonic()
            await _call(adapter, adapter.enqueue, index)
            line = worker.read_line(WORKER_START_TIMEOUT if index == -20 else 10.0)
            got, started, worker_cpu = line.split()
            if int(got) != index:
                raise RuntimeError(f"task {got} started while waiting for task {index}")
            if index >= 0:
                samples.append((float(started) - sent) * 1000)
                last_cpu = float(worker_cpu)
                if index == 0:
                    first_cpu = last_cpu
        if cfg.storage == "nats" and adapter.delayed:
            # Delayed tasks: how late after its run_at each one starts on the idle worker.
            for index in range(cfg.n, cfg.n + min(cfg.n, DELAYED_SAMPLES)):
                sent = time.monotonic()
                await _call(adapter, adapter.enqueue_delayed, index, DELAY)
                got, started, _ = worker.read_line(10.0).split()
                if int(got) != index:
                    raise RuntimeError(f"task {got} started while waiting for task {index}")
                late.append((float(started) - sent - DELAY) * 1000)
    finally:
        worker.stop()
        await _call(adapter, adapter.close)
        _release(admin, cfg)
    samples.sort()
    metrics = {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "max_ms": samples[-1],
    }
    if cfg.n > 1:
        metrics["worker_cpu_ms_per_task"] = (last_cpu - first_cpu) * 1000 / (cfg.n - 1)
    if late:
        late.sort()
        metrics["delayed_late_p50_ms"] = statistics.median(late)
        metrics["delayed_late_max_ms"] = late[-1]
    return metrics


async def _produce(factory: Callable[[Config], Adapter], cfg: Config, module: str) -> dict[str, Any]:
    if cfg.scenario in ("drain", "mix", "sqlite_drain", "nats_drain", "pg_drain"):
        return await _drain(factory, cfg, module)
    if cfg.scenario in ("enqueue", "sqlite_enqueue", "nats_enqueue", "pg_enqueue"):
        return await _enqueue(factory, cfg)
    return await _latency(factory, cfg, module)


def _work(adapter: Adapter) -> None:
    profile = os.environ.get("BENCH_PROFILE")
    if not profile:
        adapter.work()
        return
    import cProfile  # only for --profile runs: it slows the worker down, so those numbers are not reported

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        adapter.work()
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


def main(factory: Callable[[Config], Adapter], module: str, argv: list[str] | None = None) -> None:
    """Entry point of every adapter module: ``python -m benchmarks.peers.<name> --scenario ...``."""
    cfg = parse_config(argv)
    if cfg.role == "worker":
        _work(factory(cfg))
        return
    adapter = factory(cfg)
    if cfg.storage not in adapter.storages:
        raise SystemExit(f"{cfg.library} has no {cfg.storage} storage in this harness")
    metrics = asyncio.run(_produce(factory, cfg, module))
    result = {"library": cfg.library, "scenario": cfg.scenario, "n": cfg.n, "metrics": metrics}
    result["settings"] = adapter.settings
    result["bulk_api"] = adapter.bulk_api
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_async_worker(coro_factory: Callable[[], Awaitable[None]]) -> None:
    """Run an asyncio worker until SIGTERM, which cancels it (the libraries' own stop path)."""

    async def runner() -> None:
        task = asyncio.ensure_future(coro_factory())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(runner())


def wait_for_sigterm() -> None:
    """Block the main thread until SIGTERM (for workers that run in threads of this process)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})
