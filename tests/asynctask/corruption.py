"""Write raw values into stored task records, past every check of the backends: the ``corrupt_field`` hooks
of the conformance suites' test classes and the record fuzzer share these.

Each writer takes a :class:`~lifecycle.asynctask.TaskRecord` field name (not ``id``) and a raw value (text,
bytes, a number, ``None`` for no value, or :class:`NotUtf8Text`) and returns ``False`` when the storage
cannot hold that value in that field (a typed column or a constraint refuses it).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import anyio.to_thread

from lifecycle.asynctask._backends.redis._codec import RECORD_FIELDS as REDIS_FIELDS
from lifecycle.asynctask._records import RECORD_FIELDS

__all__ = ["FIELDS", "NotUtf8Text", "corrupt_nats", "corrupt_postgres", "corrupt_redis", "corrupt_sqlite"]

FIELDS = tuple(field for field in RECORD_FIELDS if field != "id")
"""Every field a damaged record may have damaged (the id is the record's key, not a value in it)."""


class NotUtf8Text(bytes):
    """Bytes stored as text rather than as binary: text that is not UTF-8 (SQLite keeps it as TEXT)."""


def _check(field: str) -> None:
    if field not in FIELDS:
        raise ValueError(f"cannot damage {field!r}: choose one of {', '.join(FIELDS)}")


async def corrupt_sqlite(path: str, task_id: str, field: str, raw: object) -> bool:
    """Write ``raw`` into column ``field`` of the task's row in the SQLite file ``path``."""
    _check(field)
    value = "CAST(? AS TEXT)" if isinstance(raw, NotUtf8Text) else "?"
    parameter = bytes(raw) if isinstance(raw, NotUtf8Text) else raw

    def write() -> bool:
        connection = sqlite3.connect(path, timeout=10.0)
        try:
            with connection:
                connection.execute(
                    f"UPDATE lifecycle_tasks SET {field} = {value} WHERE id = ?", (parameter, task_id)
                )
        except (sqlite3.IntegrityError, OverflowError):  # NOT NULL, or an integer SQLite cannot hold
            return False
        finally:
            connection.close()
        return True

    return await anyio.to_thread.run_sync(write)


async def corrupt_redis(client: Any, key_prefix: str, task_id: str, field: str, raw: object) -> bool:
    """Write ``raw`` into the task's record hash through the redis-py ``client``: ``None`` deletes the
    field, text is stored as UTF-8, a number as its decimal text."""
    _check(field)
    name = REDIS_FIELDS[FIELDS.index(field)]
    key = f"{key_prefix}t:{task_id}"
    if raw is None:
        await client.hdel(key, name)
        return True
    if isinstance(raw, bytes):
        value = bytes(raw)
    elif isinstance(raw, str):
        try:
            value = raw.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(raw, float):
        value = repr(raw).encode()
    elif isinstance(raw, int):
        value = str(raw).encode()
    else:
        raise TypeError(f"cannot store {raw!r} in Redis")
    await client.hset(key, name, value)
    return True


_PG_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "queue": (str,),
    "state": (str,),
    "last_error": (str,),
    "meta": (str,),
    "payload": (bytes,),
    "result": (bytes,),
    "attempts": (int,),
    "max_retries": (int,),
    "priority": (int,),
    "concurrency_key": (str,),
    "cancel_requested": (bool,),
    "progress_message": (str,),
    "group_id": (str,),
}


async def corrupt_postgres(dsn: str, schema: str, task_id: str, field: str, raw: object) -> bool:
    """Write ``raw`` into column ``field`` of the task's row, when its Python type is the column's own
    (PostgreSQL would otherwise convert it, e.g. round a float into an integer column, or refuse it)."""
    import psycopg
    from psycopg import sql

    _check(field)
    if raw is not None:
        wanted = _PG_TYPES.get(field, (float, int))
        if type(raw) not in wanted or isinstance(raw, NotUtf8Text):
            return False
    query = sql.SQL("UPDATE {} SET {} = %s WHERE id = %s").format(
        sql.Identifier(schema, "lifecycle_tasks"), sql.Identifier(field)
    )
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            await connection.execute(query, (raw, task_id))
    except (psycopg.DataError, psycopg.IntegrityError, UnicodeEncodeError):
        return False
    return True


async def corrupt_nats(url: str, prefix: str, task_id: str, field: str, raw: object) -> bool:
    """Append a transaction to the prefix's log that sets ``field`` of the task's row to ``raw`` as it is
    (JSON: text, a number, ``None``; bytes tagged as bytes; :class:`NotUtf8Text` as text holding the
    undecodable bytes), written as the backend writes: right after the log's last message. Every process
    following the log applies it."""
    import json

    import nats
    import nats.js.errors

    from lifecycle.asynctask._backends.nats._codec import FIELD_INDEX, FORMAT, encode_value
    from lifecycle.asynctask._backends.nats._log import Names

    _check(field)
    value: object = raw
    if isinstance(raw, NotUtf8Text):
        value = bytes(raw).decode("utf-8", "surrogateescape")
    names = Names(prefix)
    body = json.dumps(
        {
            "v": FORMAT,
            "t": "corrupt",
            "n": 0,
            "of": 1,
            "ops": [["u", task_id, {str(FIELD_INDEX[field]): encode_value(value)}]],
        }
    ).encode()
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        while True:
            last = (await js.stream_info(names.log_stream)).state.last_seq
            try:
                await js.publish(names.log_subject, body, headers={"Nats-Expected-Last-Sequence": str(last)})
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == 10071:  # another writer was first: write after it
                    continue
                raise
            return True
    finally:
        await client.close()
