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
round trip ends), so one caller's cancellation never leaves another's task in doubt; a batch of the sender's
task alone is cancelled as a plain enqueue is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

from ._errors import DuplicateTaskError
from ._records import NewTask

__all__ = ["BATCH_LIMIT", "EnqueueCoalescer"]

BATCH_LIMIT = 1000
"""The most tasks one coalesced ``enqueue_many`` call carries."""

DEPTH = 2
"""The most coalesced batches in flight at once: while one is at the server, the next is built and sent."""

SPLIT = 32
"""A batch that would leave with no other in flight is split in two from this many waiting tasks."""

_WAITING, _SENT, _DONE = "waiting", "sent", "done"


class _Batch:
    """A batch in flight: the ids and uniqueness keys no concurrent batch may carry, and how many of its
    callers (its sender aside) have not resumed yet."""

    __slots__ = ("ids", "keys", "landed", "unresumed", "woken")

    def __init__(self, ids: set[str], keys: set[str], unresumed: int) -> None:
        self.woken: anyio.Event | None = None  # the event of its callers woken before it was back
        self.ids = ids
        self.keys = keys
        self.unresumed = unresumed
        self.landed = False


class _Waiter:
    """One caller's task and, once its batch is back, its outcome.

    ``woken`` is the event the caller waits on: an event of its own when it arrived first in line (it is
    likely to send the next batch), else the one event shared by the callers that arrived behind it while a
    batch was in flight (one event per batch instead of one per caller). A caller woken by a shared event
    for another's sake (another became the sender, or a batch it was not taken into came back) waits again.
    """

    __slots__ = ("batch", "error", "lead", "result", "state", "task", "woken")

    def __init__(self, task: NewTask, woken: anyio.Event) -> None:
        self.task = task
        self.woken = woken  # set when this caller leads the next batch, or when its outcome is in
        self.state = _WAITING
        self.lead = False
        self.batch: _Batch | None = None  # the batch that carries its task, once sent
        self.result: str | None = None
        self.error: BaseException | None = None

    def finish(self, result: str | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, _DONE
        self.woken.set()

    def outcome(self) -> str:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class EnqueueCoalescer:
    """Coalesces concurrent single enqueues into batched ``send`` calls (see the module's docstring).

    ``send`` stores a batch durably and returns the ids in order, as ``Backend.enqueue_many`` does (one
    ``if_exists`` mode per coalescer); ``stored`` (optional) is called with each batch ``send`` stored, as
    soon as it returns (an error it raises is the batch's error); ``limit`` bounds a batch, ``depth`` the
    batches in flight at once, and ``split`` the waiting tasks from which a batch that would leave alone is
    split in two.
    """

    def __init__(
        self,
        send: Callable[[list[NewTask]], Awaitable[Sequence[str]]],
        *,
        stored: Callable[[list[NewTask]], None] | None = None,
        limit: int = BATCH_LIMIT,
        depth: int = DEPTH,
        split: int = SPLIT,
    ) -> None:
        self._send = send
        self._stored = stored
        self._limit = limit
        self._depth = depth
        self._split = split
        self._waiting: dict[_Waiter, None] = {}  # insertion-ordered, removal in O(1)
        self._shared: anyio.Event | None = None  # the event of the callers behind the first in line
        self._flying = 0  # batches sent and not back yet
        self._lead = False  # a waiter has been told to send the next batch and has not taken it yet
        # The callers of the batches back (their senders aside) that have not resumed yet: the next batch
        # leaves once all of them have resumed, so that callers who enqueue again as soon as they have their
        # id go in it together, instead of the first of them alone.
        self._gathering = 0
        # The ids given by the caller and the uniqueness keys of the tasks in flight: a concurrent batch never
        # carries them (the second call waits, and is then refused as it would have been alone).
        self._flying_ids: set[str] = set()
        self._flying_keys: set[str] = set()

    async def enqueue(self, task: NewTask) -> str:
        """Store ``task`` (in a batch with the concurrent ones) and return its id once it is stored."""
        if not (self._flying or self._lead or self._gathering or self._waiting):
            # Idle: this task goes alone, at once.
            self._flying = 1
            known = None if task.generated_id else task.id
            key = task.unique_key
            if known is not None:
                self._flying_ids.add(known)
            if key is not None:
                self._flying_keys.add(key)
            tasks = [task]
            try:
                ids = await self._send(tasks)
                if self._stored is not None:
                    self._stored(tasks)
            finally:
                self._flying -= 1
                if known is not None:
                    self._flying_ids.discard(known)
                if key is not None:
                    self._flying_keys.discard(key)
                if self._waiting:
                    self._next()
            if len(ids) != 1:
                _check_count(ids, 1)
            return ids[0]
        waiting = self._waiting
        waiter = _Waiter(task, self._shared_event() if waiting else anyio.Event())
        waiting[waiter] = None
        try:
            while True:
                await waiter.woken.wait()
                if waiter.state is _DONE or waiter.lead:
                    break
                # Woken for another caller's sake: wait again, once sent on an event of its batch's callers.
                batch = waiter.batch
                if batch is None:
                    waiter.woken = self._shared_event()
                else:
                    if batch.woken is None:
                        batch.woken = anyio.Event()
                    waiter.woken = batch.woken
        except BaseException:
            if waiter.state is _WAITING:  # never sent: take it out, and pass on the lead if it had it
                del self._waiting[waiter]
                if waiter.lead:
                    self._lead = False
                    self._next()
            else:  # sent: its task may be stored
                self._resumed(waiter)
            raise
        if not waiter.lead:
            self._resumed(waiter)
            return waiter.outcome()
        await self._fly()  # the first of the waiting, so always in the batch it sends
        return waiter.outcome()

    def _take(self, limit: int, *, sender: bool) -> tuple[list[_Waiter], _Batch]:
        """The next batch, in arrival order: at most ``limit`` tasks, no id or uniqueness key twice, nor one
        of a batch in flight. ``sender``: the caller sending it is in it (the first of them)."""
        waiters: list[_Waiter] = []
        ids: set[str] = set()
        keys: set[str] = set()
        flying_ids, flying_keys = self._flying_ids, self._flying_keys
        for waiter in self._waiting:
            task = waiter.task
            known = not task.generated_id  # a generated id is random: no other task of the batch has it
            key = task.unique_key
            if known and (task.id in ids or task.id in flying_ids):
                continue
            if key is not None and (key in keys or key in flying_keys):
                continue
            waiters.append(waiter)
            if known:
                ids.add(task.id)
            if key is not None:
                keys.add(key)
            if len(waiters) >= limit:
                break
        batch = _Batch(ids, keys, len(waiters) - 1 if sender else len(waiters))
        for waiter in waiters:
            del self._waiting[waiter]
            waiter.state = _SENT
            waiter.batch = batch
        flying_ids |= ids
        flying_keys |= keys
        self._flying += 1
        self._shared = None  # the callers who arrive while this batch flies share an event of their own
        return waiters, batch

    def _shared_event(self) -> anyio.Event:
        """The event shared by the callers waiting behind the first in line (a new one once it is set)."""
        shared = self._shared
        if shared is None or shared.is_set():
            shared = self._shared = anyio.Event()
        return shared

    def _resumed(self, waiter: _Waiter) -> None:
        """A caller of a batch sent resumed (or left): the last one of the batches back starts the next."""
        batch = waiter.batch
        assert batch is not None
        batch.unresumed -= 1
        if batch.landed:
            self._gathering -= 1
            if not self._gathering:
                self._next()

    def _next(self) -> None:
        """The first waiting caller whose task may go is told to send the next batch, if one may leave now:
        fewer than ``depth`` in flight, none about to leave, and every caller of the batches back resumed.
        (The callers before it have ids or keys in flight, so it is the first of the batch it sends.)"""
        if self._lead or self._gathering or self._flying >= self._depth:
            return
        flying_ids, flying_keys = self._flying_ids, self._flying_keys
        for waiter in self._waiting:
            task = waiter.task
            if (not task.generated_id and task.id in flying_ids) or (
                task.unique_key is not None and task.unique_key in flying_keys
            ):
                continue  # its id or key is in flight: it waits for that batch (which starts the next again)
            self._lead = waiter.lead = True
            waiter.woken.set()
            return

    async def _fly(self) -> None:
        self._lead = False
        limit = self._limit
        count = len(self._waiting)
        if not self._flying and count >= self._split:
            # Nothing in flight and many waiting: two batches, the second sent once the first is written (when
            # this caller waits for the server's reply), so that the server stores one while the callers of
            # the other resume and enqueue again. Sent from here, so that nobody else is woken to send it.
            first = self._take(min(limit, (count + 1) // 2), sender=True)
            second = self._take(limit, sender=False)
            try:
                with anyio.CancelScope(shield=True):
                    async with anyio.create_task_group() as group:
                        group.start_soon(self._land, *first)
                        if second[0]:
                            group.start_soon(self._land, *second)
                        else:  # all the rest had ids or keys of the first: no second batch
                            self._landed(second[1])
            except BaseException as exc:  # an interrupt
                _interrupt(first[0] + second[0], exc)
                raise
            return
        waiters, batch = self._take(limit, sender=True)
        # More waiting (more than a batch holds): the next caller in line sends them once this batch is
        # written, that is once this caller waits for the server's reply.
        self._next()
        try:
            if len(waiters) == 1:  # the sender's own task alone: cancelled as a plain enqueue is
                await self._store(waiters)
            else:
                with anyio.CancelScope(shield=True):
                    await self._store(waiters)
        except BaseException as exc:  # the sender's own cancellation (a lone batch), or an interrupt
            _interrupt(waiters, exc)
            raise
        finally:
            self._landed(batch)

    async def _land(self, waiters: list[_Waiter], batch: _Batch) -> None:
        """Store ``waiters``' batch, then count it back."""
        try:
            await self._store(waiters)
        finally:
            self._landed(batch)

    def _landed(self, batch: _Batch) -> None:
        """``batch`` is back: its callers resume, and the last of them starts the next batch."""
        self._flying -= 1
        self._flying_ids -= batch.ids
        self._flying_keys -= batch.keys
        batch.landed = True
        self._gathering += batch.unresumed
        self._next()

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
        woken = None
        for waiter, task_id in zip(batch, ids, strict=True):
            waiter.result, waiter.state = task_id, _DONE
            if waiter.woken is not woken:  # most share one event: set each once
                woken = waiter.woken
                woken.set()


def _check_count(ids: Sequence[str], count: int) -> None:
    if len(ids) != count:
        raise RuntimeError(
            f"the backend's enqueue_many() returned {len(ids)} ids for {count} tasks; it must return the id "
            "of every task stored, in order"
        )


def _interrupt(waiters: list[_Waiter], exc: BaseException) -> None:
    """Each caller of ``waiters`` without an outcome gets the error of an interrupted batch."""
    for waiter in waiters:
        if waiter.state is not _DONE:
            waiter.finish(error=_interrupted(exc, waiter.task.id))


def _interrupted(exc: BaseException, task_id: str) -> BaseException:
    """The error of the other calls in a batch whose sending ``exc`` interrupted."""
    error = RuntimeError(
        f"enqueue(): the batch that carried task {task_id!r} was interrupted ({type(exc).__name__}); the "
        "task may have been stored: look it up with tasks.info(task_id) before enqueueing it again"
    )
    error.__cause__ = exc
    return error
