"""Group commit for single enqueues: concurrent ``enqueue`` calls share one backend round trip.

While one ``enqueue_many`` call of an :class:`EnqueueCoalescer` is in flight, the single enqueues that
arrive wait, and go together in the next call; a call that finds nothing in flight goes at once (no timer,
so a lone enqueue is as fast as before). The caller that finds the coalescer idle, or that the previous
flight hands over to, sends the batch itself: there is no background task, so nothing outlives the callers
and two coalescers never share anything.

Each caller gets its own outcome: its id, or its own error. A batch the backend refuses as a whole for a
duplicate id (``DuplicateTaskError``) is sent again so that only the refused calls fail: the calls it names
one by one, the others together (and, should those be refused again, one by one). Two tasks with the same id
or the same uniqueness key never share a batch (the second waits for the next one, and is then refused as
it would have been alone). Any other error of a batch is the error of each call in it.

Cancellation: a caller cancelled while its task waits is taken out, and its task is never sent. Once sent,
the task may be stored whatever happens to its caller. The round trip of a batch that carries other
callers' tasks is shielded from the cancellation of the caller sending it (its cancellation arrives when the
round trip ends), whether it comes from an anyio cancel scope or from asyncio's own ``task.cancel()``
(``asyncio.wait_for``, ``asyncio.timeout``), so one caller's cancellation never leaves another's task in
doubt; a batch of the sender's task alone is cancelled as a plain enqueue is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import anyio

from ._errors import DuplicateTaskError
from ._records import NewTask

__all__ = ["BATCH_LIMIT", "EnqueueCoalescer"]

BATCH_LIMIT = 1000
"""The most tasks one coalesced ``enqueue_many`` call carries."""

_WAITING, _SENT, _DONE = "waiting", "sent", "done"


class _Waiter:
    """One caller's task and, once its batch is back, its outcome.

    The caller waits to be woken once: when it is to send the next batch (``lead``), or when its outcome is
    in. Under asyncio it waits on a bare future of its own (what an ``asyncio.Event`` makes for each of its
    waiters, without the event's bookkeeping and the two coroutine layers of ``anyio.Event.wait``); under
    trio its task is parked and rescheduled (what a ``trio.Event`` does for each of its waiters).
    """

    __slots__ = ("error", "future", "lead", "parked", "result", "state", "task")

    def __init__(self, task: NewTask, loop: asyncio.AbstractEventLoop | None) -> None:
        self.task = task
        self.state = _WAITING
        self.lead = False
        self.result: str | None = None
        self.error: BaseException | None = None
        self.future: asyncio.Future[None] | None = None if loop is None else loop.create_future()
        self.parked: Any = None  # trio: the caller's task while it waits

    def wake(self) -> None:
        """Wake the caller (a second call, or one after its cancellation, does nothing)."""
        future = self.future
        if future is not None:
            if not future.done():  # done: cancelled with its caller, or woken already
                future.set_result(None)
            return
        parked, self.parked = self.parked, None
        if parked is not None:
            import trio

            trio.lowlevel.reschedule(parked)

    async def park(self) -> None:
        """Wait under trio until :meth:`wake` (unless woken already); a cancellation ends the wait."""
        if self.state is _DONE or self.lead:
            return
        import trio

        def abort(_: object) -> trio.lowlevel.Abort:
            self.parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        self.parked = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(abort)

    def finish(self, result: str | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, _DONE
        self.wake()

    def outcome(self) -> str:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class EnqueueCoalescer:
    """Coalesces concurrent single enqueues into batched ``send`` calls (see the module's docstring).

    ``send`` stores a batch durably and returns the ids in order, as ``Backend.enqueue_many`` does (one
    ``if_exists`` mode per coalescer); ``stored`` (optional) is called with each batch ``send`` stored, as
    soon as it returns (an error it raises is the batch's error); ``limit`` bounds a batch.
    """

    def __init__(
        self,
        send: Callable[[list[NewTask]], Awaitable[Sequence[str]]],
        *,
        stored: Callable[[list[NewTask]], None] | None = None,
        limit: int = BATCH_LIMIT,
    ) -> None:
        self._send = send
        self._stored = stored
        self._limit = limit
        self._waiting: dict[_Waiter, None] = {}  # insertion-ordered, removal in O(1)
        self._asyncio: bool | None = None  # whether the callers run under asyncio (known at the first wait)
        self._busy = False  # a batch is in flight, or a waiter has been told to send the next one
        # The callers of the batch in flight (its sender aside) that have not resumed yet, and whether it has
        # landed: the next batch starts once all of them have resumed, so that callers who enqueue again
        # as soon as they have their id go in it together, instead of the first of them alone.
        self._unresumed = 0
        self._landed = False

    async def enqueue(self, task: NewTask) -> str:
        """Store ``task`` (in a batch with the concurrent ones) and return its id once it is stored."""
        if not self._busy:  # nothing in flight, so nobody waiting: this task goes alone, at once
            self._busy = True
            self._unresumed = 0
            self._landed = False
            tasks = [task]
            try:
                ids = await self._send(tasks)
                if self._stored is not None:
                    self._stored(tasks)
            finally:
                self._landed = True
                if self._waiting:
                    self._hand_over()
                else:
                    self._busy = False
            if len(ids) != 1:
                _check_count(ids, 1)
            return ids[0]
        on_asyncio = self._asyncio
        if on_asyncio is None:
            on_asyncio = self._asyncio = _on_asyncio()
        waiter = _Waiter(task, asyncio.get_running_loop() if on_asyncio else None)
        self._waiting[waiter] = None
        try:
            if waiter.future is not None:
                await waiter.future
            else:
                await waiter.park()
        except BaseException:
            if waiter.state is _WAITING:  # never sent: take it out, and pass on the lead if it had it
                del self._waiting[waiter]
                if waiter.lead:
                    self._hand_over()
            else:  # sent: its task may be stored
                self._resumed()
            raise
        if not waiter.lead:
            self._unresumed -= 1  # what _resumed() does, written out: once per caller
            if self._landed and self._unresumed == 0:
                self._hand_over()
            result = waiter.result
            return result if result is not None else waiter.outcome()
        await self._fly()  # the first of the waiting, so always in the batch it sends
        return waiter.outcome()

    def _take(self) -> list[_Waiter]:
        """The next batch, in arrival order: at most ``limit`` tasks, no id or uniqueness key twice."""
        batch: list[_Waiter] = []
        ids: set[str] = set()
        keys: set[str] = set()
        limit = self._limit
        for waiter in self._waiting:
            task = waiter.task
            known = not task.generated_id  # a generated id is random: no other task of the batch has it
            key = task.unique_key
            if (known and task.id in ids) or (key is not None and key in keys):
                continue
            batch.append(waiter)
            if known:
                ids.add(task.id)
            if key is not None:
                keys.add(key)
            if len(batch) >= limit:
                break
        for waiter in batch:
            del self._waiting[waiter]
            waiter.state = _SENT
        self._unresumed = len(batch) - 1
        self._landed = False
        return batch

    def _resumed(self) -> None:
        """A caller of the batch in flight resumed (or left): the last one after landing starts the next."""
        self._unresumed -= 1
        if self._landed and self._unresumed == 0:
            self._hand_over()

    def _hand_over(self) -> None:
        """The next batch is sent by the first waiting caller; with none, the coalescer is idle."""
        for waiter in self._waiting:
            waiter.lead = True
            waiter.wake()
            return
        self._busy = False

    async def _fly(self) -> None:
        batch = self._take()
        try:
            if len(batch) == 1:  # the sender's own task alone: cancelled as a plain enqueue is
                await self._store(batch)
            else:
                with anyio.CancelScope(shield=True):
                    if self._asyncio if self._asyncio is not None else _on_asyncio():
                        await _outlasting_asyncio_cancel(self._store(batch))
                    else:
                        await self._store(batch)
        except BaseException as exc:  # the sender's own cancellation (a lone batch), or an interrupt
            for waiter in batch:
                if waiter.state is not _DONE:
                    waiter.finish(error=_interrupted(exc, waiter.task.id))
            raise
        finally:
            self._landed = True
            if self._unresumed == 0:
                self._hand_over()

    async def _store(self, batch: list[_Waiter], *, split: bool = True) -> None:
        tasks = [waiter.task for waiter in batch]
        try:
            ids = await self._send(tasks)
            if self._stored is not None:
                self._stored(tasks)
        except DuplicateTaskError as exc:
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            named = set(exc.task_ids)
            rest = [waiter for waiter in batch if waiter.task.id not in named]
            if split and 0 < len(rest) < len(batch):
                for waiter in batch:
                    if waiter.task.id in named:
                        await self._store([waiter])
                await self._store(rest, split=False)
            else:
                for waiter in batch:
                    await self._store([waiter])
            return
        except Exception as exc:
            for waiter in batch:
                waiter.finish(error=exc)
            return
        try:
            _check_count(ids, len(batch))
        except RuntimeError as error:
            for waiter in batch:
                waiter.finish(error=error)
            return
        for waiter, task_id in zip(batch, ids, strict=True):
            waiter.result, waiter.state = task_id, _DONE
            future = waiter.future
            if future is None:
                waiter.wake()
            elif not future.done():  # what wake() does, written out: once per caller
                future.set_result(None)


async def _outlasting_asyncio_cancel(store: Coroutine[Any, Any, None]) -> None:
    """Run ``store`` to its end, then raise the asyncio cancellation that came meanwhile, if any.

    An anyio shield stops anyio's cancel scopes only: asyncio's own ``task.cancel()`` (``asyncio.wait_for``,
    ``asyncio.timeout``) still reaches the task inside it, and would cut short a round trip that carries
    other callers' tasks (they would be told it was interrupted, their tasks maybe stored). So the round trip
    runs as a task of its own, which ``asyncio.shield`` keeps from the sender's cancellation."""
    inner = asyncio.ensure_future(store)
    cancelled: asyncio.CancelledError | None = None
    while not inner.done():
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError as exc:
            if inner.done() and inner.cancelled():
                raise
            cancelled = exc
    inner.result()  # its own error, if any (store() finishes its callers on any Exception)
    if cancelled is not None:
        raise cancelled


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (else trio's, through anyio)."""
    try:
        import sniffio
    except ImportError:  # trio depends on sniffio, so without it only asyncio can be running
        return True
    return bool(sniffio.current_async_library() == "asyncio")


def _check_count(ids: Sequence[str], count: int) -> None:
    if len(ids) != count:
        raise RuntimeError(
            f"the backend's enqueue_many() returned {len(ids)} ids for {count} tasks; it must return the id "
            "of every task stored, in order"
        )


def _interrupted(exc: BaseException, task_id: str) -> BaseException:
    """The error of the other calls in a batch whose sending ``exc`` interrupted."""
    error = RuntimeError(
        f"enqueue(): the batch that carried task {task_id!r} was interrupted ({type(exc).__name__}); the "
        "task may have been stored: look it up with tasks.info(task_id) before enqueueing it again"
    )
    error.__cause__ = exc
    return error
