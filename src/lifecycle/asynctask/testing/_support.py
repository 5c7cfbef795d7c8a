"""Shared pieces of the backend conformance suite: fixtures, a fixed clock base, and record builders.

Private: backend authors use :class:`~lifecycle.asynctask.testing.BackendConformance`, not this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import ClassVar

import pytest

from .._backend import Backend
from .._records import ClaimedTask, NewTask, Settlement, TaskRecord, TaskState

__all__ = [
    "LEASE",
    "T0",
    "BackendFactory",
    "OpenBackend",
    "SuiteBase",
    "assert_fresh_record",
    "claim_one",
    "ids_of",
    "normalise_stats",
    "new_task",
    "seed",
]

BackendFactory = Callable[[], Awaitable[Backend]]
"""What a backend's test module provides as the ``backend_factory`` fixture: each call opens and returns a
backend object over the same (initially empty) storage."""

OpenBackend = Callable[[], Awaitable[Backend]]
"""The suite's ``open_backend`` fixture: calls the factory and remembers the object so it is closed after the
test."""

T0 = 1_000_000.0
"""The suite's clock base. Every state change passes an explicit time ``T0 + offset``, so no test waits for
the real clock (the ``wait_for_work`` tests are the exception: that method deals in real time)."""

LEASE = 30.0
"""Lease length the suite uses when the length itself does not matter."""


def new_task(
    task_id: str,
    *,
    name: str = "suite.job",
    queue: str = "default",
    payload: bytes | None = None,
    max_retries: int = 3,
    timeout: float | None = None,
    enqueued_at: float = T0,
    run_at: float | None = None,
    meta: str | None = None,
    priority: int = 0,
    concurrency_key: str | None = None,
    expires_at: float | None = None,
    unique_key: str | None = None,
    unique_until: float | None = None,
    group_id: str | None = None,
) -> NewTask:
    """A :class:`NewTask` with readable defaults: due at its ``enqueued_at``, payload derived from the id."""
    return NewTask(
        id=task_id,
        name=name,
        queue=queue,
        payload=payload if payload is not None else f"payload of {task_id}".encode(),
        max_retries=max_retries,
        timeout=timeout,
        enqueued_at=enqueued_at,
        run_at=run_at if run_at is not None else enqueued_at,
        meta=meta,
        priority=priority,
        concurrency_key=concurrency_key,
        expires_at=expires_at,
        unique_key=unique_key,
        unique_until=unique_until,
        group_id=group_id,
    )


def assert_fresh_record(record: TaskRecord | None, task: NewTask) -> None:
    """Assert that ``record`` is exactly what storing ``task`` must produce: a pending, never-claimed task."""
    assert record is not None, f"task {task.id!r} was stored but get() returned None"
    assert isinstance(record, TaskRecord), f"get() must return a TaskRecord, got {type(record).__name__}"
    expected = TaskRecord(
        id=task.id,
        name=task.name,
        queue=task.queue,
        payload=task.payload,
        state=TaskState.PENDING,
        attempts=0,
        max_retries=task.max_retries,
        timeout=task.timeout,
        enqueued_at=task.enqueued_at,
        run_at=task.run_at,
        meta=task.meta,
        priority=task.priority,
        concurrency_key=task.concurrency_key,
        expires_at=task.expires_at,
        group_id=task.group_id,
    )
    assert record == expected
    assert type(record.payload) is bytes, f"payload must be bytes, got {type(record.payload).__name__}"
    assert isinstance(record.state, TaskState), f"state must be a TaskState, got {record.state!r}"


def normalise_stats(stats: Mapping[str, Mapping[TaskState, int]]) -> dict[str, dict[TaskState, int]]:
    """``stats()`` without zero counts and empty queues (the protocol allows leaving them out)."""
    normalised: dict[str, dict[TaskState, int]] = {}
    for queue, counts in stats.items():
        non_zero = {TaskState(state): count for state, count in counts.items() if count}
        if non_zero:
            normalised[queue] = non_zero
    return normalised


async def claim_one(backend: Backend, task_id: str, *, now: float, lease_until: float) -> ClaimedTask:
    """Claim exactly the task ``task_id`` (it must be the only due task of its queue)."""
    record = await backend.get(task_id)
    assert record is not None, f"cannot claim {task_id!r}: get() returned None"
    claimed = await backend.claim([record.queue], 1, now=now, lease_until=lease_until)
    assert [c.record.id for c in claimed] == [task_id], f"expected to claim {task_id!r}, got {claimed!r}"
    return claimed[0]


async def seed(
    backend: Backend,
    tasks: Iterable[tuple[NewTask, TaskState]],
    *,
    at: float = T0 + 10.0,
    lease_until: float = T0 + 10.0 + LEASE,
) -> dict[str, str]:
    """Store ``tasks`` and drive each into its paired state, on empty storage. Returns the lease token of
    every task left ``ACTIVE``.

    Tasks meant to be claimed (``ACTIVE``, ``SUCCEEDED``, ``DEAD``) are enqueued and claimed first, at ``at``
    (their ``run_at`` must not be later); ``SUCCEEDED`` ones get result ``b"seeded result"``, ``DEAD`` ones
    error ``"seeded dead"``, both with ``finished_at = at``. Then ``PENDING`` and ``CANCELLED`` tasks are
    enqueued, in the given order, and the latter cancelled at ``at``.
    """
    items = list(tasks)
    to_claim = [task for task, state in items if state in _CLAIMED_STATES]
    later = [task for task, state in items if state not in _CLAIMED_STATES]
    target = {task.id: state for task, state in items}
    tokens: dict[str, str] = {}
    if to_claim:
        assert await backend.enqueue_many(to_claim) == [task.id for task in to_claim]
        queues = list(dict.fromkeys(task.queue for task in to_claim))
        claimed = await backend.claim(queues, len(to_claim), now=at, lease_until=lease_until)
        assert sorted(c.record.id for c in claimed) == sorted(task.id for task in to_claim), (
            "seeding: claim() did not return exactly the tasks just enqueued (was the storage empty?)"
        )
        settlements: list[Settlement] = []
        for claimed_task in claimed:
            state = target[claimed_task.record.id]
            if state is TaskState.ACTIVE:
                tokens[claimed_task.record.id] = claimed_task.token
            elif state is TaskState.SUCCEEDED:
                settlements.append(_settle(claimed_task, state, at, result=b"seeded result"))
            else:
                settlements.append(_settle(claimed_task, state, at, error="seeded dead"))
        assert await backend.settle(settlements) == set()
    if later:
        assert await backend.enqueue_many(later) == [task.id for task in later]
        to_cancel = [task.id for task in later if target[task.id] is TaskState.CANCELLED]
        if to_cancel:
            assert sorted(await backend.cancel(to_cancel, now=at)) == sorted(to_cancel)
    return tokens


_CLAIMED_STATES = frozenset({TaskState.ACTIVE, TaskState.SUCCEEDED, TaskState.DEAD})


def _settle(
    claimed: ClaimedTask,
    state: TaskState,
    at: float,
    *,
    result: bytes | None = None,
    error: str | None = None,
) -> Settlement:
    return Settlement(
        task_id=claimed.record.id, token=claimed.token, state=state, at=at, result=result, error=error
    )


class SuiteBase:
    """Fixtures every part of the suite shares. Needs the ``backend_factory`` fixture from the subclass.

    Every test is marked for anyio's pytest plugin, so it runs once per value of the ``anyio_backend``
    fixture visible to the subclass (anyio's default, or the test project's own override).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    async def open_backend(self, backend_factory: BackendFactory) -> AsyncIterator[OpenBackend]:
        """An async callable that opens one more backend object over the test's storage; every object it
        returned is closed after the test."""
        async with contextlib.AsyncExitStack() as stack:

            async def open_one() -> Backend:
                backend = await backend_factory()
                stack.push_async_callback(backend.close)
                return backend

            yield open_one

    @pytest.fixture
    async def backend(self, open_backend: OpenBackend) -> Backend:
        """One opened backend object over the test's (empty) storage."""
        return await open_backend()


def ids_of(claimed: Sequence[ClaimedTask]) -> list[str]:
    """The task ids of claimed tasks, in the order the backend returned them."""
    return [c.record.id for c in claimed]
