"""The instructions a private ``redis-server`` spends per call of each script on an idle worker's path,
counted by callgrind (which the machine's load does not change).

    python benchmarks/redis_callgrind.py --k 100

Starts ``redis-server`` under ``valgrind --tool=callgrind`` with instrumentation off, then through the
backend's own methods and scripts runs, each phase with instrumentation on and dumped on its own: ``--k``
single enqueues (``enqueue_new``) into ``--k`` queues, one task each; a ``prepare_wait`` per queue as a
wait with a claim behind it sends it (each finds its task ready, so it rings its alarm); the waited claims
(``claim`` with ``@<alarm>:t`` as the wait's claim sends it, one queue and a limit of 32 each, each naming the
claim before it as its previous call, as a worker does); and one single-task settlement per lease
(``settle``). Prints per call the whole dump's instructions (reading the command, the script, the reply) and
those under ``evalShaCommand``. The script cache is flushed first, so every run starts with the same Lua
heap (the collector's work grows with it). The code measured is the one on ``PYTHONPATH``: run it once per
version to compare (``PYTHONPATH=<other checkout>/src``). Needs ``valgrind`` (``callgrind_control``,
``callgrind_annotate``) and the Redis server package.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import redis  # noqa: E402

from benchmarks.redis_server import PrivateRedis, find_redis_server  # noqa: E402
from lifecycle.asynctask import NewTask, Settlement, TaskState  # noqa: E402
from lifecycle.asynctask._backends.redis._codec import claimed_tasks, time_text  # noqa: E402
from lifecycle.asynctask.redis import RedisBackend  # noqa: E402

PHASES = ("enqueue", "prepare_wait", "claim", "settle")


class CallgrindRedis(PrivateRedis):
    """A private ``redis-server`` under callgrind, instrumentation off until switched on, its dumps in
    ``out``."""

    name = "redis under callgrind"

    def __init__(self, binary: str, out: Path) -> None:
        super().__init__(binary)
        self.out = out

    def command(self, directory: Path, log: Path) -> list[str]:
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        valgrind.append(f"--log-file={self.out}/valgrind.log")
        return [*valgrind, f"--callgrind-out-file={self.out}/cg.%p.out", *super().command(directory, log)]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _task(queue: str) -> NewTask:
    now = time.time()
    return NewTask(uuid.uuid4().hex, "job", queue, b"[]", 3, None, now, now, generated_id=True)


async def _drive(url: str, pid: int, k: int) -> None:
    """Run the phases, each instrumented and dumped under its name."""
    redis.Redis.from_url(url).script_flush()
    prefix = f"cg{uuid.uuid4().hex[:6]}"
    producer, worker = RedisBackend(url, prefix=prefix), RedisBackend(url, prefix=prefix)
    await producer.open()
    await worker.open()
    runner = worker._run()
    queues = [f"q{n}" for n in range(k)]

    def dump(name: str) -> None:
        _control(pid, "-i", "off")
        _control(pid, "-d", name)
        _control(pid, "-z")

    try:
        # Every script path once before counting (the first call of a script in a fresh Lua state differs).
        await producer.enqueue_many([_task("warm")])
        warm = await worker.claim(["warm"], 32, now=time.time(), lease_until=time.time() + 60)
        await worker.settle(
            [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=time.time()) for c in warm]
        )
        _control(pid, "-z")
        _control(pid, "-i", "on")
        for queue in queues:
            await producer.enqueue_many([_task(queue)])
        dump("enqueue")
        calls = []
        _control(pid, "-i", "on")
        for n, queue in enumerate(queues):
            alarm, call = f"{prefix}:u:cg{n}", worker._call_id()
            await runner.run("prepare_wait", [alarm, time_text(time.time()), "", "", call, queue])
            calls.append((alarm, call, queue))
        dump("prepare_wait")
        leases = []
        previous = ""
        _control(pid, "-i", "on")
        for alarm, call, queue in calls:
            now = time.time()
            args = [time_text(now), f"@{alarm}:t", time_text(now + 60), "32", call, previous, "0", queue]
            leases += claimed_tasks((await runner.run("claim", args))[1:])
            previous = call
        dump("claim")
        if len(leases) != k:
            raise RuntimeError(f"the waited claims leased {len(leases)} tasks, not {k}")
        _control(pid, "-i", "on")
        for lease in leases:
            await worker.settle(
                [Settlement(lease.record.id, lease.token, TaskState.SUCCEEDED, at=time.time())]
            )
        dump("settle")
    finally:
        await producer.clear()
        await producer.close()
        await worker.close()


def _counts(dump: Path) -> tuple[int, int]:
    """The dump's total instructions and those under ``evalShaCommand`` (0 when the binary has no symbol)."""
    total = 0
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            total = int(line.split()[1])
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True, text=True, check=True
    ).stdout
    for line in annotated.splitlines():
        if ":evalShaCommand " in line:
            return total, int(line.split()[0].replace(",", ""))
    return total, 0


def main() -> None:
    """Start the server, run the phases, print the counts per call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=100, help="calls per phase (default 100)")
    parser.add_argument("--redis-server", default=None, help="the redis-server binary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        with CallgrindRedis(find_redis_server(args.redis_server), Path(out)) as server:
            assert server.pid is not None
            asyncio.run(_drive(server.url, server.pid, args.k))
        dumps = {}
        for dump in Path(out).glob("cg.*.out.*"):
            for line in dump.read_text(errors="replace").splitlines()[:20]:
                if line.startswith("desc: Trigger: dump "):
                    dumps[line.removeprefix("desc: Trigger: dump ")] = dump
        for phase in PHASES:
            total, evalsha = _counts(dumps[phase])
            per_call, in_script = total / args.k / 1000, evalsha / args.k / 1000
            print(f"{phase:13} {per_call:7.1f}k instructions per call ({in_script:.1f}k in EVALSHA)")


if __name__ == "__main__":
    main()
