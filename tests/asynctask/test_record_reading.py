"""Reading stored records: the fast path (one per claimed task) reads exactly the record the field-by-field
reader reads, and leaves everything unusual to it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lifecycle.asynctask._records import (
    RECORD_FIELDS,
    ClaimedTask,
    Notice,
    TaskRecord,
    TaskState,
    _new_record,
    _RecordReader,
    _row_as_written,
    _text_as_written,
    new_claimed_task,
    new_notice,
    record_from_row,
    record_from_text,
)

_TEXTS = ("id", "name", "queue", "last_error", "meta", "concurrency_key", "progress_message", "group_id")
_BLOBS = ("payload", "result")

_NUMBER_TEXTS = [b"", b"0", b"1", b"2", b"-1", b"1.5", b"-0.0", b"1e308", b"1.7e308", b"-1.7e308", b"inf"]
_NUMBER_TEXTS += [
    b"-inf",
    b"nan",
    b"NaN",
    b" 2 ",
    b"1_0",
    b"x",
    b"0x10",
    b"\xff",
    b"\xd9\xa3",
    b"1700000000.25",
]
_NUMBER_TEXTS += [b"9" * 15, b"9" * 16, b"-" + b"9" * 15, b"-" + b"9" * 16]
numbers = st.one_of(
    st.none(),
    st.sampled_from(_NUMBER_TEXTS),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda number: repr(number).encode()),
    st.integers(-(10**17), 10**17).map(lambda number: str(number).encode()),
)
texts = st.one_of(st.none(), st.sampled_from([b"", b"a", b"caf\xc3\xa9", b"\xff", b"\xed\xa0\x80"]))
blobs = st.one_of(st.none(), st.binary(max_size=6))
states = st.one_of(st.none(), st.sampled_from([b"pending", b"active", b"succeeded", b"dead", b"bogus", b""]))

HEALTHY: list[Any] = [
    b"t1", b"noop", b"default", b"[1]", b"active", b"1", b"5", b"", b"1700000000.5", b"1700000000.5",
    b"1700000001", b"", b"1700000031", None, None, None, b"0", None, b"", b"0", b"", b"", None, None,
]  # fmt: skip


def _field(name: str) -> st.SearchStrategy[Any]:
    if name in _TEXTS:
        return texts
    if name in _BLOBS:
        return blobs
    if name == "state":
        return states
    return numbers


stored_values = st.tuples(*(_field(name) for name in RECORD_FIELDS)).map(list)


def test_a_healthy_record_takes_the_fast_path() -> None:
    record = _text_as_written(HEALTHY)
    assert record == _RecordReader(bytes, textual=True).read(HEALTHY)
    assert (record.attempts, record.timeout, record.finished_at, record.priority) == (1, None, None, 0)


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(stored_values)
@example(HEALTHY)
@example([*HEALTHY[:7], b"nan", *HEALTHY[8:]])  # timeout
@example([*HEALTHY[:7], b"-1", *HEALTHY[8:]])
@example([*HEALTHY[:12], b"", *HEALTHY[13:]])  # active without a lease
@example([*HEALTHY[:8], b"1.7e308", b"1.7e308", *HEALTHY[10:]])  # finite values whose sum overflows
@example([*HEALTHY[:16], b"-12", *HEALTHY[17:]])  # a negative priority
@example([*HEALTHY[:19], b"1", *HEALTHY[20:]])  # cancel requested
@example([*HEALTHY[:19], b"2", *HEALTHY[20:]])
@example([*HEALTHY[:20], b"inf", *HEALTHY[21:]])  # progress
def test_stored_text_reads_as_the_field_by_field_reader_reads_it(values: list[Any]) -> None:
    # Equal records: the same values, and a fault exactly when the reader finds one (the fast path refuses
    # every record the reader faults, and what it refuses the reader reads).
    assert record_from_text(values) == _RecordReader(bytes, textual=True).read(values)


# A SQL row (SQLite's or PostgreSQL's values): every column any type a driver hands back.
sql_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**16), 10**16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "a", "café", "\udcff", "pending", "active", "bogus"]),
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
)
HEALTHY_ROW: list[Any] = [
    "t1", "noop", "default", b"[1]", "active", 1, 5, None, 1700000000.5, 1700000000.5, 1700000001.0, None,
    1700000031.0, None, None, None, 0, None, None, 0, None, None, None, None,
]  # fmt: skip


def test_a_healthy_row_takes_the_fast_path() -> None:
    record = _row_as_written(HEALTHY_ROW, bytes)
    assert record == _RecordReader(bytes, textual=False).read(HEALTHY_ROW)
    assert (record.state, record.attempts, record.lease_until, record.fault) == (
        TaskState.ACTIVE,
        1,
        1700000031.0,
        None,
    )


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(RECORD_FIELDS) - 1), sql_values), max_size=3))
@example([(7, 2)])  # an integer timeout
@example([(7, float("inf"))])
@example([(8, 1.7e308), (9, 1.7e308)])  # finite values whose sum overflows
@example([(0, "caf\u00e9"), (1, "\udcff")])  # text that is not ASCII, or not UTF-8
@example([(16, -12), (16, 10**15), (16, True)])  # priorities
@example([(19, 1), (19, 2), (19, 0.0)])  # cancel requested
@example([(3, bytearray(b"[1]")), (14, b"r")])  # blobs
def test_a_sql_row_reads_as_the_field_by_field_reader_reads_it(changes: list[tuple[int, Any]]) -> None:
    # The healthy row with a few columns changed: equal records, a fault exactly when the reader finds one.
    row = list(HEALTHY_ROW)
    for index, value in changes:
        row[index] = value
    assert record_from_row(row) == _RecordReader(bytes, textual=False).read(row)


def test_the_positional_builders_make_what_the_classes_make() -> None:
    values = [getattr(_text_as_written(HEALTHY), each.name) for each in dataclasses.fields(TaskRecord)]
    record = _new_record(*values)
    assert type(record) is TaskRecord
    assert record == TaskRecord(*values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.id = "other"  # type: ignore[misc]
    claimed = new_claimed_task("token", record)
    assert (type(claimed), claimed) == (ClaimedTask, ClaimedTask("token", record))
    notice = new_notice("settled", "t-1")
    assert (type(notice), notice, hash(notice)) == (
        Notice,
        Notice("settled", "t-1"),
        hash(Notice("settled", "t-1")),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        notice.task_id = "other"  # type: ignore[misc]
