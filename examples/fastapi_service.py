"""A web service as people write them: FastAPI on hypercorn, a PostgreSQL pool, durable background tasks.

    pip install "anyio-lifecycle[asgi,postgres]" fastapi
    python examples/fastapi_service.py          # API on http://127.0.0.1:8000/docs, probes on :8081

    curl -X POST 127.0.0.1:8000/users -H 'content-type: application/json' -d '{"email": "ada@example.com"}'
    curl 127.0.0.1:8000/users/1                 # "welcomed": true once the welcome task has run
    curl 127.0.0.1:8081/readyz                  # ready; 503 while starting or draining

One ``lifecycle.run`` owns the process: the parts start in order (probes, database pool, task worker, HTTP
server), SIGTERM turns readiness false, the HTTP server keeps serving through the drain, then stops accepting
and gives the requests in flight ``--grace`` seconds, and the parts stop in reverse: the pool closes only
after the HTTP server and the worker are done with it.

``POST /users`` inserts the user and enqueues its welcome task in the same transaction (``connection=``): a
task exists if and only if its user does, even if the process dies in between. The worker (in this process;
add more with ``lifecycle worker``) runs it.

The database comes from ``--dsn`` or ``$LIFECYCLE_POSTGRES_DSN`` (default: the local server,
``postgresql://postgres@127.0.0.1:5432/test``); the tables live in the schema ``--schema``, created on first
use. PostgreSQL support is asyncio-only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import anyio
import psycopg
from fastapi import FastAPI, HTTPException
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

import lifecycle
from lifecycle.asynctask import AsyncTasks, TaskContext
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.tasks import ASGIServer, HealthServer

DEFAULT_DSN = os.environ.get("LIFECYCLE_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

logger = logging.getLogger("shop")


class Database:
    """The connection pool as a Task: opened in initialize, closed in cleanup (after all that uses it)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.schema = schema
        self.pool = AsyncConnectionPool(dsn, open=False, min_size=1, max_size=10)

    async def initialize(self) -> None:
        await self.pool.open(wait=True, timeout=10)
        async with self.pool.connection() as conn:
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id serial PRIMARY KEY, email text UNIQUE NOT NULL, "
                    "welcomed boolean NOT NULL DEFAULT false)"
                ).format(self.users)
            )
        logger.info("database: pool open")

    async def execute(self) -> None:
        await anyio.sleep_forever()  # a pool has no work of its own

    async def cleanup(self) -> None:
        await self.pool.close()
        logger.info("database: pool closed")

    @property
    def users(self) -> sql.Identifier:
        return sql.Identifier(self.schema, "users")


class NewUser(BaseModel):
    email: str


def build(
    dsn: str, schema: str, *, host: str, port: int, health_port: int, drain_delay: float, grace: float
) -> lifecycle.TaskManager:
    """The service: the parts are initialized in the order added and cleaned up in reverse."""
    database = Database(dsn, schema)
    tasks = AsyncTasks(PostgresBackend(dsn, schema=schema), concurrency=10)
    app = FastAPI(title="shop")

    @tasks.register(name="shop.send_welcome", max_retries=5)
    async def send_welcome(ctx: TaskContext, user_id: int) -> None:
        # The real e-mail call would go here; a failure is retried with backoff, up to 5 times.
        async with database.pool.connection() as conn:
            await conn.execute(
                sql.SQL("UPDATE {} SET welcomed = true WHERE id = %s").format(database.users), (user_id,)
            )
        ctx.logger.info("welcomed user %d (attempt %d)", user_id, ctx.attempt)

    @app.post("/users")
    async def create_user(user: NewUser) -> dict[str, object]:
        async with database.pool.connection() as conn:
            try:
                async with conn.transaction():
                    cursor = await conn.execute(
                        sql.SQL("INSERT INTO {} (email) VALUES (%s) RETURNING id").format(database.users),
                        (user.email,),
                    )
                    row = await cursor.fetchone()
                    assert row is not None
                    # In the same transaction: no user without its task, no task without its user.
                    task_id = await tasks.enqueue(send_welcome, row[0], connection=conn)
            except psycopg.errors.UniqueViolation:
                raise HTTPException(409, f"{user.email} is already registered") from None
        return {"id": row[0], "welcome_task": task_id}

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, object]:
        async with database.pool.connection() as conn:
            cursor = await conn.execute(
                sql.SQL("SELECT id, email, welcomed FROM {} WHERE id = %s").format(database.users), (user_id,)
            )
            row = await cursor.fetchone()
        if row is None:
            raise HTTPException(404, f"no user {user_id}")
        return {"id": row[0], "email": row[1], "welcomed": row[2]}

    @app.get("/report")
    async def report(seconds: float = 2.0) -> dict[str, object]:
        """A slow request: one in flight at SIGTERM still completes (within --grace)."""
        logger.info("report: started (%g s)", seconds)
        await anyio.sleep(seconds)
        async with database.pool.connection() as conn:
            cursor = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(database.users))
            row = await cursor.fetchone()
        logger.info("report: done")
        return {"users": row[0] if row else 0}

    # Each stage has a bound, so the whole stop fits the orchestrator's grace period (docs/deployment.md).
    manager = lifecycle.TaskManager(
        name="shop", drain_delay=drain_delay, shutdown_timeout=grace + 20, cleanup_timeout=5
    )
    manager.add_task("health", HealthServer(manager, host, health_port))  # first: answers probes to the end
    manager.add_task("database", database)
    manager.add_task("tasks", tasks)  # the worker; drains its in-flight tasks at shutdown
    # Last: it serves once everything it needs is ready, and stops first.
    manager.add_task("http", ASGIServer(app, host=host, port=port, grace=grace))
    return manager


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--schema", default="lifecycle_fastapi")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="the API's port (0: any free port)")
    parser.add_argument("--health-port", type=int, default=8081, help="the probes' port (0: any free port)")
    parser.add_argument("--drain-delay", type=float, default=3.0, help="seconds of serving while not ready")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds for the requests in flight")
    args = parser.parse_args()
    manager = build(
        args.dsn,
        args.schema,
        host=args.host,
        port=args.port,
        health_port=args.health_port,
        drain_delay=args.drain_delay,
        grace=args.grace,
    )
    return lifecycle.run(manager)


if __name__ == "__main__":
    sys.exit(main())
