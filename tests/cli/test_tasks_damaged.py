"""`lifecycle tasks list/show/stats` on a store holding a damaged record (a field of the wrong type, written
by hand): the record is shown with what is damaged, and the other tasks as usual; nothing exits 1."""

from __future__ import annotations

import sqlite3
from urllib.parse import parse_qs, urlsplit

import anyio
import psycopg
from psycopg import sql

from tests.cli.cli_support import lifecycle, lifecycle_json, seed


def _damage(url: str, task_id: str) -> str:
    """Write a value of the wrong type into one field of the stored task; return the field's name."""
    parts = urlsplit(url)
    option = parse_qs(parts.query)
    if parts.scheme == "sqlite":
        with sqlite3.connect(parts.path) as connection:
            connection.execute("UPDATE lifecycle_tasks SET timeout = 'soon' WHERE id = ?", (task_id,))
        connection.close()
        return "timeout"
    if parts.scheme == "redis":
        import redis.asyncio as aioredis

        async def write() -> None:
            client = aioredis.Redis.from_url(url.split("?")[0])
            await client.hset(f"{{{option['prefix'][0]}}}:t:{task_id}", "m", b"\xff many")
            await client.aclose()

        anyio.run(write, backend="asyncio")
        return "max_retries"
    dsn = url.split("?")[0]
    table = sql.Identifier(option["schema"][0], "lifecycle_tasks")
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(sql.SQL("UPDATE {} SET enqueued_at = 'NaN' WHERE id = %s").format(table), (task_id,))
    return "enqueued_at"


def test_list_show_and_stats_show_a_damaged_record_beside_the_others(url: str) -> None:
    seeded = seed(url, succeeded=2, dead=["disk full"], pending=1)
    damaged = seeded.pending[0]
    field = _damage(url, damaged)

    rows = {row["id"]: row for row in lifecycle_json("tasks", "--backend", url, "list")}
    assert set(rows) == {*seeded.succeeded, *seeded.dead, damaged}
    assert f"field {field!r}" in rows[damaged]["damaged"]
    assert all(rows[task_id]["damaged"] is None for task_id in seeded.succeeded)

    table = lifecycle("tasks", "--backend", url, "list")
    assert table.returncode == 0, table.stderr
    assert f"damaged: field {field!r}" in table.stdout
    assert "ValueError: disk full" in table.stdout

    shown = lifecycle("tasks", "--backend", url, "show", damaged)
    assert shown.returncode == 0, shown.stderr
    assert "damaged" in shown.stdout
    assert f"field {field!r}" in shown.stdout
    assert lifecycle_json("tasks", "--backend", url, "show", damaged)["damaged"] == rows[damaged]["damaged"]

    stats = lifecycle_json("tasks", "--backend", url, "stats")
    assert sum(stats["total"].values()) == 4
