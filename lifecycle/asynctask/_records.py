"""The records a backend stores and exchanges with the worker engine.

These are the nouns of the :class:`~lifecycle.asynctask.Backend` protocol. All times are seconds since the
epoch (``time.time()`` style floats) supplied by the engine's clock, so backends never read the clock for
state changes and tests can drive time explicitly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RECORD_COLUMNS",
    "ClaimedTask",
    "NewTask",
    "Settlement",
    "TaskRecord",
    "TaskState",
    "record_from_row",
]


class TaskState(str, enum.Enum):
    """Where a task is in its life.

    ``PENDING`` includes tasks waiting for their ``run_at`` (delayed, or waiting for a retry).
    ``ACTIVE`` tasks are leased to a worker. ``SUCCEEDED``, ``DEAD`` and ``CANCELLED`` are final.
    """

    PENDING = "pending"
    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for ``SUCCEEDED``, ``DEAD`` and ``CANCELLED``."""
        return self in _FINAL_STATES

    @property
    def is_live(self) -> bool:
        """True for ``PENDING`` and ``ACTIVE``: a task that will still run or is running."""
        return not self.is_final


_FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to store, as the engine hands it to :meth:`Backend.enqueue_many`.

    ``payload`` is the encoded argument list; ``meta`` is opaque text owned by the engine (chain and
    schedule bookkeeping) that backends store and return unchanged.
    """

    id: str
    name: str
    queue: str
    payload: bytes
    max_retries: int
    timeout: float | None
    enqueued_at: float
    run_at: float
    meta: str | None = None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A stored task as a backend returns it for inspection.

    ``attempts`` counts claims: every time a worker took the task, including attempts whose worker died.
    ``lease_until`` is set while the task is ``ACTIVE``.

    ``fault`` is set by a backend that could not read the stored record whole (a field of the wrong type, a
    missing field, text that is not UTF-8): it says which field holds what, the unreadable fields hold
    placeholders, and the record is still returned, never dropped. The engine makes a claimed record with a
    fault ``DEAD`` with that reason instead of running it; inspection shows it.
    """

    id: str
    name: str
    queue: str
    payload: bytes
    state: TaskState
    attempts: int
    max_retries: int
    timeout: float | None
    enqueued_at: float
    run_at: float
    started_at: float | None = None
    finished_at: float | None = None
    lease_until: float | None = None
    last_error: str | None = None
    result: bytes | None = None
    meta: str | None = None
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task leased to a worker. ``token`` identifies this lease; settling needs it."""

    token: str
    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Settlement:
    """The engine's verdict on a claimed task, applied by :meth:`Backend.settle`.

    - ``state=PENDING``: run again at ``run_at`` (a retry, or a release at shutdown). With
      ``refund_attempt=True`` the claim that is being settled does not count as an attempt.
    - ``state=SUCCEEDED``: done; ``result`` is the encoded return value, or ``None``.
    - ``state=DEAD``: failed for good; ``error`` says why.

    ``error`` replaces the task's ``last_error`` when it is not ``None``. ``at`` is the time of the
    settlement (it becomes ``finished_at`` for final states). ``then`` holds tasks that are enqueued in the
    same atomic step as this settlement (the next step of a chain); a follow-up whose id already exists in
    any state is skipped, so applying a chain step twice never duplicates it.
    """

    task_id: str
    token: str
    state: TaskState
    at: float
    run_at: float | None = None
    error: str | None = None
    result: bytes | None = None
    refund_attempt: bool = False
    then: tuple[NewTask, ...] = field(default=())


RECORD_COLUMNS = (
    "id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at, "
    "started_at, finished_at, lease_until, last_error, result, meta"
)
"""The column order :func:`record_from_row` reads: the fields of :class:`TaskRecord`, in order."""


def record_from_row(row: Sequence[Any], blob: Callable[[Any], bytes] = bytes) -> TaskRecord:
    """Build a :class:`TaskRecord` from a SQL row in :data:`RECORD_COLUMNS` order; ``blob`` turns the
    driver's binary values (payload, result) into ``bytes``."""
    result = row[14]
    return TaskRecord(
        id=row[0],
        name=row[1],
        queue=row[2],
        payload=blob(row[3]),
        state=TaskState(row[4]),
        attempts=row[5],
        max_retries=row[6],
        timeout=row[7],
        enqueued_at=row[8],
        run_at=row[9],
        started_at=row[10],
        finished_at=row[11],
        lease_until=row[12],
        last_error=row[13],
        result=None if result is None else blob(result),
        meta=row[15],
    )
