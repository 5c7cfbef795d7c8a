"""Single awaited enqueues on PostgreSQL against the floors under them, with the server's CPU per call.

Each round runs, one after another in an order that alternates between rounds, ``--n`` calls of:

``ours``
    ``AsyncTasks.enqueue`` on an enqueue-only ``AsyncTasks(execution=False)`` over ``PostgresBackend``
    (one awaited call after another, as a web request does).
``direct``
    The backend's own single-enqueue statement (``insert_one``: the INSERT whose ``RETURNING`` is the
    wake-up) run through ``DirectStatement`` on one connection, with parameters built once: our asyncio
    path without the engine (what an engine change can reach).
``libpq``
    The same prepared statement through libpq synchronously (``pgconn.exec_prepared``, no event loop): what
    the statement costs a Python client at least.
``commit``
    A one-column row (a text primary key) inserted the same way: the least a durable commit of one row
    costs on this server (its WAL flush included).
``select``
    ``SELECT $1::text``: the round trip alone, no commit.

Printed per call: wall time, the client's CPU (``time.process_time``) and, when the server runs on this
machine and its processes' ``/proc/<pid>/schedstat`` are readable (as root), the CPU of the backends that
served the calls (their run time, kernel included: the commit's ``fdatasync`` system call counts, its wait
for the disk does not). Everything lives in a schema of the run's own, dropped at the end.

Run: ``python -m benchmarks.postgres_single --n 3000 --rounds 5``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from lifecycle.asynctask import AsyncTasks
from lifecycle.asynctask._backends.postgres._direct import DirectStatement, numbered
from lifecycle.asynctask._backends.postgres._sql import INSERT_ONE_TYPES, Statements
from lifecycle.asynctask._enqueue import new_task_id
from lifecycle.asynctask.postgres import PostgresBackend

URL = "postgresql://postgres@127.0.0.1:5432/test"
MODES = ("ours", "direct", "libpq", "commit", "select")

_F8 = struct.Struct("!d").pack


def backend_cpu_ns(pids: list[int]) -> int | None:
    """The CPU time the server processes ``pids`` have run, in ns, or ``None`` when unreadable."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return total


def task_params(channel: bytes) -> list[bytes | None]:
    """``insert_one``'s binary parameters for a new task of ``noop`` (a new id each call)."""
    now = _F8(time.time())
    return [
        new_task_id().encode(),
        b"noop",
        b"default",
        b"[0]",
        struct.pack("!i", 3),
        None,
        now,
        now,
        None,
        struct.pack("!q", 0),
        None,
        None,
        None,
        channel,
        b"default",
    ]


class Round:
    """The connections and statements of the floors (each its own connection, prepared once)."""

    def __init__(self, url: str, schema: str, application: str) -> None:
        self.url = url
        self.schema = schema
        self.application = application
        self.statements = Statements.for_schema(schema)
        self.channel = self.statements.channel.encode()
        self.direct = DirectStatement("bench_insert_one", self.statements.insert_one, INSERT_ONE_TYPES)

    async def open(self) -> None:
        self.tasks = AsyncTasks(
            PostgresBackend(f"{self.url}?application_name={self.application}", schema=self.schema),
            execution=False,
        )

        async def noop(index: int) -> None:
            pass

        self.tasks.register(noop, name="noop")
        await self.tasks.initialize()
        for index in range(50):  # warm: the statement prepared, the lease kept
            await self.tasks.enqueue("noop", -index)
        self.aconn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        self.sconn = psycopg.Connection.connect(self.url, autocommit=True)
        self.sconn.execute(f"CREATE TABLE {self.schema}.bench_commit (id text PRIMARY KEY)")
        pg = self.sconn.pgconn
        for name, text in (
            (b"insert_one", numbered(self.statements.insert_one)[0]),
            (b"commit", f"INSERT INTO {self.schema}.bench_commit (id) VALUES ($1)".encode()),
            (b"select", b"SELECT $1::text"),
        ):
            prepared = pg.prepare(name, text, list(INSERT_ONE_TYPES) if name == b"insert_one" else [25])
            if prepared.status != pq.ExecStatus.COMMAND_OK:
                raise SystemExit(f"could not prepare {name!r}: {prepared.error_message!r}")
        # Before the direct statements: psycopg's own wait on a socket would end their watch (see _direct).
        self.apid = await self._pid(self.aconn)
        for _ in range(50):
            await self.direct.run(self.aconn, task_params(self.channel))
        row = self.sconn.execute("SELECT pg_backend_pid()").fetchone()
        self.spid = int(row[0]) if row else 0

    async def _pid(self, connection: psycopg.AsyncConnection[Any]) -> int:
        cursor = await connection.execute("SELECT pg_backend_pid()")
        row = await cursor.fetchone()
        return int(row[0]) if row else 0

    def ours_pids(self) -> list[int]:
        rows = self.sconn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.application,)
        ).fetchall()
        return [int(row[0]) for row in rows]

    async def close(self) -> None:
        await self.tasks.cleanup()
        await self.aconn.close()
        self.sconn.close()

    def runner(self, mode: str, n: int) -> tuple[Callable[[], Coroutine[Any, Any, None]], list[int]]:
        """The timed loop of ``mode`` and the server processes it runs on."""
        pg = self.sconn.pgconn
        channel = self.channel

        async def ours() -> None:
            enqueue = self.tasks.enqueue
            for index in range(n):
                await enqueue("noop", index)

        async def direct() -> None:
            run, connection = self.direct.run, self.aconn
            for _ in range(n):
                await run(connection, task_params(channel))

        async def sync(name: bytes) -> None:
            binary = [1] * len(INSERT_ONE_TYPES)
            for _ in range(n):
                if name == b"insert_one":
                    result = pg.exec_prepared(name, task_params(channel), binary)  # type: ignore[arg-type]
                else:
                    result = pg.exec_prepared(name, [new_task_id().encode()])
                if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                    raise SystemExit(f"{name!r} failed: {result.error_message!r}")

        if mode == "ours":
            return ours, self.ours_pids()
        if mode == "direct":
            return direct, [self.apid]
        name = {"libpq": b"insert_one", "commit": b"commit", "select": b"select"}[mode]
        return (lambda: sync(name)), [self.spid]


async def main_async(args: argparse.Namespace) -> None:
    schema = f"bench_pgsingle_{secrets.token_hex(4)}"
    bench = Round(args.url, schema, f"{schema}_ours")
    results: dict[str, list[tuple[float, float, float | None]]] = {mode: [] for mode in MODES}
    try:
        await bench.open()
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else tuple(reversed(MODES)):
                loop, pids = bench.runner(mode, args.n)
                server = backend_cpu_ns(pids)
                began, cpu = time.perf_counter(), time.process_time()
                await loop()
                elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
                after = backend_cpu_ns(pids)
                served = None if server is None or after is None else (after - server) / args.n / 1e3
                results[mode].append((elapsed / args.n * 1e6, cpu / args.n * 1e6, served))
    finally:
        try:
            await bench.close()
        finally:
            with psycopg.connect(args.url, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    print(f"{args.rounds} rounds of {args.n} calls; medians (min-max) per call, in µs")
    for mode in MODES:
        walls = [wall for wall, _, _ in results[mode]]
        cpus = [cpu for _, cpu, _ in results[mode]]
        served = [value for _, _, value in results[mode] if value is not None]
        server_cpu = (
            f"{statistics.median(served):6.1f} ({min(served):.1f}-{max(served):.1f})" if served else "n/a"
        )
        print(
            f"{mode:7} wall {statistics.median(walls):6.1f} ({min(walls):.1f}-{max(walls):.1f})  "
            f"client CPU {statistics.median(cpus):5.1f} ({min(cpus):.1f}-{max(cpus):.1f})  "
            f"server CPU {server_cpu}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL, help=f"the server (default {URL})")
    parser.add_argument("--n", type=int, default=3_000, help="calls per mode and round (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
