"""What each call of the Backend protocol changes, planned on a :class:`Tx` (the rules are those of
``docs/backend-protocol.md``, as ``MemoryBackend`` states them), and what each read returns from the replica.

Planning functions only read the replica and write the transaction; they return the call's result, which is
what the caller gets once the log accepted the transaction (or once the replica was shown to be current,
when the call changes nothing).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

from ..._errors import DuplicateTaskError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
    stored_state,
    stored_text,
)
from ._codec import (
    ATTEMPTS,
    CANCEL_REQUESTED,
    CONCURRENCY_KEY,
    ENQUEUED_AT,
    EXPIRES_AT,
    FINISHED_AT,
    FOLLOW_UP,
    G_CREATED_AT,
    G_ENDED,
    G_FINISHED_AT,
    G_META,
    G_OUTCOME,
    G_RESULTS,
    G_TASK_IDS,
    G_THEN,
    G_THEN_ID,
    GROUP_ID,
    LAST_ERROR,
    LEASE_UNTIL,
    MAX_RETRIES,
    META,
    NAME,
    ORDER,
    PAYLOAD,
    PRIORITY,
    PROGRESS_DONE,
    PROGRESS_MESSAGE,
    PROGRESS_TOTAL,
    QUEUE,
    RESULT,
    RUN_AT,
    STARTED_AT,
    STATE,
    TIMEOUT,
    TOKEN,
    Row,
    follow_up_of,
    follow_up_task,
    new_group,
    new_row,
    record_of,
    task_of,
)
from ._state import State, number
from ._tx import Tx

__all__ = [
    "EXPIRED",
    "cancel",
    "cancel_requests",
    "claim",
    "enqueue",
    "enqueue_group",
    "extend",
    "flow_state",
    "get",
    "get_group",
    "list_records",
    "purge",
    "reclaim",
    "requeue",
    "save_progress",
    "set_paused",
    "settle",
]

EXPIRED = "expired before it started"
"""The ``last_error`` of a task a claim cancelled because its ``expires_at`` had passed."""

_PENDING = TaskState.PENDING.value
_ACTIVE = TaskState.ACTIVE.value
_SUCCEEDED = TaskState.SUCCEEDED.value
_SETTLED_STATES = (TaskState.PENDING, TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)
_WINDOWS_KEPT = 1024  # uniqueness windows kept before the ended ones are dropped


# -- enqueue -------------------------------------------------------------------------------------------------


def enqueue(tx: Tx, tasks: Sequence[NewTask], if_exists: Literal["error", "skip", "debounce"]) -> list[str]:
    """Store ``tasks``; see ``Backend.enqueue_many``. Raises :class:`DuplicateTaskError` (planning
    nothing)."""
    accepted: list[NewTask] = []
    opened: dict[str, float] = {}
    seen: set[str] = set()
    if if_exists == "skip":
        for task in tasks:
            if task.id in seen or tx.get(task.id) is not None or _window_refuses(tx, task, opened):
                continue
            seen.add(task.id)
            accepted.append(task)
            if task.unique_key is not None and task.unique_until is not None:
                opened[task.unique_key] = task.unique_until
    else:
        conflicts: list[str] = []
        for task in tasks:
            existing = tx.get(task.id)
            live = if_exists == "error" and (
                task.id in seen or (existing is not None and stored_state(existing[STATE]).is_live)
            )
            if (live or _window_refuses(tx, task, opened)) and task.id not in conflicts:
                conflicts.append(task.id)
            seen.add(task.id)
            if task.unique_key is not None and task.unique_until is not None:
                opened[task.unique_key] = task.unique_until
        if conflicts:
            raise DuplicateTaskError(conflicts[0], conflicts)
        accepted = list(tasks)
    if opened:
        tx.windows.update(opened)
        _forget_ended_windows(tx, max(task.enqueued_at for task in tasks))
    for task in accepted:
        if if_exists == "debounce":
            _debounce(tx, task)
        else:  # replaces a finished record with this id (a live one was refused above)
            tx.insert(new_row(task, tx.order()))
    return [task.id for task in accepted]


def _window_refuses(tx: Tx, task: NewTask, opened: dict[str, float]) -> bool:
    key = task.unique_key
    if key is None:
        return False
    until = opened[key] if key in opened else tx.window(key)
    return until is not None and until > task.enqueued_at


def _forget_ended_windows(tx: Tx, now: float) -> None:
    """Now and then, drop the windows that ended by ``now`` (so the store does not grow with them)."""
    state = tx.state
    if len(state.windows) <= 2 * state.windows_kept + _WINDOWS_KEPT:
        return
    kept = 0
    for key, until in state.windows.items():
        if until > now:
            kept += 1
        elif key not in tx.windows:
            tx.windows[key] = None
    state.windows_kept = kept


def _take_fields(row: list[Any], task: NewTask) -> None:
    """The fields a debounce replaces: all but the id, the state, attempts and enqueued_at."""
    row[NAME] = task.name
    row[QUEUE] = task.queue
    row[PAYLOAD] = bytes(task.payload)
    row[MAX_RETRIES] = task.max_retries
    row[TIMEOUT] = task.timeout
    row[RUN_AT] = task.run_at
    row[META] = task.meta
    row[PRIORITY] = task.priority
    row[CONCURRENCY_KEY] = task.concurrency_key
    row[EXPIRES_AT] = task.expires_at


def _debounce(tx: Tx, task: NewTask) -> None:
    row = tx.get(task.id)
    if row is None or stored_state(row[STATE]).is_final:
        tx.insert(new_row(task, tx.order()))
    elif row[STATE] == _PENDING:
        _take_fields(tx.edit(task.id), task)
    else:  # ACTIVE: one more run after the running attempt's settlement
        tx.edit(task.id)[FOLLOW_UP] = follow_up_of(task)


# -- groups --------------------------------------------------------------------------------------------------


def enqueue_group(tx: Tx, group: NewGroup) -> str:
    """Store ``group`` and its members; see ``Backend.enqueue_group``. Raises :class:`DuplicateTaskError`
    (planning nothing)."""
    if tx.group(group.id) is not None:
        raise DuplicateTaskError(
            group.id, reason=f"a group with id {group.id!r} exists already; pick another group id"
        )
    opened: dict[str, float] = {}
    conflicts = _group_conflicts(tx, group, opened)
    if conflicts:
        raise DuplicateTaskError(conflicts[0], conflicts)
    _store_group(tx, group, opened)
    return group.id


def _group_conflicts(tx: Tx, group: NewGroup, opened: dict[str, float]) -> list[str]:
    """The member ids that refuse ``group`` (live, repeated, or in an open uniqueness window)."""
    seen: set[str] = set()
    conflicts: list[str] = []
    for task in group.members:
        existing = tx.get(task.id)
        live = task.id in seen or (existing is not None and stored_state(existing[STATE]).is_live)
        if (live or _window_refuses(tx, task, opened)) and task.id not in conflicts:
            conflicts.append(task.id)
        seen.add(task.id)
        if task.unique_key is not None and task.unique_until is not None:
            opened[task.unique_key] = task.unique_until
    return conflicts


def _store_group(tx: Tx, group: NewGroup, opened: dict[str, float]) -> None:
    if opened:
        tx.windows.update(opened)
        _forget_ended_windows(tx, max(task.enqueued_at for task in group.members))
    tx.insert_group(new_group(group))
    for task in group.members:
        tx.insert(new_row(task, tx.order()))


def _member_ended(
    tx: Tx, row: Sequence[Any], state: TaskState, at: float, result: bytes | None = None
) -> None:
    """Group bookkeeping for a member that reached the final ``state``, in the same transaction: its slot,
    and the group's outcome (with ``then`` stored by the last success)."""
    group_id = row[GROUP_ID]
    if type(group_id) is not str or tx.group(group_id) is None:
        return
    index = tx.member_index(group_id, row[0])
    if index is None:
        return
    group = tx.edit_group(group_id)
    group[G_ENDED][index] = state.value
    if state is TaskState.SUCCEEDED:
        group[G_RESULTS][index] = result
        if group[G_OUTCOME] is None and all(ended == _SUCCEEDED for ended in group[G_ENDED]):
            group[G_OUTCOME] = _SUCCEEDED
            group[G_FINISHED_AT] = at
            then = task_of(group[G_THEN])
            if then is not None:
                if tx.get(then.id) is None:
                    tx.insert(new_row(then, tx.order()))
                group[G_THEN_ID] = then.id
    elif group[G_OUTCOME] is None:
        group[G_OUTCOME] = state.value
        group[G_FINISHED_AT] = at


def get_group(state: State, group_id: str) -> GroupRecord | None:
    """The group ``group_id`` as ``Backend.get_group`` returns it, or ``None``."""
    group = state.groups.get(group_id)
    if group is None:
        return None
    counts: dict[TaskState, int] = {}
    for index, task_id in enumerate(group[G_TASK_IDS]):
        row = state.rows.get(task_id)
        if row is not None and row[GROUP_ID] == group_id:
            member_state: TaskState | None = stored_state(row[STATE])
        else:
            ended = group[G_ENDED][index]
            member_state = None if ended is None else stored_state(ended)
        if member_state is not None:
            counts[member_state] = counts.get(member_state, 0) + 1
    outcome = group[G_OUTCOME]
    return GroupRecord(
        id=group_id,
        task_ids=tuple(group[G_TASK_IDS]),
        outcome=None if outcome is None else stored_state(outcome),
        results=tuple(result if isinstance(result, bytes) else None for result in group[G_RESULTS]),
        counts=counts,
        created_at=group[G_CREATED_AT],
        finished_at=group[G_FINISHED_AT],
        then_id=group[G_THEN_ID],
        meta=group[G_META],
    )


# -- claims and leases ---------------------------------------------------------------------------------------


def claim(
    tx: Tx,
    queues: Sequence[str],
    limit: int,
    now: float,
    lease_until: float,
    limits: Mapping[str, FlowLimits] | None,
    token: Callable[[], str],
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due tasks, ``queues`` in priority order; see ``Backend.claim``."""
    state = tx.state
    claimed: list[ClaimedTask] = []
    refused: set[str] = set()
    for queue in dict.fromkeys(queues):
        if len(claimed) >= limit:
            break
        if tx.is_paused(queue):
            continue
        heap = state.promote(queue, now)
        if not heap:
            continue
        popped: list[tuple[float, float, int, str]] = []
        try:
            while heap and len(claimed) < limit:
                entry = heapq.heappop(heap)
                task_id = entry[3]
                if state.entry.get(task_id) is not entry:
                    continue  # stale: the task changed since
                popped.append(entry)
                if entry[1] > now:  # promoted by a claim with a later clock
                    continue
                row = state.rows[task_id]
                expires = row[EXPIRES_AT]
                if expires is not None and expires <= now and record_of(row).fault is None:
                    # (a damaged record is handed out instead, so that the worker ends it dead with its fault)
                    edit = tx.edit(task_id)
                    edit[STATE] = TaskState.CANCELLED.value
                    edit[FINISHED_AT] = now
                    edit[LAST_ERROR] = EXPIRED
                    _member_ended(tx, edit, TaskState.CANCELLED, now)
                    continue
                name = row[NAME]
                flow = limits.get(name) if limits and type(name) is str else None
                if flow is not None and not _admit(tx, row, flow, now, refused):
                    continue
                edit = tx.edit(task_id)
                edit[STATE] = _ACTIVE
                attempts = edit[ATTEMPTS]
                if type(attempts) is int and attempts >= 0:
                    edit[ATTEMPTS] = attempts + 1
                edit[STARTED_AT] = now
                edit[LEASE_UNTIL] = lease_until
                edit[TOKEN] = lease = token()
                tx.count_running(name, row[CONCURRENCY_KEY])
                claimed.append(ClaimedTask(token=lease, record=record_of(edit)))
        finally:  # the transaction may not be committed: the replica's heap must stay whole
            for entry in popped:
                heapq.heappush(heap, entry)
    for name in refused:
        tx.add_refused(name)
    return claimed


def _admit(tx: Tx, row: Row, limits: FlowLimits, now: float, refused: set[str]) -> bool:
    """Whether ``limits`` let ``row`` start now; if so, take its token. A name whose task found no token is
    added to ``refused``."""
    name: str = row[NAME]
    if limits.max_running is not None and tx.running_of(name) >= limits.max_running:
        return False
    key = row[CONCURRENCY_KEY]
    if (
        limits.max_running_per_key is not None
        and key is not None
        and tx.running_for(name, key) >= limits.max_running_per_key
    ):
        return False
    if limits.rate is not None:
        tokens, at = tx.bucket(name, limits.rate, limits.per, now)
        if tokens < 1.0:
            refused.add(name)
            return False
        tx.set_tokens(name, tokens - 1.0, at)
    return True


def extend(tx: Tx, leases: Sequence[tuple[str, str]], lease_until: float) -> set[str]:
    """Renew each held lease; return the ids whose lease was lost."""
    lost: set[str] = set()
    for task_id, token in leases:
        row = tx.get(task_id)
        if row is None or row[STATE] != _ACTIVE or row[TOKEN] != token:
            lost.add(task_id)
        else:
            tx.edit(task_id)[LEASE_UNTIL] = lease_until
    return lost


def settle(tx: Tx, settlements: Sequence[Settlement]) -> set[str]:
    """Apply each settlement whose lease is held, with its ``then`` tasks; return the ids not applied."""
    lost: set[str] = set()
    for settlement in settlements:
        task_id = settlement.task_id
        row = tx.get(task_id)
        if row is None or row[STATE] != _ACTIVE or row[TOKEN] != settlement.token:
            lost.add(task_id)
            continue
        state = TaskState(settlement.state)
        if state not in _SETTLED_STATES:
            raise ValueError(f"cannot settle task {task_id!r} as {state.value!r}")
        edit = tx.edit(task_id)
        edit[TOKEN] = None
        edit[LEASE_UNTIL] = None
        if settlement.error is not None:
            edit[LAST_ERROR] = settlement.error
        retry_at: float | None = None
        if state is TaskState.PENDING:
            edit[STATE] = _PENDING
            edit[RUN_AT] = retry_at = settlement.run_at if settlement.run_at is not None else settlement.at
            edit[FINISHED_AT] = None
            attempts = edit[ATTEMPTS]
            if settlement.refund_attempt and type(attempts) is int and attempts > 0:
                edit[ATTEMPTS] = attempts - 1
        else:
            edit[STATE] = state.value
            edit[FINISHED_AT] = settlement.at
            result = None if settlement.result is None else bytes(settlement.result)
            if state is TaskState.SUCCEEDED:
                edit[RESULT] = result
            _member_ended(tx, edit, state, settlement.at, result)
        follow_up = follow_up_task(task_id, edit[FOLLOW_UP])
        edit[FOLLOW_UP] = None
        if follow_up is not None:
            _start_follow_up(edit, follow_up, retry_at)
        for then in settlement.then:
            if tx.get(then.id) is None:
                tx.insert(new_row(then, tx.order()))
        for group in settlement.then_groups:
            opened: dict[str, float] = {}
            if tx.group(group.id) is None and not _group_conflicts(tx, group, opened):
                _store_group(tx, group, opened)
    return lost


def _start_follow_up(row: list[Any], task: NewTask, retry_at: float | None) -> None:
    _take_fields(row, task)
    if retry_at is not None and retry_at > task.run_at:
        row[RUN_AT] = retry_at
    row[ENQUEUED_AT] = task.enqueued_at
    row[STATE] = _PENDING
    row[ATTEMPTS] = 0
    row[STARTED_AT] = None
    row[FINISHED_AT] = None
    row[RESULT] = None
    row[CANCEL_REQUESTED] = False


def reclaim(
    tx: Tx, now: float, lease_until: float, limit: int, token: Callable[[], str]
) -> list[ClaimedTask]:
    """Take over up to ``limit`` active tasks whose lease ended before ``now``, and the damaged records no
    claim selects, with a fresh token; attempts unchanged."""
    state = tx.state
    expired: list[tuple[float, int, str]] = [
        (-1.0 if lease is None else lease, state.rows[task_id][ORDER], task_id)
        for task_id, lease in state.active.items()
        if lease is None or lease < now
    ]
    expired += [(-1.0, state.rows[task_id][ORDER], task_id) for task_id in state.unselectable]
    taken: list[ClaimedTask] = []
    for _, _, task_id in heapq.nsmallest(limit, expired):
        edit = tx.edit(task_id)
        edit[STATE] = _ACTIVE
        edit[LEASE_UNTIL] = lease_until
        edit[TOKEN] = lease = token()
        taken.append(ClaimedTask(token=lease, record=record_of(edit)))
    return taken


# -- operator actions ----------------------------------------------------------------------------------------


def cancel(tx: Tx, task_ids: Sequence[str], now: float) -> list[str]:
    """Cancel the pending tasks among ``task_ids`` (ending a member's group) and ask the active ones to stop
    (dropping their debounce follow-up); return both, in the order given."""
    cancelled: list[str] = []
    for task_id in dict.fromkeys(task_ids):
        row = tx.get(task_id)
        if row is None:
            continue
        if row[STATE] == _PENDING:
            edit = tx.edit(task_id)
            edit[STATE] = TaskState.CANCELLED.value
            edit[FINISHED_AT] = now
            _member_ended(tx, edit, TaskState.CANCELLED, now)
            cancelled.append(task_id)
        elif row[STATE] == _ACTIVE:
            edit = tx.edit(task_id)
            edit[CANCEL_REQUESTED] = True
            edit[FOLLOW_UP] = None
            cancelled.append(task_id)
    return cancelled


def save_progress(tx: Tx, updates: Sequence[ProgressUpdate]) -> set[str]:
    """Store each update whose lease is held; return the ids whose lease was lost."""
    lost: set[str] = set()
    for update in updates:
        row = tx.get(update.task_id)
        if row is None or row[STATE] != _ACTIVE or row[TOKEN] != update.token:
            lost.add(update.task_id)
            continue
        edit = tx.edit(update.task_id)
        edit[PROGRESS_DONE] = update.done
        edit[PROGRESS_TOTAL] = update.total
        edit[PROGRESS_MESSAGE] = update.message
    return lost


def requeue(tx: Tx, task_ids: Sequence[str] | None, queue: str | None, now: float, most: int) -> int:
    """Move dead (or, by id, cancelled) tasks back to pending with ``attempts = 0``; without ids, at most
    ``most`` dead tasks (the caller repeats)."""
    wanted = (
        (TaskState.DEAD.value,) if task_ids is None else (TaskState.DEAD.value, TaskState.CANCELLED.value)
    )
    if task_ids is None:
        candidates = [
            task_id
            for task_id, row in tx.state.rows.items()
            if row[STATE] in wanted and (queue is None or stored_text(row[QUEUE]) == queue)
        ][:most]
    else:
        candidates = []
        for task_id in dict.fromkeys(task_ids):
            row = tx.get(task_id)
            if (
                row is not None
                and row[STATE] in wanted
                and (queue is None or stored_text(row[QUEUE]) == queue)
            ):
                candidates.append(task_id)
    for task_id in candidates:
        edit = tx.edit(task_id)
        edit[STATE] = _PENDING
        edit[ATTEMPTS] = 0
        edit[RUN_AT] = now
        edit[FINISHED_AT] = None
        edit[CANCEL_REQUESTED] = False
    return len(candidates)


def purge(
    tx: Tx, states: Collection[TaskState], queue: str | None, before: float | None, most: int | None
) -> int:
    """Delete matching records, the oldest first when ``most`` cuts; return how many."""
    state = tx.state
    victims = [
        (state.age(row), row[ORDER], task_id)
        for task_id, row in state.rows.items()
        if stored_state(row[STATE]) in states
        and (queue is None or stored_text(row[QUEUE]) == queue)
        and (before is None or state.age(row) < before)
    ]
    if most is not None and len(victims) > most:
        victims = heapq.nsmallest(most, victims)
    for _, _, task_id in victims:
        tx.delete(task_id)
    if queue is None:  # groups are removed by their outcome and finish time (not counted)
        outcomes = {value.value for value in states}
        for group_id, group in state.groups.items():
            finished = number(group[G_FINISHED_AT])
            if (
                group[G_OUTCOME] in outcomes
                and finished is not None
                and (before is None or finished < before)
                and tx.group(group_id) is not None
            ):
                tx.delete_group(group_id)
    return len(victims)


def set_paused(tx: Tx, queue: str, paused: bool) -> None:
    """Pause or resume ``queue``."""
    tx.paused[queue] = paused


# -- reads ---------------------------------------------------------------------------------------------------


def get(state: State, task_id: str) -> TaskRecord | None:
    row = state.rows.get(task_id)
    return None if row is None else record_of(row)


def cancel_requests(state: State, task_ids: Sequence[str]) -> set[str]:
    """The active tasks among ``task_ids`` whose cancellation was asked."""
    asked: set[str] = set()
    for task_id in task_ids:
        row = state.rows.get(task_id)
        if row is not None and row[STATE] == _ACTIVE and row[CANCEL_REQUESTED] is True:
            asked.add(task_id)
    return asked


def list_records(
    state: State, states: Collection[TaskState] | None, queue: str | None, limit: int, offset: int
) -> list[TaskRecord]:
    """Records matching the filters, newest ``enqueued_at`` first (then newest stored first)."""
    wanted = None if states is None else {TaskState(value) for value in states}
    if wanted is not None and not wanted:
        return []
    rows = [
        row
        for row in state.rows.values()
        if (wanted is None or stored_state(row[STATE]) in wanted)
        and (queue is None or stored_text(row[QUEUE]) == queue)
    ]
    offset, limit = max(0, offset), max(0, limit)
    newest = heapq.nlargest(
        offset + limit, rows, key=lambda row: (number(row[ENQUEUED_AT]) or 0.0, row[ORDER])
    )
    return [record_of(row) for row in newest[offset:]]


def flow_state(
    state: State, name: str, concurrency_key: str | None, now: float, limits: FlowLimits
) -> FlowState:
    """The running counts of ``name`` (and of its ``concurrency_key``) and its bucket at ``now``."""
    return FlowState(
        running=state.running.get(name, 0),
        running_for_key=0 if concurrency_key is None else state.running_keys.get((name, concurrency_key), 0),
        tokens=None if limits.rate is None else state.bucket(name, limits.rate, limits.per, now)[0],
        refused=0 if limits.rate is None else state.refused(name),
    )
