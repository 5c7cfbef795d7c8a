"""WAL frames (pages) a single awaited SQLite enqueue writes, per b-tree, between versions of this library.

    python benchmarks/sqlite_wal_pages.py --refs main,WORKTREE --n 1000

Each ``--refs`` entry is exported as by ``ab_drain.py`` (``WORKTREE``: the files as they are now). For each,
a fresh process opens a fresh file with ``AsyncTasks(SQLiteBackend(path), execution=False)``, enqueues 50
untimed tasks, then ``--n`` single ``enqueue`` calls one after another; the WAL then holds every frame those
calls wrote (``--n`` must stay below ~1 000, so that the WAL passes no checkpoint: the thread connection
checkpoints past 4 000 pages). The frames are read from the ``-wal`` file (each names its page) and counted
by the b-tree that owns the page (from SQLite's ``dbstat``; page 1 is ``sqlite_schema``). Prints frames per
enqueue, in all and per b-tree and page type; the type is the page's at the end of the run (a page written as
a leaf may be an interior page by then), so the split between the two is approximate, the totals are not.
The counts vary little between runs (only the random task ids differ), so one run per version is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_drain import export

CHILD = r"""
import json, os, sqlite3, struct, sys, anyio
from lifecycle.asynctask import AsyncTasks, SQLiteBackend

path, n = sys.argv[1], int(sys.argv[2])

async def noop(index: int) -> None:
    pass

async def main():
    tasks = AsyncTasks(SQLiteBackend(path), execution=False)
    tasks.register(noop, name="noop")
    async with tasks:
        for i in range(50):
            await tasks.enqueue("noop", -i)
        start = os.path.getsize(path + "-wal")
        for i in range(n):
            await tasks.enqueue("noop", i)
        with open(path + "-wal", "rb") as wal:  # before the close, which checkpoints and removes it
            data = wal.read()
        reader = sqlite3.connect(path)
        pages = reader.execute("SELECT name, pageno, pagetype FROM dbstat").fetchall()
        reader.close()
    return data, start, pages

data, start, pages = anyio.run(main)
page_size = struct.unpack(">I", data[8:12])[0]
frames = []
offset = max(start, 32)
while offset + 24 + page_size <= len(data):
    frames.append(struct.unpack(">I", data[offset : offset + 4])[0])
    offset += 24 + page_size
owner = {page: f"{name} {kind}" for name, page, kind in pages}
counts = {}
for page in frames:
    key = owner.get(page, f"page {page}")
    counts[key] = counts.get(key, 0) + 1
print(json.dumps({"frames": len(frames), "by_btree": counts}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default="main,WORKTREE", help="comma-separated git revisions (or WORKTREE)")
    parser.add_argument("--n", type=int, default=1_000, help="single enqueues counted (default 1000)")
    args = parser.parse_args(argv)
    if not 0 < args.n <= 1_000:
        parser.error("--n must be between 1 and 1000 (a larger run would pass a WAL checkpoint)")
    refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    with tempfile.TemporaryDirectory(prefix="sqlite-wal-pages-") as tmp:
        scratch = Path(tmp)
        sources = {ref: export(ref, scratch / "trees") for ref in refs}
        for index, ref in enumerate(refs):
            path = scratch / f"run-{index}.db"
            completed = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(args.n)],
                env={**os.environ, "PYTHONPATH": str(sources[ref])},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if completed.returncode != 0:
                raise SystemExit(f"the run of {ref} failed:\n{completed.stderr[-2000:]}")
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"{ref}: {result['frames'] / args.n:.2f} WAL frames per single enqueue")
            for key, count in sorted(result["by_btree"].items(), key=lambda item: -item[1]):
                print(f"    {count / args.n:6.3f}  {key}")


if __name__ == "__main__":
    main()
