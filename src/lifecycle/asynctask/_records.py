"""The records a backend stores and exchanges with the worker engine.

These are the nouns of the :class:`~lifecycle.asynctask.Backend` protocol. All times are seconds since the
epoch (``time.time()`` style floats) supplied by the engine's clock, so backends never read the clock for
state changes and tests can drive time explicitly.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

__all__ = [
    "RECORD_COLUMNS",
    "RECORD_FIELDS",
    "ClaimedTask",
    "FlowLimits",
    "FlowState",
    "GroupRecord",
    "NewGroup",
    "NewTask",
    "Notice",
    "ProgressUpdate",
    "Settlement",
    "TaskRecord",
    "TaskState",
    "new_claimed_task",
    "new_task",
    "record_from_row",
    "record_from_text",
    "shown",
    "stored_state",
    "stored_text",
]


_Frozen = TypeVar("_Frozen")


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
    priority: int = 0
    """Higher is claimed first within a queue; equal priorities keep ``run_at``, then enqueue, order."""
    concurrency_key: str | None = None
    """The key that ``FlowLimits.max_running_per_key`` counts by; ``None``: not limited per key."""
    expires_at: float | None = None
    """A task not claimed before this time never starts: the claim that finds it due at or after
    ``expires_at`` makes it ``CANCELLED`` (see :meth:`Backend.claim`)."""
    unique_key: str | None = None
    """With ``unique_until``: the uniqueness window's key (the engine passes the task id, or the name and a
    hash of the payload). :meth:`Backend.enqueue_many` refuses a task whose key holds a window that ends after
    the task's ``enqueued_at``, whatever state (or absence) the first task is in, and otherwise opens the
    window until ``unique_until``. Not stored on the record."""
    unique_until: float | None = None
    """The end of the uniqueness window opened by this task (seconds since the epoch)."""
    group_id: str | None = None
    """The group this task is a member of (set only on the members handed to :meth:`Backend.enqueue_group`
    or in :attr:`Settlement.then_groups`); stored on the record."""
    generated_id: bool = field(default=False, compare=False, repr=False)
    """``True`` when the engine made ``id`` up (a random UUID, no ``task_id=`` given): no stored record can
    hold it, so a backend may store the task without looking for one (the Redis backend does). Set by the
    engine only: not stored, and cleared when an ``on_enqueue`` hook changes the id (or sets the flag
    itself)."""


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """The limits the registration of one task name puts on its starts, passed to :meth:`Backend.claim` by
    the workers (``limits={name: FlowLimits(...)}``). They hold across every worker of the store.

    - ``rate``/``per``: at most ``rate`` starts per ``per`` seconds: a token bucket of capacity ``rate``
      refilled at ``rate / per`` tokens a second, stored per task name, full when first used; each claimed
      task of the name takes one token; a task finding the bucket below one token stays ``PENDING``.
    - ``max_running``: at most this many ``ACTIVE`` tasks of the name in the whole store.
    - ``max_running_per_key``: at most this many ``ACTIVE`` tasks of the name per ``concurrency_key``;
      tasks without a key are not limited by it.
    """

    rate: int | None = None
    per: float | None = None
    max_running: int | None = None
    max_running_per_key: int | None = None


@dataclass(frozen=True, slots=True)
class FlowState:
    """What holds a task name back right now, as :meth:`Backend.flow_state` reports it.

    ``running``: ``ACTIVE`` tasks of the name; ``running_for_key``: of those, the ones with the asked
    ``concurrency_key`` (0 when no key was asked); ``tokens``: the tokens in the name's rate bucket at ``now``
    after refilling with the given limits (``None`` when the limits have no rate); ``refused``: how many
    claims (by every caller, stored with the bucket) held back at least one due task of the name for want of
    a token: the "starts refused by the rate limit" metric (0 without a rate)."""

    running: int
    running_for_key: int
    tokens: float | None
    refused: int = 0


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
    priority: int = 0
    concurrency_key: str | None = None
    expires_at: float | None = None
    cancel_requested: bool = False
    """``cancel`` was asked while the task was ``ACTIVE``: the worker that holds it stops it and settles it
    ``CANCELLED``; a reclaimed record with this set is settled ``CANCELLED`` too, never retried."""
    progress_done: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    """The last progress saved by :meth:`Backend.save_progress` (kept after the task ends)."""
    group_id: str | None = None
    """The group the task is a member of, if any."""
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
    then_groups: tuple[NewGroup, ...] = field(default=())
    """Groups stored in the same atomic step as this settlement (a chain step that is a group), each as
    :meth:`Backend.enqueue_group` stores one; a group whose id already exists is skipped."""


@dataclass(frozen=True, slots=True)
class NewGroup:
    """A group of tasks that run in parallel, as the engine hands it to :meth:`Backend.enqueue_group`.

    ``members`` are in call order, each with ``group_id == id``. ``then`` (optional) is stored as a
    ``PENDING`` task exactly once, in the same atomic step as the settlement that makes the last member
    ``SUCCEEDED``; it is never stored if a member ends ``DEAD`` or ``CANCELLED``.
    """

    id: str
    members: tuple[NewTask, ...]
    then: NewTask | None
    created_at: float
    meta: str | None = None


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A stored group as :meth:`Backend.get_group` returns it.

    ``outcome`` is ``None`` while the group is not final, then ``SUCCEEDED`` (every member succeeded, and
    ``then`` was stored in that same step), ``DEAD`` or ``CANCELLED`` (the first member that ended so decided
    it; later changes to members do not change it). ``results`` holds each member's encoded result in call
    order as its success stored it (``None`` until then, or for a member that returned nothing); it is kept
    with the group, so it outlives the members' records. ``counts`` are the members per state as stored now
    (a member whose record is gone, removed by retention, is counted in the state the group recorded for it
    when it ended: its results slot tells ``SUCCEEDED``). ``then_id`` is ``then``'s id once stored.
    """

    id: str
    task_ids: tuple[str, ...]
    outcome: TaskState | None
    results: tuple[bytes | None, ...]
    counts: Mapping[TaskState, int]
    created_at: float
    finished_at: float | None = None
    then_id: str | None = None
    meta: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """A running task's progress, for :meth:`Backend.save_progress`; ``None`` values are stored as given."""

    task_id: str
    token: str
    done: float | None
    total: float | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Notice:
    """What a backend that can push tells the workers and waiters of a store (see
    :meth:`NotifyingBackend.wait_for_notices`): ``kind="cancel"``, a running task's cancellation was asked;
    ``kind="settled"``, a task reached a final state (or was settled back to ``PENDING``)."""

    kind: Literal["cancel", "settled"]
    task_id: str


def _fast_constructor(cls: type[_Frozen], name: str) -> Callable[..., _Frozen]:
    """A function that builds the frozen, slotted dataclass ``cls`` from the same arguments as its
    ``__init__`` (same names, order and defaults) at a quarter of its cost, for what is built once per task.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, which looks the name up
    again each time. This function stores the fields into an instance of a plain class with the same slots
    (an ordinary attribute store each), then gives it ``cls`` as its class, which Python allows between
    classes of the same layout. Made from source, as dataclasses makes ``__init__``; ``cls`` must have no
    ``__post_init__`` and no ``default_factory``."""
    found = fields(cls)  # type: ignore[arg-type]
    assert not hasattr(cls, "__post_init__")
    assert all(each.default_factory is MISSING for each in found)
    twin = type(f"_{cls.__name__}Slots", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]
    namespace: dict[str, Any] = {"new": object.__new__, "twin": twin, "cls": cls}
    parameters = []
    for each in found:
        if each.default is MISSING:
            parameters.append(each.name)
        else:
            namespace[f"default_{each.name}"] = each.default
            parameters.append(f"{each.name}=default_{each.name}")
    source = (
        f"def build({', '.join(parameters)}):\n    made = new(twin)\n"
        + "".join(f"    made.{each.name} = {each.name}\n" for each in found)
        + "    made.__class__ = cls\n    return made\n"
    )
    exec(source, namespace)  # the source is made above from the class's own field names
    build: Callable[..., _Frozen] = namespace["build"]
    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    return build


_new_record = _fast_constructor(TaskRecord, "_new_record")
new_claimed_task: Callable[[str, TaskRecord], ClaimedTask]
new_claimed_task = _fast_constructor(ClaimedTask, "new_claimed_task")
"""``ClaimedTask(token, record)``, as the backends build one per claimed task: faster than ``__init__``."""
new_notice: Callable[[str, str], Notice] = _fast_constructor(Notice, "new_notice")
"""``Notice(kind, task_id)``, as a backend builds one per id of a notice it receives: faster than
``__init__``."""


if TYPE_CHECKING:

    def new_task(
        id: str,
        name: str,
        queue: str,
        payload: bytes,
        max_retries: int,
        timeout: float | None,
        enqueued_at: float,
        run_at: float,
        meta: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        expires_at: float | None = None,
        unique_key: str | None = None,
        unique_until: float | None = None,
        group_id: str | None = None,
        generated_id: bool = False,
    ) -> NewTask:
        """``NewTask(...)`` with the same arguments, at a quarter of its CPU (see :func:`_fast_constructor`):
        built once per enqueued task."""
        ...

else:
    new_task = _fast_constructor(NewTask, "new_task")


RECORD_COLUMNS = (
    "id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at, "
    "started_at, finished_at, lease_until, last_error, result, meta, priority, concurrency_key, expires_at, "
    "cancel_requested, progress_done, progress_total, progress_message, group_id"
)
"""The column order :func:`record_from_row` reads: the fields of :class:`TaskRecord`, in order."""

RECORD_FIELDS = tuple(name.strip() for name in RECORD_COLUMNS.split(","))
"""The names of the fields of :class:`TaskRecord` that a backend stores, in :data:`RECORD_COLUMNS` order."""


def record_from_row(row: Sequence[Any], blob: Callable[[Any], bytes] = bytes) -> TaskRecord:
    """Build a :class:`TaskRecord` from a SQL row in :data:`RECORD_COLUMNS` order; ``blob`` turns the
    driver's binary values (payload, result) into ``bytes``.

    Never raises for what the row holds: a value of the wrong type (text in a number column, a number where
    bytes belong, an unknown state, ``NULL`` in a required field, text that is not UTF-8) becomes a
    placeholder and is named in the record's ``fault``. Text where bytes belong is taken as its UTF-8 bytes.
    """
    try:
        return _row_as_written(row, blob)
    except _UNUSUAL:  # something no version of the backends wrote: read it field by field
        return _RecordReader(blob, textual=False).read(row)


def record_from_text(values: Sequence[bytes | None]) -> TaskRecord:
    """Build a :class:`TaskRecord` from stored text in :data:`RECORD_COLUMNS` order, as a key-value store
    (Redis) keeps it: every value ``bytes`` (numbers as decimal text, ``b""`` for a missing optional number)
    or ``None`` for an absent field. Never raises for what the values hold: see :func:`record_from_row`."""
    try:
        return _text_as_written(values)
    except _UNUSUAL:
        return _RecordReader(bytes, textual=True).read(values)


def stored_state(value: object) -> TaskState:
    """A stored state value (text or bytes) as a :class:`TaskState`, for counting: an unknown one is
    ``DEAD``, as :func:`record_from_row` reads it (a record in no known state never runs)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return _STATES_BY_VALUE.get(value, TaskState.DEAD) if isinstance(value, str) else TaskState.DEAD


def stored_text(value: object) -> str:
    """A stored text value (a queue name) as readable text, for counting: bytes that are not UTF-8 are
    replaced by U+FFFD, as :func:`record_from_row` reads them."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


# -- reading a stored record as the backends write it (the fast path) ---------------------------------------
#
# These raise one of _UNUSUAL for anything the backends never write; the record is then read again field by
# field by _RecordReader, which names what is wrong. They accept nothing _RecordReader would fault.

_UNUSUAL = (KeyError, TypeError, ValueError, AttributeError, OverflowError)  # UnicodeDecodeError: ValueError
_STATES_BY_BYTES: dict[bytes, TaskState] = {state.value.encode(): state for state in TaskState}


def _clean_text(value: object) -> str:
    if type(value) is str and (value.isascii() or _is_utf8(value)):
        return value
    raise TypeError


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes a driver kept as surrogate escapes
        return False
    return True


def _finite(value: object) -> float:
    if type(value) is float or type(value) is int:
        number = float(value)
        if number - number == 0.0:  # not NaN, not infinite
            return number
    raise ValueError


def _count(value: object) -> int:
    if type(value) is int and value >= 0:
        return value
    raise ValueError


def _row_as_written(row: Sequence[Any], blob: Callable[[Any], bytes]) -> TaskRecord:
    (task_id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at,
     started_at, finished_at, lease_until, last_error, result, meta, priority, concurrency_key,
     expires_at, cancel_requested, progress_done, progress_total, progress_message,
     group_id) = row  # fmt: skip
    # Read once per claimed task, so the common values are checked inline rather than by a call per field:
    # ASCII text, float times (anything else through the helpers, which convert or refuse), then one test
    # of the times' sum, finite only when every one is (a finite sum that overflows sends the record to the
    # field-by-field reader, which reads the same record).
    record_state = _STATES_BY_VALUE[state]
    if not (type(task_id) is str and type(name) is str and type(queue) is str):
        raise TypeError
    if not (task_id.isascii() and name.isascii() and queue.isascii()):
        task_id, name, queue = _clean_text(task_id), _clean_text(name), _clean_text(queue)
    if not (type(attempts) is int and attempts >= 0 and type(max_retries) is int and max_retries >= 0):
        raise ValueError
    seconds = timeout if timeout is None or type(timeout) is float else _finite(timeout)
    if seconds is not None and seconds <= 0:
        raise ValueError
    lease = lease_until if lease_until is None or type(lease_until) is float else _finite(lease_until)
    if lease is None and record_state is TaskState.ACTIVE:
        raise ValueError
    enqueued = enqueued_at if type(enqueued_at) is float else _finite(enqueued_at)
    due = run_at if type(run_at) is float else _finite(run_at)
    started = started_at if started_at is None or type(started_at) is float else _finite(started_at)
    finished = finished_at if finished_at is None or type(finished_at) is float else _finite(finished_at)
    expires = expires_at if expires_at is None or type(expires_at) is float else _finite(expires_at)
    done = progress_done if progress_done is None or type(progress_done) is float else _finite(progress_done)
    total = (
        progress_total if progress_total is None or type(progress_total) is float else _finite(progress_total)
    )
    check = enqueued + due + (seconds or 0.0) + (lease or 0.0) + (started or 0.0) + (finished or 0.0)
    check += (expires or 0.0) + (done or 0.0) + (total or 0.0)
    if check - check != 0.0:  # an infinity or NaN
        raise ValueError
    if type(payload) is not bytes and not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError
    if not (result is None or isinstance(result, bytes | bytearray | memoryview)):
        raise TypeError
    rank = priority if type(priority) is int and -_PRIORITY_BOUND < priority < _PRIORITY_BOUND else None
    return _new_record(
        task_id,
        name,
        queue,
        payload if type(payload) is bytes and blob is bytes else blob(payload),
        record_state,
        attempts,
        max_retries,
        seconds,
        enqueued,
        due,
        started,
        finished,
        lease,
        None if last_error is None else _clean_text(last_error),
        None if result is None else blob(result),
        None if meta is None else _clean_text(meta),
        _priority(priority) if rank is None else rank,
        None if concurrency_key is None else _clean_text(concurrency_key),
        expires,
        False if cancel_requested is None or cancel_requested == 0 else _flag(cancel_requested),
        done,
        total,
        None if progress_message is None else _clean_text(progress_message),
        None if group_id is None else _clean_text(group_id),
        None,  # fault
    )


def _flag(value: object) -> bool:
    if value is None or value == 0 or value is False:  # None: a record stored before the flag existed
        return False
    if value == 1 or value is True:
        return True
    raise ValueError


def _priority(value: object) -> int:
    if value is None:  # a record stored before priorities existed
        return 0
    if type(value) is int and abs(value) < _PRIORITY_BOUND:
        return value
    raise ValueError


def _priority_text(value: Any) -> int:
    if value is None or value == b"":
        return 0
    digits = value[1:] if value[:1] == b"-" else value
    if len(digits) <= _COUNT_DIGITS and digits.isdigit():
        return int(value)
    raise ValueError


def _text_as_written(values: Sequence[Any]) -> TaskRecord:
    (task_id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at,
     started_at, finished_at, lease_until, last_error, result, meta, priority, concurrency_key,
     expires_at, cancel_requested, progress_done, progress_total, progress_message,
     group_id) = values  # fmt: skip
    # Read once per claimed task, so the checks are inline rather than a call per field: each number by
    # float() alone (b"" and None: no value), then one test of their sum, finite only when every one is (a
    # sum of finite values that overflows sends the record to the field-by-field reader, which reads the
    # same record).
    record_state = _STATES_BY_BYTES[state]  # None: KeyError
    seconds = float(timeout) if timeout else None
    if seconds is not None and seconds <= 0:
        raise ValueError
    lease = float(lease_until) if lease_until else None
    if lease is None and record_state is TaskState.ACTIVE:
        raise ValueError
    if payload is None:
        raise TypeError
    enqueued = float(enqueued_at)  # None: TypeError
    due = float(run_at)
    started = float(started_at) if started_at else None
    finished = float(finished_at) if finished_at else None
    expires = float(expires_at) if expires_at else None
    done = float(progress_done) if progress_done else None
    total = float(progress_total) if progress_total else None
    check = enqueued + due + (seconds or 0.0) + (lease or 0.0) + (started or 0.0) + (finished or 0.0)
    check += (expires or 0.0) + (done or 0.0) + (total or 0.0)
    if check - check != 0.0:  # an infinity or NaN
        raise ValueError
    if not (
        len(attempts) <= _COUNT_DIGITS  # None: TypeError
        and attempts.isdigit()
        and len(max_retries) <= _COUNT_DIGITS
        and max_retries.isdigit()
    ):
        raise ValueError
    if priority and len(priority) <= _COUNT_DIGITS and priority.isdigit():
        rank = int(priority)
    else:  # none, or negative
        rank = _priority_text(priority)
    if cancel_requested == b"1":
        cancel = True
    elif cancel_requested is None or cancel_requested in (b"", b"0"):
        cancel = False
    else:
        raise ValueError
    return _new_record(
        task_id.decode(),
        name.decode(),
        queue.decode(),
        payload,
        record_state,
        int(attempts),
        int(max_retries),
        seconds,
        enqueued,
        due,
        started,
        finished,
        lease,
        None if last_error is None else last_error.decode(),
        result,
        None if meta is None else meta.decode(),
        rank,
        None if concurrency_key is None else concurrency_key.decode(),
        expires,
        cancel,
        done,
        total,
        None if progress_message is None else progress_message.decode(),
        None if group_id is None else group_id.decode(),
        None,  # fault
    )


# -- reading a stored record field by field ----------------------------------------------------------------

_STATES_BY_VALUE: dict[str, TaskState] = {state.value: state for state in TaskState}
_STATE_LIST = ", ".join(_STATES_BY_VALUE)

#: A count stored as text has at most this many digits, all ASCII (exact in a Lua number, as scripts need).
_COUNT_DIGITS = 15
#: Priorities lie strictly between -10**15 and 10**15 (exact in a Lua number and in a double).
_PRIORITY_BOUND = 10**_COUNT_DIGITS

_SHOWN = 48


def shown(value: object) -> str:
    """``value`` for a fault text: its ``repr``, cut to a readable length; text that is not valid UTF-8 is
    shown as its bytes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        text = repr(raw[:_SHOWN])
        return text if len(raw) <= _SHOWN else f"{text}... ({len(raw)} bytes)"
    if isinstance(value, str) and len(value) > _SHOWN:
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "a value"
    return text if len(text) <= 2 * _SHOWN else f"{text[: 2 * _SHOWN]}..."


class _RecordReader:
    """Reads the values of one stored record field by field, collecting a fault per unreadable field instead
    of raising. ``textual``: the values are stored text (bytes), numbers included (Redis); otherwise they are
    the typed values of a SQL driver."""

    __slots__ = ("_blob", "_textual", "faults")

    def __init__(self, blob: Callable[[Any], bytes], *, textual: bool) -> None:
        self._blob = blob
        self._textual = textual
        self.faults: list[str] = []

    def read(self, values: Sequence[Any]) -> TaskRecord:
        if len(values) != len(RECORD_FIELDS):
            raise ValueError(f"a stored record has {len(RECORD_FIELDS)} fields, got {len(values)}")
        (task_id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at,
         started_at, finished_at, lease_until, last_error, result, meta, priority, concurrency_key,
         expires_at, cancel_requested, progress_done, progress_total, progress_message,
     group_id) = values  # fmt: skip
        record = TaskRecord(
            id=self._text("id", task_id),
            name=self._text("name", name),
            queue=self._text("queue", queue),
            payload=self._bytes("payload", payload),
            state=self._state(state),
            attempts=self._count("attempts", attempts),
            max_retries=self._count("max_retries", max_retries),
            timeout=self._seconds("timeout", timeout),
            enqueued_at=self._time("enqueued_at", enqueued_at),
            run_at=self._time("run_at", run_at),
            started_at=self._optional_time("started_at", started_at),
            finished_at=self._optional_time("finished_at", finished_at),
            lease_until=self._optional_time("lease_until", lease_until),
            last_error=self._optional_text("last_error", last_error),
            result=None if result is None else self._bytes("result", result),
            meta=self._optional_text("meta", meta),
            priority=self._priority(priority),
            concurrency_key=self._optional_text("concurrency_key", concurrency_key),
            expires_at=self._optional_time("expires_at", expires_at),
            cancel_requested=self._flag(cancel_requested),
            progress_done=self._optional_time("progress_done", progress_done),
            progress_total=self._optional_time("progress_total", progress_total),
            progress_message=self._optional_text("progress_message", progress_message),
            group_id=self._optional_text("group_id", group_id),
        )
        if record.state is TaskState.ACTIVE and record.lease_until is None and not self._named("lease_until"):
            self.faults.append("field 'lease_until' is empty, but the task is active")
        if not self.faults:
            return record
        return replace(record, fault="; ".join(self.faults))

    def _fault(self, field: str, value: object, expected: str) -> None:
        if value is None:
            self.faults.append(f"field {field!r} is missing")
            return
        if self._textual and isinstance(value, bytes):  # stored text: show it as text when it is UTF-8
            with contextlib.suppress(UnicodeDecodeError):
                value = value.decode("utf-8")
        self.faults.append(f"field {field!r} holds {shown(value)}, not {expected}")

    def _named(self, field: str) -> bool:
        prefix = f"field {field!r} "
        return any(fault.startswith(prefix) for fault in self.faults)

    def _text(self, field: str, value: object) -> str:
        if type(value) is str:
            if value.isascii():
                return value
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes the driver kept (SQLite's text factory)
                raw = value.encode("utf-8", "surrogateescape")
                self._fault(field, raw, "UTF-8 text")
                return raw.decode("utf-8", "replace")
            return value
        if self._textual and isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                self._fault(field, value, "UTF-8 text")
                return value.decode("utf-8", "replace")
        self._fault(field, value, "text")
        return ""

    def _optional_text(self, field: str, value: object) -> str | None:
        return None if value is None else self._text(field, value)

    def _bytes(self, field: str, value: object) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return self._blob(value)
        if isinstance(value, str):  # text where bytes belong (a row written by hand): its UTF-8 bytes
            return value.encode("utf-8", "surrogateescape")
        self._fault(field, value, "bytes")
        return b""

    def _state(self, value: object) -> TaskState:
        text = value.decode("utf-8", "replace") if self._textual and isinstance(value, bytes) else value
        state = _STATES_BY_VALUE.get(text) if type(text) is str else None
        if state is None:
            self._fault("state", value, f"one of {_STATE_LIST}")
            return TaskState.DEAD  # a record in no known state never runs: it counts as dead
        return state

    def _count(self, field: str, value: object) -> int:
        if type(value) is int and value >= 0:
            return value
        if self._textual and isinstance(value, bytes) and len(value) <= _COUNT_DIGITS and value.isdigit():
            return int(value)
        self._fault(field, value, "a whole number >= 0")
        return 0

    def _flag(self, value: object) -> bool:
        if value is None or value in (0, 1) or (self._textual and value in (b"", b"0", b"1")):
            return value in (1, b"1")
        self._fault("cancel_requested", value, "0 or 1")
        return False

    def _priority(self, value: object) -> int:
        if value is None or (self._textual and value == b""):
            return 0
        if type(value) is int and abs(value) < _PRIORITY_BOUND:
            return value
        if self._textual and isinstance(value, bytes):
            digits = value[1:] if value[:1] == b"-" else value
            if len(digits) <= _COUNT_DIGITS and digits.isdigit():
                return int(value)
        self._fault("priority", value, f"a whole number between -{_PRIORITY_BOUND} and {_PRIORITY_BOUND}")
        return 0

    def _number(self, value: object) -> float | None:
        """``value`` as a finite float, or ``None`` when it is not one."""
        if type(value) is float:
            number = value
        elif type(value) is int:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                return None
        elif self._textual and isinstance(value, bytes):
            try:
                number = float(value)
            except ValueError:
                return None
        else:
            return None
        return number if math.isfinite(number) else None

    def _time(self, field: str, value: object) -> float:
        number = self._number(value)
        if number is None:
            self._fault(field, value, "a time (a finite number of seconds)")
            return 0.0
        return number

    def _optional_time(self, field: str, value: object) -> float | None:
        if value is None or (self._textual and value == b""):
            return None
        return self._time(field, value)

    def _seconds(self, field: str, value: object) -> float | None:
        if value is None or (self._textual and value == b""):
            return None
        number = self._number(value)
        if number is None or number <= 0:
            self._fault(field, value, "a positive, finite number of seconds")
            return None
        return number
