"""Single awaited enqueues on Redis, and the server-counted commands per task of enqueue and of a drain.

Each round enqueues ``--n`` tasks one at a time through an enqueue-only ``AsyncTasks(execution=False)`` (one
awaited ``enqueue`` after another, as a web request does), then drains them with a worker ``AsyncTasks`` in
the same process; ``INFO commandstats`` deltas count what the server ran per task in each phase (commands
run inside scripts included; the counts are server-wide, so other clients of the server add noise). Every
round uses a prefix of its own and deletes it afterwards. Rounds of three ``LPUSH`` floors are interleaved
when ``--floor`` is given: the plain redis-py asyncio client (what a one-command enqueue costs through the
client we use), a bare asyncio ``Protocol`` that writes hiredis-packed commands and parses replies with
hiredis (the least an awaited round trip can cost on an asyncio loop, whatever the client), and redis-py's
synchronous client (what huey's one-``LPUSH`` enqueue rests on). Each floor is one command per call against
our one script call: they bound what any change to our enqueue can reach on the same machine.

Run: ``python -m benchmarks.redis_single --n 5000 --rounds 3 --floor``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis

from lifecycle.asynctask import AsyncTasks
from lifecycle.asynctask.redis import RedisBackend

URL = "redis://127.0.0.1:6379/0"
"""The server; ``--url`` takes another (a private server keeps other clients out of the command counts)."""


async def command_counts(client: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}


async def one_round(n: int, client: aioredis.Redis, url: str) -> dict[str, Any]:
    prefix = f"bench-single-{secrets.token_hex(4)}"
    done = asyncio.Event()
    seen = 0

    async def noop(index: int) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    producer = AsyncTasks(RedisBackend(url, prefix=prefix), execution=False)
    producer.register(noop, name="noop")
    await producer.initialize()
    try:
        await producer.enqueue(noop, -1)  # the first enqueue records the layout: not part of the measure
        before = await command_counts(client)
        started, cpu = time.perf_counter(), time.process_time()
        for index in range(n):
            await producer.enqueue(noop, index)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        after = await command_counts(client)
    finally:
        await producer.cleanup()
    enqueue_cmds = delta(before, after)
    enqueue_cmds["info"] = enqueue_cmds.get("info", 0) - 1
    worker = AsyncTasks(RedisBackend(url, prefix=prefix), concurrency=32)
    worker.register(noop, name="noop")
    n += 1
    before = await command_counts(client)
    started = time.perf_counter()
    await worker.initialize()
    try:
        execution = asyncio.create_task(worker.execute())
        await asyncio.wait_for(done.wait(), 120)
        drain = time.perf_counter() - started
        execution.cancel()
        await asyncio.gather(execution, return_exceptions=True)
    finally:
        await worker.cleanup()
    after = await command_counts(client)
    drain_cmds = delta(before, after)
    drain_cmds["info"] = drain_cmds.get("info", 0) - 1
    cleaner = RedisBackend(url, prefix=prefix)
    await cleaner.open()
    await cleaner.clear()
    await cleaner.close()
    return {
        "enqueue_per_s": (n - 1) / elapsed,
        "enqueue_cpu_us": cpu / (n - 1) * 1e6,
        "enqueue_cmds": sum(enqueue_cmds.values()) / (n - 1),
        "enqueue_detail": enqueue_cmds,
        "drain_per_s": n / drain,
        "drain_cmds": sum(drain_cmds.values()) / n,
        "drain_detail": drain_cmds,
    }


async def floor_round(n: int, client: aioredis.Redis) -> float:
    key = f"bench-single-floor-{secrets.token_hex(4)}"
    started = time.perf_counter()
    for index in range(n):
        await client.lpush(key, index)
    elapsed = time.perf_counter() - started
    await client.delete(key)
    return n / elapsed


class _BareProtocol(asyncio.Protocol):
    """One command in flight at a time: the reply, parsed by hiredis, completes ``waiter``."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiter: asyncio.Future[Any] | None = None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        reply = self.reader.gets()
        if reply is not False and self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.set_result(reply)


async def bare_floor_round(n: int, host: str, port: int) -> float:
    key = f"bench-single-floor-{secrets.token_hex(4)}"
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(_BareProtocol, host, port)

    async def call(*args: str | int) -> Any:
        protocol.waiter = loop.create_future()
        # hiredis' stub types the argument as a one-element tuple; it takes any number of them.
        transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]
        return await protocol.waiter

    try:
        started = time.perf_counter()
        for index in range(n):
            await call("LPUSH", key, index)
        elapsed = time.perf_counter() - started
        await call("DEL", key)
    finally:
        transport.close()
    return n / elapsed


def sync_floor_round(n: int, url: str) -> float:
    client = redis.Redis.from_url(url)
    key = f"bench-single-floor-{secrets.token_hex(4)}"
    try:
        client.ping()
        started = time.perf_counter()
        for index in range(n):
            client.lpush(key, index)
        elapsed = time.perf_counter() - started
        client.delete(key)
    finally:
        client.close()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="interleave the three LPUSH floors' rounds")
    parser.add_argument("--url", default=URL, help="the Redis server (default: %(default)s)")
    parser.add_argument("--detail", action="store_true", help="print the commands of each round")
    args = parser.parse_args()
    if not 1 <= args.n <= 20_000:
        parser.error("--n must be between 1 and 20000")
    client = aioredis.Redis.from_url(args.url)
    results: list[dict[str, Any]] = []
    floors: dict[str, list[float]] = {
        "redis-py asyncio": [],
        "bare asyncio protocol": [],
        "redis-py sync": [],
    }
    address = client.connection_pool.connection_kwargs
    host, port = str(address.get("host", "127.0.0.1")), int(address.get("port", 6379))
    for _ in range(args.rounds):
        result = await one_round(args.n, client, args.url)
        results.append(result)
        line = (
            f"enqueue {result['enqueue_per_s']:8.0f}/s {result['enqueue_cpu_us']:5.0f} us CPU "
            f"{result['enqueue_cmds']:5.2f} cmds/task   "
            f"drain {result['drain_per_s']:8.0f}/s {result['drain_cmds']:5.2f} cmds/task"
        )
        if args.floor:
            floors["redis-py asyncio"].append(await floor_round(args.n, client))
            floors["bare asyncio protocol"].append(await bare_floor_round(args.n, host, port))
            floors["redis-py sync"].append(sync_floor_round(args.n, args.url))
            line += "   LPUSH floors " + " ".join(
                f"{name} {rates[-1]:.0f}/s" for name, rates in floors.items()
            )
        print(line, flush=True)
        if args.detail:
            print("  enqueue:", result["enqueue_detail"])
            print("  drain:  ", result["drain_detail"])
    await client.aclose()

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in results))

    def spread(key: str) -> str:
        values = [r[key] for r in results]
        return f"{min(values):.0f}..{max(values):.0f}"

    print(
        f"median: enqueue {med('enqueue_per_s'):.0f}/s ({spread('enqueue_per_s')}), "
        f"{med('enqueue_cpu_us'):.0f} us client CPU, "
        f"{med('enqueue_cmds'):.2f} cmds/task; drain {med('drain_per_s'):.0f}/s ({spread('drain_per_s')}), "
        f"{med('drain_cmds'):.2f} cmds/task"
        + "".join(
            f"; LPUSH floor, {name}: {statistics.median(rates):.0f}/s ({min(rates):.0f}..{max(rates):.0f})"
            for name, rates in floors.items()
            if rates
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
