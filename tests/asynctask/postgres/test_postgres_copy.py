"""The binary COPY stream of new tasks built column by column (``_copy.copy_data``) is byte for byte what
psycopg's ``write_row`` writes for the general path's rows, or it declines (hypothesis over the fields)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg._copy_base import BinaryFormatter
from psycopg.adapt import Transformer
from psycopg.pq import Format

from lifecycle.asynctask._backends.postgres import _ops
from lifecycle.asynctask._backends.postgres._copy import copy_data
from lifecycle.asynctask._backends.postgres._ops import _copy_row
from lifecycle.asynctask._records import NewTask

from ._support import OpenPostgres

_OIDS = {"text": 25, "bytea": 17, "int4": 23, "int8": 20, "float8": 701}


def _psycopg_stream(tasks: list[NewTask]) -> bytes:
    """What ``_ops._copy_new``'s general path sends: ``write_row`` of each ``_copy_row``."""
    from lifecycle.asynctask._backends.postgres._sql import COPY_TYPES

    transformer = Transformer()
    transformer.set_dumper_types([_OIDS[name] for name in COPY_TYPES], Format.BINARY)
    formatter = BinaryFormatter(transformer)
    out = bytearray()
    for task in tasks:
        out += formatter.write_row(_copy_row(task))
    out += formatter.end()
    return bytes(out)


def _task(n: int, now: float = 1_700_000_000.25, **fields: Any) -> NewTask:
    values: dict[str, Any] = {
        "id": f"{n:032x}",
        "name": "tests.job",
        "queue": "default",
        "payload": b'{"__lifecycle__":"tuple","v":[' + str(n).encode() + b"]}",
        "max_retries": 3,
        "timeout": None,
        "enqueued_at": now,
        "run_at": now,
    }
    values.update(fields)
    return NewTask(**values)


def test_a_usual_bulk_batch_is_written_by_the_column_builder_as_psycopg_writes_it() -> None:
    tasks = [_task(n) for n in range(300)]
    data = copy_data(tasks, "utf-8")
    assert data is not None, "the usual batch takes the fast path"
    assert data == _psycopg_stream(tasks)


_text = st.text(max_size=12)  # no surrogates: they cannot be encoded
_floats = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0, 2.5]) | st.integers(-(2**53), 2**53)
_opt_text = st.none() | st.sampled_from(["", "a", "é", "k\x00"]) | _text


@st.composite
def _batches(draw: st.DrawFn) -> list[NewTask]:
    size = draw(st.integers(1, 6))

    def column(strategy: st.SearchStrategy[Any]) -> list[Any]:
        # Often one value throughout (the columns the builder packs once), else one per row.
        if draw(st.booleans()):
            return [draw(strategy)] * size
        return [draw(strategy) for _ in range(size)]

    fields: dict[str, list[Any]] = {
        "id": column(st.sampled_from(["a", "bb", "x\x00"]) | _text),
        "name": column(_text),
        "queue": column(_text),
        "payload": column(st.binary(max_size=10) | st.builds(bytearray, st.binary(max_size=4))),
        "max_retries": column(st.integers(-(2**31) - 1, 2**31) | st.booleans()),
        "timeout": column(st.none() | _floats),
        "enqueued_at": column(_floats),
        "run_at": column(_floats),
        "meta": column(_opt_text),
        "priority": column(st.integers(-(2**63) - 1, 2**63) | st.sampled_from([0, 1, -1])),
        "concurrency_key": column(_opt_text),
        "expires_at": column(st.none() | _floats),
        "group_id": column(_opt_text),
    }
    return [NewTask(**{name: values[i] for name, values in fields.items()}) for i in range(size)]


@settings(max_examples=400, deadline=None)
@given(_batches())
def test_the_column_builder_writes_what_write_row_writes_or_declines(tasks: list[NewTask]) -> None:
    try:
        expected: bytes | None = _psycopg_stream(tasks)
    except Exception:
        expected = None  # the general path refuses the batch (its own error, raised by _ops)
    data = copy_data(tasks, "utf-8")
    if data is not None:
        assert expected is not None, "a batch the general path refuses is left to it"
        assert data == expected


def test_a_nan_and_signed_zeros_are_written_bit_for_bit() -> None:
    tasks = [_task(n, enqueued_at=value) for n, value in enumerate([0.0, -0.0, math.nan, math.inf, -0.0])]
    data = copy_data(tasks, "utf-8")
    assert data is not None
    assert data == _psycopg_stream(tasks)
    same = [_task(n, timeout=-0.0) for n in range(3)]
    assert copy_data(same, "utf-8") == _psycopg_stream(same)


def test_values_left_to_the_general_path() -> None:
    assert copy_data([_task(0, id="nul\x00")], "utf-8") is None
    assert copy_data([_task(0, payload=bytearray(b"x"))], "utf-8") is None
    assert copy_data([_task(0, max_retries=2**31)], "utf-8") is None
    assert copy_data([], "utf-8") is None


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_bulk_batch_goes_by_the_column_builder_and_stores_what_the_general_path_stores(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[bool] = []

    def spy(tasks: list[NewTask], encoding: str) -> bytes | None:
        data = copy_data(tasks, encoding)
        built.append(data is not None)
        return data

    monkeypatch.setattr(_ops, "copy_data", spy)
    backend = await open_pg(pool_size=1)
    now = 1_700_000_000.5
    fields: dict[str, Any] = {"meta": "m\u00e9ta", "priority": -2, "concurrency_key": "k"}
    fast = [_task(n, now, timeout=float(n % 3), expires_at=now + 9, **fields) for n in range(300)]
    # The same tasks with bytearray payloads (bytes-like, which the general path takes by bytes()):
    # declined by the builder, written by psycopg's dumpers.
    general = [
        replace(task, id=f"g{n}", payload=bytearray(task.payload))  # type: ignore[arg-type]
        for n, task in enumerate(fast)
    ]
    assert await backend.enqueue_many(fast) == [task.id for task in fast]
    assert await backend.enqueue_many(general) == [task.id for task in general]
    assert built == [True, False]
    for n in (0, 1, 2, 299):
        one, other = await backend.get(fast[n].id), await backend.get(general[n].id)
        assert one is not None
        assert other is not None
        assert one.payload == fast[n].payload
        assert replace(one, id="") == replace(other, id="")


async def test_a_wake_up_that_fails_after_the_copy_leaves_the_batch_stored_and_reported_stored(
    open_pg: OpenPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """The COPY commits on its own (autocommit), and the wake-up follows: when that fails, the tasks are
    stored, so the call returns their ids (a caller retrying a failed call would store them twice) and says
    so in the log."""
    backend = await open_pg(pool_size=1)
    statements = backend._statements
    backend._statements = replace(statements, notify_queues=b"SELECT no_such_function(%s, %s)")
    tasks = [_task(n, 1_700_000_000.5) for n in range(300)]
    assert await backend.enqueue_many(tasks) == [task.id for task in tasks]
    backend._statements = statements
    assert all([await backend.get(task.id) is not None for task in (tasks[0], tasks[-1])])
    assert "the wake-up after it failed (UndefinedFunction)" in caplog.text
