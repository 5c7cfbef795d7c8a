"""How fast the Redis backend's notices travel: from the start of the call that publishes one (``cancel()``
of a running task, ``settle()``) in one backend object to ``wait_for_notices()`` returning it in another,
through a private ``redis-server`` (so the figures include the publishing call's own round trip).

    python benchmarks/redis_notices.py --n 500

Both objects live in this process (one event loop), each with its own connections, as two processes would
have; the figures therefore include one event-loop hop. Prints p50, p99 and max in milliseconds per kind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT / "src", ROOT):
    if str(entry) not in sys.path:
        sys.path.append(str(entry))

from benchmarks.redis_server import PrivateRedis, find_redis_server  # noqa: E402
from lifecycle.asynctask import NewTask, Notice, Settlement, TaskState  # noqa: E402
from lifecycle.asynctask.redis import RedisBackend  # noqa: E402

T0 = 1_700_000_000.0


async def measure(url: str, n: int) -> dict[str, list[float]]:
    actor = RedisBackend(url, prefix="notices")
    listener = RedisBackend(url, prefix="notices")
    await actor.open()
    await listener.open()
    delays: dict[str, list[float]] = {"cancel": [], "settled": []}
    try:
        await listener.wait_for_notices(timeout=0)
        await actor.enqueue_many([NewTask(f"t{i}", "job", "default", b"", 0, None, T0, T0) for i in range(n)])
        claimed = await actor.claim(["default"], n, now=T0 + 1, lease_until=T0 + 600)
        for c in claimed:
            for kind in ("cancel", "settled"):
                started = time.perf_counter()
                if kind == "cancel":
                    await actor.cancel([c.record.id], now=T0 + 2)
                else:
                    await actor.settle([Settlement(c.record.id, c.token, TaskState.CANCELLED, at=T0 + 3)])
                with anyio.fail_after(5):
                    while Notice(kind, c.record.id) not in await listener.wait_for_notices(timeout=5):
                        pass
                delays[kind].append((time.perf_counter() - started) * 1000)
    finally:
        await actor.clear()
        await actor.close()
        await listener.close()
    return delays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="notices of each kind (default 500)")
    parser.add_argument("--redis-server", default=None, help="the redis-server binary")
    args = parser.parse_args(argv)
    with PrivateRedis(find_redis_server(args.redis_server)) as server:
        delays = anyio.run(measure, server.url, args.n)
    for kind, values in delays.items():
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(
            f"{kind}: p50 {statistics.median(values):.2f} ms, p99 {p99:.2f} ms, max {values[-1]:.2f} ms "
            f"({len(values)} notices)"
        )


if __name__ == "__main__":
    main()
