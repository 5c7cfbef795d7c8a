"""The :class:`Backend` protocol: the small, batch-shaped storage interface behind ``AsyncTasks``.

Retries, backoff, timeouts, dead-lettering, draining and recovery policy live once, in the worker engine.
A backend only stores records and applies state changes atomically. Every method that changes state takes
the current time from the engine (``now`` / ``at``), so a backend never reads the clock for a state change;
only :meth:`Backend.wait_for_work` deals in real time.

A backend is used by one ``AsyncTasks`` at a time, from one event loop; it is ``open``-ed before any other
call and ``close``-d after the last. Several processes (each with its own backend object) may share the same
storage: every method must be safe against concurrent callers in other processes.

A stored record the backend cannot read whole (a field of the wrong type, missing, or text that is not
UTF-8) is returned with :attr:`TaskRecord.fault` set and placeholders in the unreadable fields, by every
method that returns records; it never fails the call for the other records, and no method leaves a
half-done change because of it.

Strings the engine passes (task ids, names, queue names, errors, meta) never contain a NUL character: the
engine refuses NUL in names, queues and ids before calling a backend, and writes it out in error texts.

Write your own by implementing these methods, then run the public conformance suite
(:mod:`lifecycle.asynctask.testing`) against it unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal, Protocol, TypeAlias, cast, runtime_checkable

import anyio

from ._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    Notice,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)

__all__ = [
    "Backend",
    "Create",
    "NotifyingBackend",
    "SettleAndClaim",
    "SettleWaitAndClaim",
    "TransactionalBackend",
    "WaitAndClaim",
    "check_create",
    "combined_settle_and_claim",
    "combined_settle_wait_and_claim",
    "combined_wait_and_claim",
    "is_backend",
    "open_backend",
    "opens_without_creating",
    "supports_control",
    "supports_flow_control",
]

Create: TypeAlias = bool | Literal["on_enqueue"]
"""When ``open(create=...)`` of a built-in backend creates its storage (file and tables, schema, key layout):

- ``True`` (the default): at open, when missing; an older layout is migrated. What a worker does.
- ``"on_enqueue"``: at the first enqueue (or claim: a worker's call); until then reads see no tasks and
  ``cancel``/``requeue``/``purge`` change nothing. What ``AsyncTasks(..., execution=False)`` does, so a
  producer started before any worker works, and inspection never creates anything.
- ``False``: never; ``open`` raises :class:`BackendError` when there is no storage. What the ``lifecycle
  tasks`` commands do, so a mistyped URL is an error rather than a new, empty store.
"""


@runtime_checkable
class Backend(Protocol):
    """Durable storage for asynchronous tasks. See the module docstring for the rules all methods share."""

    async def open(self) -> None:
        """Connect, create or migrate the schema. Raises :class:`BackendError` when the storage cannot be
        used (unsupported async library, a schema newer than this code, a bad URL).

        A backend may also accept a keyword-only ``create`` argument (the built-in ones do; see
        :data:`Create`): ``AsyncTasks(..., execution=False)`` then opens it with ``create="on_enqueue"``
        and the ``lifecycle tasks`` commands with ``create=False``, so that looking at tasks never creates
        storage. A backend whose ``open`` takes no argument is opened as always."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` durably (committed before returning) and return the ids stored, in order.

        ``if_exists="error"``: if any task's id belongs to a ``PENDING`` or ``ACTIVE`` record, raise
        :class:`DuplicateTaskError` and store nothing of the batch; a record with that id in a final state is
        replaced. ``if_exists="skip"``: tasks whose id exists in any state are left out (used for schedules,
        so one fire time is enqueued once), the rest are stored. ``if_exists="debounce"``: a ``PENDING``
        record with the id takes the new task's fields (payload, ``run_at``, priority, key, expiry, retries,
        timeout, meta; ``attempts`` and ``enqueued_at`` stay); an ``ACTIVE`` one keeps running and the new
        task is kept as its one follow-up run (a later debounce replaces it), which the settlement of the
        running attempt turns into the record's next ``PENDING`` period (``attempts = 0``, the follow-up's
        fields; ``run_at`` the later of the follow-up's and a retry's); a final or missing record is
        replaced or stored as with ``"error"``. The id is returned in every case.

        Uniqueness windows (:attr:`NewTask.unique_key`): a task whose key holds a window that ends after the
        task's ``enqueued_at`` raises :class:`DuplicateTaskError` (storing nothing of the batch) with
        ``"error"`` and ``"debounce"``, and is left out with ``"skip"``; otherwise the task opens its window
        until ``unique_until``, atomically with storing it. Windows outlive the task records.
        """
        ...

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` ``PENDING`` tasks whose ``run_at <= now`` to the caller.

        ``queues`` is in priority order: take from ``queues[0]`` first, then the next; a paused queue (see
        :meth:`pause`) is skipped. Within a queue, the highest ``priority`` first, then the earliest
        ``run_at``, then enqueue order. Each claimed task becomes ``ACTIVE`` with ``attempts + 1``,
        ``started_at = now``, ``lease_until`` and a fresh unique lease token. Two callers never receive the
        same task from one ``PENDING`` period.

        ``limits`` maps task names to the :class:`FlowLimits` their registration sets; a task its name's
        limits hold back stays ``PENDING`` (untouched) and the claim goes on with the tasks behind it. The
        limits are checked and the tokens taken in the same atomic step as the claim, so they hold across
        every caller in every process (a claim that holds back a task for want of a token also adds one to
        the bucket's stored ``refused`` count, once per claim and name: see :class:`FlowState`); ``ACTIVE``
        tasks are counted from the stored states, so a lease that ends (settled, or reclaimed after a worker
        died) gives its slot back.

        A due task whose ``expires_at <= now`` is not claimed: the same step makes it ``CANCELLED`` with
        ``finished_at = now``, ``attempts`` unchanged and ``last_error = "expired before it started"``.
        """
        ...

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Heartbeat: set ``lease_until`` for each ``(task_id, token)`` still held; return the task ids whose
        lease was lost (the token no longer matches or the task is no longer ``ACTIVE``)."""
        ...

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply each settlement whose ``(task_id, token)`` lease is still held; return the ids that were not
        applied because the lease was lost. Each applied settlement, with its ``then`` tasks and
        ``then_groups``, is atomic.

        ``state=CANCELLED`` ends the task like ``DEAD`` (``finished_at = at``, ``error``), for an attempt the
        engine stopped because its cancellation was asked.

        Groups: settling a member of a group (``record.group_id``) updates the group in the same atomic
        step: ``SUCCEEDED`` stores ``result`` in the member's results slot and, when it was the last member
        not yet succeeded and the group is not final, makes the group ``SUCCEEDED`` and stores its ``then``
        task (skipped if its id exists); ``DEAD`` or ``CANCELLED`` makes a group that is not final take that
        outcome (its ``then`` is never stored). A ``PENDING`` settlement (a retry) changes nothing in the
        group. So ``then`` is stored once, never zero times after every member succeeded, whatever crashes."""
        ...

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over up to ``limit`` ``ACTIVE`` tasks whose ``lease_until < now`` (their worker died) with a
        fresh token and the new ``lease_until``, without changing ``attempts``: the lost attempt was
        counted when it was claimed. The engine then settles them (retry or dead).

        A damaged record that no claim or reclaim would ever select (its state, queue, ``run_at`` or
        ``lease_until`` cannot be read) is taken over here too, as if its lease had expired, with its
        ``fault``: the engine settles it dead."""
        ...

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Return when a task in ``queues`` may have become claimable (enqueued, released, or its
        ``run_at`` reached), or after ``timeout`` seconds. Returning early without work is allowed."""
        ...

    async def pause(self, queue: str) -> None:
        """Stop every caller of :meth:`claim` from taking tasks of ``queue`` until :meth:`resume`. The pause
        is stored: it holds for processes started later and survives restarts. Idempotent."""
        ...

    async def resume(self, queue: str) -> None:
        """Undo :meth:`pause` (idempotent)."""
        ...

    async def paused(self) -> set[str]:
        """The paused queues."""
        ...

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The counts that ``limits`` on task ``name`` are checked against at ``now`` (see
        :class:`FlowState`), for inspection; changes nothing."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None`` when there is none (never stored, or removed)."""
        ...

    async def list_records(
        self,
        *,
        states: Collection[TaskState] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Records matching the filters (``None`` means any), newest ``enqueued_at`` first."""
        ...

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """The number of records per queue and state. States with no record may be left out."""
        ...

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Make ``PENDING`` tasks ``CANCELLED`` (``finished_at = now``; a group member's group becomes
        ``CANCELLED`` in the same step, see :meth:`settle`), and set ``cancel_requested`` on ``ACTIVE`` ones
        (they stay ``ACTIVE``: their worker stops them and settles them ``CANCELLED``; a backend that can push
        sends a ``"cancel"`` :class:`Notice`); return the ids of both kinds, in the order given. A ``PENDING``
        task's debounce follow-up goes with it; an ``ACTIVE`` task's follow-up is dropped. Final or unknown
        ids are left as they are."""
        ...

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """Of ``task_ids``, those ``ACTIVE`` with ``cancel_requested`` set: the engine asks this for the tasks
        it runs at least once a second (so a cancellation reaches a worker within 1 s on any backend)."""
        ...

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store each update's ``done``, ``total`` and ``message`` on its task if its ``(task_id, token)``
        lease is still held; return the ids whose lease was lost. The engine coalesces updates (at most one
        per task per second, the last one before the verdict)."""
        ...

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store ``group`` and its members atomically (members as :meth:`enqueue_many` with
        ``if_exists="error"`` stores them: a live member id raises :class:`DuplicateTaskError` and stores
        nothing); ``then`` is kept with the group, not stored as a task until the group succeeds. Returns
        the group id. A group id that exists raises :class:`DuplicateTaskError`. When the group succeeds,
        ``then`` is stored unless a task with its id exists (skipped, as a chain's ``then``)."""
        ...

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id, or ``None``. Groups are removed by :meth:`purge` with the ``before``
        rule applied to their ``finished_at`` when ``states`` includes their final outcome and ``queue`` is
        ``None``."""
        ...

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move ``DEAD`` or ``CANCELLED`` tasks back to ``PENDING`` with ``attempts = 0``,
        ``run_at = now`` and ``cancel_requested`` cleared; ``last_error`` is kept (a group it belongs to
        keeps its outcome). With ``task_ids`` only those; with ``task_ids=None`` every
        ``DEAD`` task (of ``queue`` when given). Returns how many moved."""
        ...

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete records in ``states`` (of ``queue`` when given) whose ``finished_at`` (or ``enqueued_at``
        when not finished) is earlier than ``before`` when given; at most ``limit`` when given. Returns how
        many were deleted. The engine never passes ``ACTIVE``."""
        ...


@runtime_checkable
class NotifyingBackend(Backend, Protocol):
    """A backend that can push what happens in the store to every process using it (Redis pub/sub,
    PostgreSQL ``LISTEN/NOTIFY``, in-process events): cancellations of running tasks reach their worker,
    and verdicts reach ``wait()``, within milliseconds instead of a poll interval."""

    async def wait_for_notices(self, *, timeout: float) -> list[Notice]:
        """Return the notices that arrived since the last call (in order; at most a few thousand), waiting up
        to ``timeout`` seconds for the first; ``[]`` after the timeout. Notices are best effort (a missed one
        is caught by the engine's polling); one caller at a time."""
        ...


@runtime_checkable
class TransactionalBackend(Backend, Protocol):
    """A backend whose enqueue can join a transaction the caller opened (the transactional outbox).

    ``connection`` is the backend's own connection type (for PostgreSQL, a psycopg ``AsyncConnection`` in a
    transaction): the tasks are stored if and only if the caller's transaction commits.
    """

    async def enqueue_many_in(
        self,
        connection: object,
        tasks: Sequence[NewTask],
        *,
        if_exists: Literal["error", "skip", "debounce"] = "error",
    ) -> list[str]:
        """Like :meth:`Backend.enqueue_many`, inside the caller's transaction on ``connection``."""
        ...


def check_create(create: object) -> Create:
    """``create`` checked: ``True``, ``False`` or ``"on_enqueue"`` (``ValueError`` otherwise)."""
    if isinstance(create, bool):
        return create
    if create == "on_enqueue":
        return "on_enqueue"
    raise ValueError(f'create must be True, False or "on_enqueue", got {create!r}')


def opens_without_creating(backend: Backend) -> bool:
    """Whether ``backend.open`` takes the ``create`` keyword (see :data:`Create`)."""
    try:
        parameters = inspect.signature(backend.open).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("create")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


async def open_backend(backend: Backend, *, create: Create) -> None:
    """Open ``backend`` with ``create`` when its ``open`` takes it, else as always (it may create)."""
    if create is not True and opens_without_creating(backend):
        await backend.open(create=create)  # type: ignore[call-arg]
    else:
        await backend.open()


_CORE_METHODS = (
    "open",
    "close",
    "enqueue_many",
    "claim",
    "extend_leases",
    "settle",
    "reclaim_expired",
    "wait_for_work",
    "get",
    "list_records",
    "stats",
    "cancel",
    "requeue",
    "purge",
)
_FLOW_METHODS = ("pause", "resume", "paused", "flow_state")
_CONTROL_METHODS = ("cancel_requests", "save_progress", "enqueue_group", "get_group")


def is_backend(obj: object) -> bool:
    """Whether ``obj`` has the methods every backend has, those of flow control aside: a backend written
    before flow control existed still runs tasks (see :func:`supports_flow_control`)."""
    return all(callable(getattr(obj, name, None)) for name in _CORE_METHODS)


def supports_flow_control(backend: object) -> bool:
    """Whether ``backend`` implements flow control: ``pause``, ``resume``, ``paused``, ``flow_state``, and a
    ``claim`` taking ``limits``. Every built-in backend does; the engine works without it, but then refuses
    registered limits and pauses with a clear error instead of ignoring them."""
    if not all(callable(getattr(backend, name, None)) for name in _FLOW_METHODS):
        return False
    try:
        parameters = inspect.signature(backend.claim).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return False
    return "limits" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def supports_control(backend: object) -> bool:
    """Whether ``backend`` implements control of running work: ``cancel_requests``, ``save_progress``,
    ``enqueue_group`` and ``get_group`` (and a ``cancel`` that asks active tasks to stop). Every built-in
    backend does; without it the engine still runs tasks, drops progress reports, and refuses groups and
    the cancellation of a running task with a clear error."""
    return all(callable(getattr(backend, name, None)) for name in _CONTROL_METHODS)


class SettleAndClaim(Protocol):
    """A backend's optional ``settle_and_claim``: what :meth:`Backend.settle` does with ``settlements``,
    then what :meth:`Backend.claim` does with the rest of the arguments, in one call (one transaction, one
    round trip); returns the ids ``settle`` would return and the claimed tasks. When it raises, neither
    happened (or, after a lost connection, as much as a retried ``settle`` and ``claim`` would tolerate)."""

    async def __call__(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> tuple[set[str], list[ClaimedTask]]: ...


def combined_settle_and_claim(backend: object) -> SettleAndClaim | None:
    """``backend.settle_and_claim``, when it has one whose ``settle`` and ``claim`` are its own: a subclass
    (or an instance) that replaces either would be bypassed by it, so the engine then calls them apart."""
    return cast("SettleAndClaim | None", _combined(backend, "settle_and_claim", ("claim", "settle")))


class WaitAndClaim(Protocol):
    """A backend's optional ``wait_and_claim``: what :meth:`Backend.wait_for_work` does with ``queues`` and
    ``timeout``, ending early when ``woken`` is set, then what :meth:`Backend.claim` does with the rest of
    the arguments at the moment the wait ended, in one round trip (the claim sent behind the wait); returns
    the claimed tasks, or ``None`` when it made no claim (work was due already, ``woken`` was set before the
    wait began): the caller then claims itself.

    The claim's ``now`` may be later than the ``now`` given, by at most the real time that passed since (the
    wait's), so with a real clock it is never ahead of the clock when the claim runs; ``lease_until`` moves
    with it. Once the claim is sent, the call
    returns what it claimed, also when ``woken`` ends the wait (setting ``woken`` is how the caller ends it
    early, not cancellation, which may lose a claim in flight as it may with :meth:`Backend.claim`). When it
    raises, nothing was claimed, or, after a lost connection or no reply in time, what a :meth:`Backend.claim`
    whose reply was lost leaves: tasks leased for nobody until their lease ends (an error reply to the wait
    is no such case: the claim behind it is still answered, and what it leased is returned)."""

    async def __call__(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
    ) -> list[ClaimedTask] | None: ...


def combined_wait_and_claim(backend: object) -> WaitAndClaim | None:
    """``backend.wait_and_claim``, when it has one whose ``wait_for_work`` and ``claim`` are its own (as for
    :func:`combined_settle_and_claim`)."""
    return cast("WaitAndClaim | None", _combined(backend, "wait_and_claim", ("claim", "wait_for_work")))


class SettleWaitAndClaim(Protocol):
    """A backend's optional ``settle_wait_and_claim``: what :meth:`Backend.settle` does with ``settlements``,
    sent with a :class:`WaitAndClaim` call's wait (in the same write: the idle worker's verdicts cost no round
    trip of their own), then that call with the rest of the arguments; returns what it returns.

    ``settled`` is called once with the settlement's outcome as soon as it is known (before the wait ends,
    unless the wait ends at once): the ids ``settle`` would return, or ``None`` when the store refused the
    settlements or their outcome is unknown (the caller saves them again, as after a failed ``settle``).
    When the call raises without having called it, the settlements count as not saved (after a lost
    connection they may have been: as much as a retried ``settle`` tolerates)."""

    async def __call__(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
        timeout: float,
        woken: anyio.Event,
        settled: Callable[[set[str] | None], None],
    ) -> list[ClaimedTask] | None: ...


def combined_settle_wait_and_claim(backend: object) -> SettleWaitAndClaim | None:
    """``backend.settle_wait_and_claim``, when it has one whose ``settle``, ``wait_for_work``, ``claim`` and
    ``wait_and_claim`` are its own (as for :func:`combined_settle_and_claim`): an override of any of them
    (``wait_and_claim`` included, which the engine calls for the waits that carry no verdicts) is never
    bypassed for some waits and used for others."""
    return cast(
        "SettleWaitAndClaim | None",
        _combined(backend, "settle_wait_and_claim", ("claim", "wait_for_work", "settle", "wait_and_claim")),
    )


def _combined(backend: object, method_name: str, parts: tuple[str, ...]) -> object | None:
    """``backend``'s method ``method_name``, when ``parts``, the methods it does the work of, are those of the
    class that defines it: a subclass (or an instance) that replaces one would be bypassed by it."""
    method: object = getattr(backend, method_name, None)
    if not callable(method):
        return None
    owner = next((cls for cls in type(backend).__mro__ if method_name in vars(cls)), None)
    if owner is None:  # found through __getattr__ (a proxy): its own parts may differ
        return None
    instance = getattr(backend, "__dict__", {})
    for name in parts:
        if name in instance or getattr(type(backend), name, None) is not getattr(owner, name, None):
            return None
    return method
