"""Conformance rules for :meth:`Backend.wait_for_work`, the only method that deals in real time.

Every test bounds its wait generously (``PROMPT`` seconds) while passing a long ``timeout`` (``LONG``), so a
backend that ignores the event it should react to fails clearly instead of passing by timing out. No test
sleeps; the cancellation test cancels a wait once it has begun, as a stopping worker would. Only the due
time of a delayed task (0.3 s) and a short ``timeout`` are real time: that is what the method deals in.
"""

from __future__ import annotations

import time

import anyio
import anyio.abc
import anyio.lowlevel

from ..._backend import Backend
from ..._records import Settlement, TaskState
from .._support import LEASE, OpenBackend, SuiteBase, claim_one, new_task

__all__ = ["WaitRules"]

PROMPT = 10.0
"""How long a backend may take to notice new work before the suite calls it a failure (generous on purpose:
the machine may be busy; a polling backend with a sub-second interval passes easily)."""

LONG = 120.0
"""The ``timeout`` the suite passes when the wait must end because of work, not because of the timeout."""


async def _work_loop_in_background(
    group: anyio.abc.TaskGroup, backend: Backend, claimed: anyio.Event
) -> None:
    """Run the engine's idle loop in ``group`` (claim; when nothing is due, ``wait_for_work``; repeat) and
    return once the first claim found nothing and the loop has entered ``wait_for_work``, so the event the
    test causes next happens while it waits. ``claimed`` is set when the loop claimed a task.

    A backend that checks for due work and then subscribes must not lose an event between the two: that race
    is the backend's to close, not the suite's."""
    entered = anyio.Event()

    async def loop() -> None:
        while not await backend.claim(["default"], 1, now=time.time(), lease_until=time.time() + LEASE):
            entered.set()
            await backend.wait_for_work(["default"], timeout=LONG)
        claimed.set()

    group.start_soon(loop)
    await entered.wait()
    await anyio.lowlevel.checkpoint()


class WaitRules(SuiteBase):
    """``wait_for_work``: wakes on enqueues, releases and due times seen through other objects; times out."""

    async def test_wait_for_work_returns_after_an_enqueue_through_another_backend_object(
        self, open_backend: OpenBackend
    ) -> None:
        waiter = await open_backend()
        producer = await open_backend()
        claimed = anyio.Event()
        with anyio.move_on_after(PROMPT) as deadline:
            async with anyio.create_task_group() as group:
                await _work_loop_in_background(group, waiter, claimed)
                now = time.time()
                await producer.enqueue_many([new_task("wake", enqueued_at=now)])
                await claimed.wait()
        assert not deadline.cancelled_caught, (
            f"wait_for_work(timeout={LONG}) did not return within {PROMPT} s of an enqueue to its queue"
        )

    async def test_wait_for_work_returns_when_a_delayed_task_becomes_due(
        self, open_backend: OpenBackend
    ) -> None:
        waiter = await open_backend()
        producer = await open_backend()
        now = time.time()
        await producer.enqueue_many([new_task("delayed", enqueued_at=now, run_at=now + 0.3)])
        with anyio.move_on_after(PROMPT) as deadline:
            # The engine's loop: claim, and when nothing is due, wait for work.
            while not await waiter.claim(["default"], 1, now=time.time(), lease_until=time.time() + LEASE):
                await waiter.wait_for_work(["default"], timeout=LONG)
        assert not deadline.cancelled_caught, (
            f"a task due in 0.3 s was not claimable via wait_for_work(timeout={LONG}) within {PROMPT} s"
        )

    async def test_wait_for_work_returns_after_a_release_through_another_backend_object(
        self, open_backend: OpenBackend
    ) -> None:
        waiter = await open_backend()
        worker = await open_backend()
        now = time.time()
        await worker.enqueue_many([new_task("job", enqueued_at=now)])
        first = await claim_one(worker, "job", now=now, lease_until=now + LEASE)
        claimed = anyio.Event()
        with anyio.move_on_after(PROMPT) as deadline:
            async with anyio.create_task_group() as group:
                await _work_loop_in_background(group, waiter, claimed)
                now = time.time()
                release = Settlement(
                    task_id="job", token=first.token, state=TaskState.PENDING, at=now, run_at=now
                )
                assert await worker.settle([release]) == set()
                await claimed.wait()
        assert not deadline.cancelled_caught, (
            f"wait_for_work(timeout={LONG}) did not return within {PROMPT} s of a task released to pending"
        )

    async def test_wait_for_work_returns_promptly_when_work_is_already_due(self, backend: Backend) -> None:
        now = time.time()
        await backend.enqueue_many([new_task("ready", enqueued_at=now)])
        with anyio.move_on_after(PROMPT) as deadline:
            await backend.wait_for_work(["default"], timeout=LONG)
        assert not deadline.cancelled_caught, (
            f"wait_for_work(timeout={LONG}) did not return within {PROMPT} s although a task was already due"
        )

    async def test_wait_for_work_returns_after_the_timeout_without_work(self, backend: Backend) -> None:
        now = time.time()
        await backend.enqueue_many(
            [
                new_task("elsewhere", queue="elsewhere", enqueued_at=now),
                new_task("far-future", enqueued_at=now, run_at=now + 3600),
            ]
        )
        with anyio.move_on_after(PROMPT) as deadline:
            await backend.wait_for_work(["default"], timeout=0.2)
            await backend.wait_for_work(["default"], timeout=0)
        assert not deadline.cancelled_caught, "wait_for_work must return once its timeout has passed"

    async def test_wait_for_work_can_be_cancelled_and_the_backend_still_works(self, backend: Backend) -> None:
        waiting = anyio.Event()

        async def wait_until_cancelled() -> None:
            while True:  # returning early without work is allowed: wait again, as the engine does
                waiting.set()
                await backend.wait_for_work(["default"], timeout=LONG)

        with anyio.move_on_after(PROMPT) as deadline:
            async with anyio.create_task_group() as group:
                group.start_soon(wait_until_cancelled)
                await waiting.wait()
                await anyio.lowlevel.checkpoint()  # the waiter is inside wait_for_work now
                group.cancel_scope.cancel()  # as a stopping worker does
        assert not deadline.cancelled_caught, f"a cancelled wait_for_work took more than {PROMPT} s to end"
        now = time.time()
        assert await backend.enqueue_many([new_task("after", enqueued_at=now)]) == ["after"]
        assert (await claim_one(backend, "after", now=now, lease_until=now + LEASE)).record.attempts == 1
